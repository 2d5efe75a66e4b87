//! Fused linear log-probs on the CPU: traversal, tiles and memory only — the formulas are the
//! scalar forms of `logprobs.rs`, folded tile by tile.
//!
//! Forward: blocks of `ROWS` rows run in parallel; each computes its logits one vocabulary tile
//! at a time (`hidden · W_tileᵀ + b`, one gemm) and folds every row's tile into its running
//! maximum and sums (online log-sum-exp), so at most one tile of logits per thread exists.
//! Backward: the vocabulary is cut into `CHUNKS` fixed chunks that run in parallel; for each tile
//! of its chunk and each block of rows a chunk recomputes the logits, writes their gradient,
//! and accumulates `∂W = dlogitsᵀ · hidden` (rows it owns), `∂b` and its own partial
//! `∂hidden = dlogits · W`; the partials are added in chunk order. Every sum runs in a fixed
//! order, so the bits do not depend on the number of threads.

use std::ops::Range;

use rayon::prelude::*;

use crate::kernels::log_probs::cpu::{stack_rows, Online, RowGrad, RowStats};
use crate::kernels::memory;
use crate::kernels::simd::{matmul, Load, Matrix, Store};
use crate::real::Real;

/// Rows per block of the forward.
const ROWS: usize = 64;
/// Rows per block of the backward: larger, so that its gemms (k = rows for ∂W) run efficiently.
const BACKWARD_ROWS: usize = 256;
/// Vocabulary entries per tile: a tile of logits is `ROWS × VOCAB_TILE` values.
const VOCAB_TILE: usize = 2048;
/// Fixed vocabulary chunks of the backward (independent of the number of threads).
const CHUNKS: usize = 8;

/// One problem: `[N,H]` hidden states, `[V,H]` weight, optional `[V]` bias, all contiguous in
/// the compute type.
pub(crate) struct Problem<'a, R> {
    pub hidden: &'a [R],
    pub weight: &'a [R],
    pub bias: Option<&'a [R]>,
    pub targets: &'a [usize],
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub inv_t: R,
    /// Whether the logits' gemm runs on rayon's threads (for callers that do not parallelize
    /// over blocks of rows themselves).
    pub parallel: bool,
}

/// The logits' gradient `d` of one tile (`rows × width`, row-major) with the hidden states of its
/// rows (`rows × H`, silent rows zeroed) and the weight rows of its vocabulary (`width × H`).
pub(crate) struct TileGradient<'a, R> {
    pub d: &'a [R],
    pub hidden: &'a [R],
    pub weight: &'a [R],
    pub rows: usize,
    pub width: usize,
    pub h: usize,
}

impl<R: Real> TileGradient<'_, R> {
    /// `∂W[vocab] += dᵀ·hidden` (into `gw`; skipped without it: a weight that needs no
    /// gradient), `∂hidden[rows] = d·W[vocab]` (into `gh`, added to it when `gh.1`),
    /// `∂b[vocab] += Σ_rows d` (into `gb`); the gemms run on rayon's threads with `parallel`.
    pub(crate) fn accumulate(
        &self,
        gw: Option<&mut [R]>,
        gh: (&mut [R], bool),
        gb: Option<&mut [R]>,
        parallel: bool,
    ) {
        let (rows, width, h) = (self.rows, self.width, self.h);
        let d_t = Matrix {
            data: self.d,
            rows: width,
            cols: rows,
            row_stride: 1,
            col_stride: width,
        };
        let x = Matrix {
            data: self.hidden,
            rows,
            cols: h,
            row_stride: h,
            col_stride: 1,
        };
        if let Some(gw) = gw {
            matmul(gw, h, true, d_t, x, parallel);
        }
        let d = Matrix {
            data: self.d,
            rows,
            cols: width,
            row_stride: width,
            col_stride: 1,
        };
        let w = Matrix {
            data: self.weight,
            rows: width,
            cols: h,
            row_stride: h,
            col_stride: 1,
        };
        matmul(gh.0, h, gh.1, d, w, parallel);
        if let Some(gb) = gb {
            for row in self.d.chunks(width) {
                for (b, x) in gb.iter_mut().zip(row) {
                    *b = *b + *x;
                }
            }
        }
    }
}

/// `0..len` in consecutive ranges of `size`.
pub(crate) fn blocks(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len).step_by(size).map(move |s| s..(s + size).min(len))
}

