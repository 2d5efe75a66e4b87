//! A tiny Qwen3-style causal decoder made only of differentiable candle ops.
//!
//! candle-transformers' models cannot be trained on the CPU with candle 0.11: the CPU attention
//! path builds its output with `Tensor::from_vec` (no autograd), and the fast
//! `softmax_last_dim` / `rms_norm` ops have no backward. Every op below has one: RMSNorm from
//! `sqr`/`mean`/`sqrt`, rotary positions from `narrow`/`cat`, `candle_nn::ops::softmax` (composed
//! ops), SwiGLU from `silu`, linear layers from `matmul`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

/// Model sizes.
#[derive(Debug, Clone, Copy)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_len: usize,
    pub rope_theta: f64,
    /// `Some((experts, top_k))`: a mixture-of-experts feed-forward with top-k routing.
    pub moe: Option<(usize, usize)>,
}

/// `x / sqrt(mean(x²) + ε) · w`.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
        Ok(Self { weight, eps: 1e-6 })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x.broadcast_mul(&scale)?.broadcast_mul(&self.weight)
    }
}

/// Rotary position tables, `[max_len, head_dim/2]`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(head_dim: usize, max_len: usize, theta: f64, dev: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), dev)?;
        let positions = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// Rotates `x` `[B, H, L, head_dim]` (rotate-half convention).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, len, dim) = x.dims4()?;
        let half = dim / 2;
        let cos = self.cos.narrow(0, 0, len)?;
        let sin = self.sin.narrow(0, 0, len)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    }
}

/// Causal self-attention with Qwen3's per-head q/k RMSNorm.
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.hidden / cfg.heads;
        Ok(Self {
            q: linear_no_bias(cfg.hidden, cfg.hidden, vb.pp("q_proj"))?,
            k: linear_no_bias(cfg.hidden, cfg.hidden, vb.pp("k_proj"))?,
            v: linear_no_bias(cfg.hidden, cfg.hidden, vb.pp("v_proj"))?,
            o: linear_no_bias(cfg.hidden, cfg.hidden, vb.pp("o_proj"))?,
            q_norm: RmsNorm::new(head_dim, vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(head_dim, vb.pp("k_norm"))?,
            heads: cfg.heads,
            head_dim,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &Rotary, causal: &Tensor) -> Result<Tensor> {
        let (b, len, hidden) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, len, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rotary.apply(&self.q_norm.forward(&split(self.q.forward(x)?)?)?)?;
        let k = rotary.apply(&self.k_norm.forward(&split(self.k.forward(x)?)?)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (self.head_dim as f64).sqrt())?
            .broadcast_add(causal)?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, len, hidden))?;
        self.o.forward(&out)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) · up(x))`.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(hidden: usize, intermediate: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate: linear_no_bias(hidden, intermediate, vb.pp("gate_proj"))?,
            up: linear_no_bias(hidden, intermediate, vb.pp("up_proj"))?,
            down: linear_no_bias(intermediate, hidden, vb.pp("down_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate.forward(x)?.silu()? * self.up.forward(x)?)?;
        self.down.forward(&gated)
    }
}

/// Mixture of SwiGLU experts with top-k routing (Qwen3-MoE style): each token's router
/// probabilities are kept for its `top_k` best experts and renormalised. The routing choice is
/// discrete (no gradient), the kept probabilities are differentiable; experts run densely, which
/// is cheap at this size.
struct Moe {
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

impl Module for Moe {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let probs = candle_nn::ops::softmax(&self.router.forward(x)?, D::Minus1)?;
        let (sorted, _) = probs.detach().sort_last_dim(false)?;
        let kth = sorted.narrow(D::Minus1, self.top_k - 1, 1)?;
        let chosen = probs.broadcast_ge(&kth)?.to_dtype(probs.dtype())?;
        let kept = (probs * chosen)?;
        let gates = kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?;
        let mut out: Option<Tensor> = None;
        for (e, expert) in self.experts.iter().enumerate() {
            let y = expert
                .forward(x)?
                .broadcast_mul(&gates.narrow(D::Minus1, e, 1)?)?;
            out = Some(match out {
                None => y,
                Some(acc) => (acc + y)?,
            });
        }
        out.ok_or_else(|| candle_core::Error::Msg("a mixture needs at least one expert".into()))
    }
}

/// The feed-forward of a block: dense SwiGLU or a mixture of experts.
enum FeedForward {
    Dense(Mlp),
    Experts(Moe),
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Experts(moe) => moe.forward(x),
        }
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: FeedForward,
}

/// The decoder: embeddings, pre-norm blocks, final norm, untied LM head.
pub struct Decoder {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    rotary: Rotary,
}

impl Decoder {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let blocks = (0..cfg.layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(Block {
                    attn_norm: RmsNorm::new(cfg.hidden, vb.pp("input_layernorm"))?,
                    attn: Attention::new(cfg, vb.pp("self_attn"))?,
                    mlp_norm: RmsNorm::new(cfg.hidden, vb.pp("post_attention_layernorm"))?,
                    mlp: match cfg.moe {
                        None => FeedForward::Dense(Mlp::new(
                            cfg.hidden,
                            cfg.intermediate,
                            vb.pp("mlp"),
                        )?),
                        Some((experts, top_k)) => FeedForward::Experts(Moe {
                            router: linear_no_bias(cfg.hidden, experts, vb.pp("mlp.gate"))?,
                            experts: (0..experts)
                                .map(|e| {
                                    Mlp::new(
                                        cfg.hidden,
                                        cfg.intermediate,
                                        vb.pp(format!("mlp.experts.{e}")),
                                    )
                                })
                                .collect::<Result<Vec<_>>>()?,
                            top_k,
                        }),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: embedding(cfg.vocab, cfg.hidden, vb.pp("embed_tokens"))?,
            blocks,
            norm: RmsNorm::new(cfg.hidden, vb.pp("norm"))?,
            head: linear_no_bias(cfg.hidden, cfg.vocab, vb.pp("lm_head"))?,
            rotary: Rotary::new(
                cfg.hidden / cfg.heads,
                cfg.max_len,
                cfg.rope_theta,
                vb.device(),
            )?,
        })
    }

    /// Logits `[B, L, V]` for tokens `[B, L]` (sampling).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.head.forward(&self.hidden_states(tokens)?)
    }

    /// The lm_head's weight `[V, H]`, for `sapo`'s fused hidden-states → log-probs path.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.head.weight()
    }

    /// The last hidden states `[B, L, H]` (after the final norm) for tokens `[B, L]`: what the
    /// lm_head reads.
    pub fn hidden_states(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_, len) = tokens.dims2()?;
        let dev = tokens.device();
        let causal: Vec<f32> = (0..len * len)
            .map(|j| {
                if j % len > j / len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (len, len), dev)?;
        let mut x = self.embed.forward(tokens)?;
        for block in &self.blocks {
            let h = block
                .attn
                .forward(&block.attn_norm.forward(&x)?, &self.rotary, &causal)?;
            x = (x + h)?;
            let h = block.mlp.forward(&block.mlp_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        self.norm.forward(&x)
    }
}
