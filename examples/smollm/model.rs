//! A differentiable Llama built from a GGUF: RMSNorm, RoPE in the GGUF's interleaved layout,
//! grouped-query causal attention, SwiGLU and a lm_head tied to the embedding — every op composed
//! from candle-core tensor ops that have a backward.
//!
//! candle-nn 0.11's `ops::rms_norm`, `ops::softmax_last_dim` and `rotary_emb::*` run with
//! `apply_op*_no_bwd`: a model built on them trains only what comes after the last of them, with
//! no error. This file uses none of them; `tests::every_parameter_gets_a_gradient` checks it.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::gguf::{Config, Gguf};
use crate::AnyResult;

/// One decoder block's weights (`[out, in]` matrices, `[hidden]` norms).
#[derive(Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub ffn_norm: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
}

impl Block {
    /// `(GGUF name suffix, weight)` pairs, in a fixed order.
    fn named_mut(&mut self) -> [(&'static str, &mut Tensor); 9] {
        [
            ("attn_norm.weight", &mut self.attn_norm),
            ("attn_q.weight", &mut self.q),
            ("attn_k.weight", &mut self.k),
            ("attn_v.weight", &mut self.v),
            ("attn_output.weight", &mut self.o),
            ("ffn_norm.weight", &mut self.ffn_norm),
            ("ffn_gate.weight", &mut self.gate),
            ("ffn_up.weight", &mut self.up),
            ("ffn_down.weight", &mut self.down),
        ]
    }
}

/// The model: weights and the RoPE tables.
#[derive(Clone)]
pub struct Llama {
    pub config: Config,
    /// `[V, H]`; also the lm_head (tied), unless `output` is set.
    pub embed: Tensor,
    /// An untied lm_head (`output.weight`), when the file has one.
    pub output: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `[positions, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
}

/// The key/value cache of a batch: per block `[B, kv_heads, S, head_dim]` twice.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions cached so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            len: 0,
        }
    }

    /// The cache of the rows `rows` (e.g. each prompt's cache repeated for its group).
    pub fn select_rows(&self, rows: &Tensor) -> AnyResult<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?))),
                None => Ok(None),
            })
            .collect::<AnyResult<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }
}

/// `x / sqrt(mean(x²) + ε) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// `softmax` over the last dimension; the row maximum is subtracted as a constant (the softmax
/// does not depend on it, so neither does its gradient).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Interleaved RoPE (pairs `(2i, 2i+1)`, llama.cpp's "normal" mode, the layout of a Llama GGUF):
/// `x` is `[B, heads, T, d]`, `cos`/`sin` `[T, d/2]`.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let pairs = x.reshape((b, h, t, d / 2, 2))?;
    let x0 = pairs.narrow(4, 0, 1)?;
    let x1 = pairs.narrow(4, 1, 1)?;
    let cos = cos.reshape((1, 1, t, d / 2, 1))?;
    let sin = sin.reshape((1, 1, t, d / 2, 1))?;
    let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
    let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
    Tensor::cat(&[out0, out1], 4)?.reshape((b, h, t, d))
}

/// `x · wᵀ` for `x` `[B, T, in]` and `w` `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, i) = x.dims3()?;
    x.reshape((b * t, i))?
        .matmul(&w.t()?)?
        .reshape((b, t, w.dim(0)?))
}

/// `[T, S]` additive causal mask for queries at positions `offset..offset+T` over keys `0..S`.
fn causal_mask(t: usize, offset: usize, device: &Device) -> candle_core::Result<Tensor> {
    let s = offset + t;
    let values: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (t, s), device)
}