impl<R: Real + Load<R> + Store<R>> Problem<'_, R> {
    /// The raw logits of `rows` × `vocab`, row-major (row stride `vocab.len()`), into `out`.
    pub(crate) fn logits(&self, rows: &Range<usize>, vocab: &Range<usize>, out: &mut [R]) {
        let (h, width) = (self.h, vocab.len());
        let hidden = Matrix {
            data: &self.hidden[rows.start * h..rows.end * h],
            rows: rows.len(),
            cols: h,
            row_stride: h,
            col_stride: 1,
        };
        // Wᵀ of the tile: element (k, v) at v·H + k.
        let weight_t = Matrix {
            data: &self.weight[vocab.start * h..vocab.end * h],
            rows: h,
            cols: width,
            row_stride: 1,
            col_stride: h,
        };
        let out = &mut out[..rows.len() * width];
        matmul(out, width, false, hidden, weight_t, self.parallel);
        if let Some(bias) = self.bias {
            for row in out.chunks_mut(width) {
                for (x, b) in row.iter_mut().zip(&bias[vocab.clone()]) {
                    *x = *x + *b;
                }
            }
        }
    }

    /// `[3·N]`: the log-probs, the entropies, the log-sum-exps.
    pub(super) fn forward(&self) -> Vec<R> {
        let starts: Vec<Range<usize>> = blocks(self.n, ROWS).collect();
        let rows: Vec<(R, R, R)> = starts
            .par_iter()
            .flat_map_iter(|rows| self.forward_block(rows))
            .collect();
        stack_rows(&rows)
    }

    fn forward_block(&self, rows: &Range<usize>) -> Vec<(R, R, R)> {
        let mut tile = vec![R::ZERO; rows.len() * VOCAB_TILE.min(self.v)];
        let mut state: Vec<Online<R>> = rows.clone().map(|_| Online::new()).collect();
        let mut z_target = vec![R::ZERO; rows.len()];
        for vocab in blocks(self.v, VOCAB_TILE) {
            let width = vocab.len();
            self.logits(rows, &vocab, &mut tile);
            for (k, row) in rows.clone().enumerate() {
                let span = &tile[k * width..(k + 1) * width];
                state[k].fold(span, self.inv_t);
                let y = self.targets[row];
                if vocab.contains(&y) {
                    z_target[k] = span[y - vocab.start] * self.inv_t;
                }
            }
        }
        state
            .iter()
            .zip(&z_target)
            .map(|(s, &z)| s.finish(z))
            .collect()
    }

    /// The gradients of `hidden` `[N·H]`, `weight` `[V·H]` and `bias` `[V]`, end to end in one
    /// buffer, from the forward's output (`res`) and its upstream gradient (`grad`).
    pub(super) fn backward(&self, res: &RowStats, grad: &RowStats) -> Vec<R> {
        let (n, h, v) = (self.n, self.h, self.v);
        let rows: Vec<RowGrad<R>> = (0..n)
            .map(|i| RowGrad::new(self.targets[i], self.inv_t, res, grad, i))
            .collect();
        // A silent row (no upstream gradient, or garbage) contributes nothing to ∂W: its hidden
        // state is zeroed, so that its garbage never meets a zero (0·NaN) in the product.
        let clean: Vec<R>;
        let hidden = if rows.iter().enumerate().any(|(i, r)| {
            r.silent()
                && self.hidden[i * h..(i + 1) * h]
                    .iter()
                    .any(|x| !x.is_finite_value())
        }) {
            clean = self
                .hidden
                .chunks(h.max(1))
                .zip(&rows)
                .flat_map(|(x, r)| x.iter().map(move |&x| R::select(r.silent(), R::ZERO, x)))
                .collect();
            &clean[..]
        } else {
            self.hidden
        };
        let chunk = v.div_ceil(CHUNKS).max(1);
        // One buffer, `[∂hidden | ∂W | ∂b]`: the op's output, written in place.
        let mut out = memory::zeroed::<R>(n * h + v * h + v);
        let (grad_hidden, rest) = out.split_at_mut(n * h);
        let (grad_weight, grad_bias) = rest.split_at_mut(v * h);
        let partials: Vec<Vec<R>> = grad_weight
            .par_chunks_mut(chunk * h.max(1))
            .zip(grad_bias.par_chunks_mut(chunk))
            .enumerate()
            .map(|(c, (gw, gb))| self.backward_chunk(hidden, c * chunk, &rows, gw, gb))
            .collect();
        for partial in &partials {
            for (g, p) in grad_hidden.iter_mut().zip(partial) {
                *g = *g + *p;
            }
        }
        out
    }

    /// One vocabulary chunk starting at `first`: accumulates its `∂W` rows (`gw`) and `∂b`
    /// (`gb`), returns its partial `∂hidden`. `clean_hidden` is the hidden states with the silent
    /// rows zeroed (for `∂W`).
    fn backward_chunk(
        &self,
        clean_hidden: &[R],
        first: usize,
        rows: &[RowGrad<R>],
        gw: &mut [R],
        gb: &mut [R],
    ) -> Vec<R> {
        let h = self.h;
        let mut partial = vec![R::ZERO; self.n * h];
        let size = BACKWARD_ROWS.min(self.n) * VOCAB_TILE.min(gb.len());
        let (mut logits, mut dlogits) = (vec![R::ZERO; size], vec![R::ZERO; size]);
        for local in blocks(gb.len(), VOCAB_TILE) {
            let vocab = first + local.start..first + local.end;
            let width = vocab.len();
            for block in blocks(self.n, BACKWARD_ROWS) {
                if rows[block.clone()].iter().all(RowGrad::silent) {
                    continue;
                }
                self.logits(&block, &vocab, &mut logits);
                for (k, i) in block.clone().enumerate() {
                    let out = &mut dlogits[k * width..(k + 1) * width];
                    if rows[i].silent() {
                        out.fill(R::ZERO);
                    } else {
                        rows[i].write(&logits[k * width..(k + 1) * width], vocab.start, out);
                    }
                }
                let tile = TileGradient {
                    d: &dlogits[..block.len() * width],
                    hidden: &clean_hidden[block.start * h..block.end * h],
                    weight: &self.weight[vocab.start * h..vocab.end * h],
                    rows: block.len(),
                    width,
                    h,
                };
                let gb = self.bias.is_some().then(|| &mut gb[local.clone()]);
                let gh = &mut partial[block.start * h..block.end * h];
                tile.accumulate(
                    Some(&mut gw[local.start * h..local.end * h]),
                    (gh, true),
                    gb,
                    false,
                );
            }
        }
        partial
    }
}