impl Llama {
    /// Builds the model from a read GGUF (its tensors are taken out of `gguf`).
    pub fn from_gguf(gguf: &mut Gguf, device: &Device) -> AnyResult<Self> {
        let c = gguf.config.clone();
        let (h, kv) = (c.hidden, c.kv_heads * c.head_dim);
        let embed = gguf.take("token_embd.weight", &[c.vocab, c.hidden])?;
        let output = if gguf.tensors.contains_key("output.weight") {
            Some(gguf.take("output.weight", &[c.vocab, c.hidden])?)
        } else {
            None
        };
        let norm = gguf.take("output_norm.weight", &[h])?;
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let mut take =
                |name: &str, shape: &[usize]| gguf.take(&format!("blk.{i}.{name}"), shape);
            blocks.push(Block {
                attn_norm: take("attn_norm.weight", &[h])?,
                q: take("attn_q.weight", &[h, h])?,
                k: take("attn_k.weight", &[kv, h])?,
                v: take("attn_v.weight", &[kv, h])?,
                o: take("attn_output.weight", &[h, h])?,
                ffn_norm: take("ffn_norm.weight", &[h])?,
                gate: take("ffn_gate.weight", &[c.intermediate, h])?,
                up: take("ffn_up.weight", &[c.intermediate, h])?,
                down: take("ffn_down.weight", &[h, c.intermediate])?,
            });
        }
        let half = c.head_dim / 2;
        let positions = c.context.min(4096);
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for i in 0..half {
                let theta = c.rope_base.powf(-((2 * i) as f64) / c.head_dim as f64);
                let angle = p as f64 * theta;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?,
            config: c,
            embed,
            output,
            blocks,
            norm,
        })
    }

    /// The lm_head matrix `[V, H]`.
    pub fn lm_head(&self) -> &Tensor {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// The same model with every weight detached: runs without recording a graph.
    pub fn detached(&self) -> Self {
        let mut m = self.clone();
        m.embed = m.embed.detach();
        m.output = m.output.map(|o| o.detach());
        m.norm = m.norm.detach();
        for b in &mut m.blocks {
            for (_, w) in b.named_mut() {
                *w = w.detach();
            }
        }
        m
    }

    /// A copy with its own storage (a frozen reference that the optimizer's in-place updates of
    /// the policy do not reach).
    pub fn deep_copy(&self) -> candle_core::Result<Self> {
        let mut m = self.detached();
        m.embed = m.embed.copy()?;
        m.output = m.output.map(|o| o.copy()).transpose()?;
        m.norm = m.norm.copy()?;
        for b in &mut m.blocks {
            for (_, w) in b.named_mut() {
                *w = w.copy()?;
            }
        }
        Ok(m)
    }

    /// Makes the top `top_blocks` blocks and the final norm trainable (and the embedding, which is
    /// the tied lm_head, when `embedding`): each such weight becomes a `Var`. Returns them by GGUF
    /// name. The other weights stay constants, so what runs below the top blocks records no graph.
    pub fn make_trainable(
        &mut self,
        top_blocks: usize,
        embedding: bool,
    ) -> AnyResult<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        let mut make = |name: String, w: &mut Tensor| -> AnyResult<()> {
            let var = Var::from_tensor(&w.detach())?;
            *w = var.as_tensor().clone();
            vars.push((name, var));
            Ok(())
        };
        if embedding {
            make("token_embd.weight".into(), &mut self.embed)?;
            if let Some(o) = &mut self.output {
                make("output.weight".into(), o)?;
            }
        }
        let first = self.blocks.len() - top_blocks.min(self.blocks.len());
        for (i, b) in self.blocks.iter_mut().enumerate().skip(first) {
            for (name, w) in b.named_mut() {
                make(format!("blk.{i}.{name}"), w)?;
            }
        }
        make("output_norm.weight".into(), &mut self.norm)?;
        Ok(vars)
    }

    /// Token embeddings `[B, T, H]` of ids `[B, T]`.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden))
    }

    fn attention(
        &self,
        block: &Block,
        x: &Tensor,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let heads = |w: &Tensor, n: usize| {
            linear(x, w)?
                .reshape((b, t, n, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let q = rope_interleaved(&heads(&block.q, c.heads)?, &cos, &sin)?;
        let mut k = rope_interleaved(&heads(&block.k, c.kv_heads)?, &cos, &sin)?;
        let mut v = heads(&block.v, c.kv_heads)?;
        if let Some(cache) = cache {
            if let Some((k0, v0)) = cache.as_ref() {
                k = Tensor::cat(&[k0, &k], 2)?;
                v = Tensor::cat(&[v0, &v], 2)?;
            }
            *cache = Some((k.clone(), v.clone()));
        }
        let s = k.dim(2)?;
        // Grouped-query attention: each key/value head serves `heads / kv_heads` query heads.
        let group = c.heads / c.kv_heads;
        let repeat = |x: &Tensor| {
            x.unsqueeze(2)?
                .broadcast_as((b, c.kv_heads, group, s, c.head_dim))?
                .reshape((b, c.heads, s, c.head_dim))
        };
        let (k, v) = (repeat(&k)?, repeat(&v)?);
        let mut scores = (q.matmul(&k.t()?)? / (c.head_dim as f64).sqrt())?;
        if t > 1 {
            scores = scores.broadcast_add(&causal_mask(t, s - t, x.device())?)?;
        }
        let y = softmax_last(&scores)?.matmul(&v)?;
        let y = y.transpose(1, 2)?.reshape((b, t, c.heads * c.head_dim))?;
        linear(&y, &block.o)
    }

    /// Block `i` on `x` `[B, T, H]` at positions `offset..offset+T`.
    fn block(
        &self,
        i: usize,
        x: &Tensor,
        offset: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let block = &self.blocks[i];
        let eps = self.config.rms_eps;
        let x =
            (x + self.attention(block, &rms_norm(x, &block.attn_norm, eps)?, offset, cache)?)?;
        let h = rms_norm(&x, &block.ffn_norm, eps)?;
        let ff = (linear(&h, &block.gate)?.silu()? * linear(&h, &block.up)?)?;
        x + linear(&ff, &block.down)?
    }

    /// Blocks `from..` on `x` (positions from 0, no cache), then the final norm: the hidden states
    /// the lm_head reads, `[B, T, H]`.
    pub fn top(&self, x: &Tensor, from: usize) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for i in from..self.blocks.len() {
            x = self.block(i, &x, 0, None)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_eps)
    }

    /// The final hidden states `[B, T, H]` of ids `[B, T]` (no cache).
    pub fn hidden_states(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.top(&self.embed(ids)?, 0)
    }

    /// Runs ids `[B, T]` after the `cache.len` cached positions, extending the cache. Returns the
    /// input of block `split` (`[B, T, H]`) and the final hidden states of the last position
    /// (`[B, H]`).
    pub fn extend(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        split: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = ids.dim(1)?;
        let offset = cache.len;
        let mut x = self.embed(ids)?;
        let mut boundary = x.clone();
        for i in 0..self.blocks.len() {
            if i == split {
                boundary = x.clone();
            }
            x = self.block(i, &x, offset, Some(&mut cache.layers[i]))?;
        }
        cache.len += t;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok((boundary, rms_norm(&last, &self.norm, self.config.rms_eps)?))
    }

    /// Logits `[B, V]` of final hidden states `[B, H]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        hidden.matmul(&self.lm_head().t()?)
    }

    /// Every weight by GGUF name (for safetensors).
    pub fn named_weights(&mut self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("token_embd.weight".to_string(), self.embed.clone()),
            ("output_norm.weight".to_string(), self.norm.clone()),
        ];
        if let Some(o) = &self.output {
            out.push(("output.weight".into(), o.clone()));
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, w) in b.named_mut() {
                out.push((format!("blk.{i}.{name}"), w.clone()));
            }
        }
        out
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }
}
