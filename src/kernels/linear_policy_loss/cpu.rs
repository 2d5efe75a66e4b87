//! The policy loss straight from hidden states on the CPU, in one sweep: traversal and memory
//! only — the per-token formulas are the policy kernel's (`token_terms`, `kl_terms`) and the
//! log-probs' (`Online`, `RowGrad`).
//!
//! Blocks of `TOKENS` tokens run one after the other; for each, one gemm gives the block's
//! logits over the whole vocabulary, then every token (in parallel) folds its row into its
//! log-prob, evaluates the objective's gradient `∂loss/∂ℓ` at once, and writes its logits'
//! gradient; two more gemms accumulate `∂W` and write `∂hidden`. Three gemms per block, and the
//! logits never exist for more than one block. The gemms split their outputs over the threads,
//! so the bits do not depend on the thread count.

use rayon::prelude::*;

use crate::kernels::linear_log_probs::cpu::{blocks, Problem, TileGradient};
use crate::kernels::log_probs::cpu::{Online, RowGrad};
use crate::kernels::memory;
use crate::kernels::policy_loss::cpu::{Constants, WithShape};
use crate::kernels::simd::{Load, Store};
use crate::losses::chain::{effective_weight, kl_terms, token_terms, SequenceRatio, TokenInputs};
use crate::losses::objective::Shape;
use crate::real::Real;

/// Tokens per block: their logits over the whole vocabulary exist at once.
const TOKENS: usize = 128;

/// What the sweep returns: the log-probs `[N]` (for the loss's value and metrics) and the
/// gradients of the hidden states `[N·H]`, the weight `[V·H]` (when asked for) and the bias `[V]`.
pub(super) struct Gradients<R> {
    pub log_probs: Vec<R>,
    pub hidden: Vec<R>,
    pub weight: Option<Vec<R>>,
    pub bias: Vec<R>,
}

/// The sweep as a body run with the config's trust-region shape.
pub(super) struct Sweep<'a, 'b, M, R> {
    pub lin: &'a Problem<'b, R>,
    pub c: &'a Constants<'b, R, M, R>,
    /// Whether `∂W` is wanted (a frozen lm_head needs none: one gemm of three saved per block).
    pub weight_gradient: bool,
}

impl<M: Load<R> + Sync, R: Real + Load<R> + Store<R>> WithShape<R> for Sweep<'_, '_, M, R> {
    type Output = Gradients<R>;
    fn run<S: Shape<R>>(self, shape: &S) -> Gradients<R> {
        sweep(self.lin, self.c, shape, self.weight_gradient)
    }
}

fn sweep<M, R, S>(
    lin: &Problem<'_, R>,
    c: &Constants<'_, R, M, R>,
    shape: &S,
    weight_gradient: bool,
) -> Gradients<R>
where
    M: Load<R> + Sync,
    R: Real + Load<R> + Store<R>,
    S: Shape<R>,
{
    let (n, h, v) = (lin.n, lin.h, lin.v);
    let mut out = Gradients {
        log_probs: vec![R::ZERO; n],
        hidden: memory::zeroed(n * h),
        weight: weight_gradient.then(|| memory::zeroed(v * h)),
        bias: vec![R::ZERO; v],
    };
    let size = TOKENS.min(n);
    let (mut logits, mut dlogits) = (memory::zeroed(size * v), memory::zeroed(size * v));
    let mut clean = vec![R::ZERO; size * h];
    for block in blocks(n, TOKENS) {
        let rows = block.len();
        lin.logits(&block, &(0..v), &mut logits);
        let silent: Vec<bool> = logits[..rows * v]
            .par_chunks(v)
            .zip(dlogits[..rows * v].par_chunks_mut(v))
            .zip(out.log_probs[block.clone()].par_iter_mut())
            .enumerate()
            .map(|(k, ((row, dl), lp))| token_step(lin, c, shape, block.start + k, row, dl, lp))
            .collect();
        // The hidden states of silent tokens are zeroed for ∂W: their garbage must not meet a
        // zero gradient (0·NaN).
        let hidden = &lin.hidden[block.start * h..block.end * h];
        for ((dst, src), &quiet) in clean
            .chunks_mut(h.max(1))
            .zip(hidden.chunks(h.max(1)))
            .zip(&silent)
        {
            if quiet {
                dst.fill(R::ZERO);
            } else {
                dst.copy_from_slice(src);
            }
        }
        let tile = TileGradient {
            d: &dlogits[..rows * v],
            hidden: &clean[..rows * h],
            weight: lin.weight,
            rows,
            width: v,
            h,
        };
        let gh = &mut out.hidden[block.start * h..block.end * h];
        let gb = lin.bias.is_some().then_some(&mut out.bias[..]);
        tile.accumulate(out.weight.as_deref_mut(), (gh, false), gb, true);
    }
    out
}

/// One token: its log-prob (into `lp`), the objective's gradient at it, and its logits'
/// gradient (into `dl`); returns whether the token is silent (no gradient).
#[inline(always)]
fn token_step<M, R, S>(
    lin: &Problem<'_, R>,
    c: &Constants<'_, R, M, R>,
    shape: &S,
    token: usize,
    row: &[R],
    dl: &mut [R],
    lp: &mut R,
) -> bool
where
    M: Load<R>,
    R: Real + Load<R> + Store<R>,
    S: Shape<R>,
{
    let mut online = Online::new();
    online.fold(row, lin.inv_t);
    let target = lin.targets[token];
    let (log_prob, entropy, lse) = online.finish(row[target] * lin.inv_t);
    *lp = log_prob;
    let x = &c.x;
    let i = token / x.t;
    let grad_log_prob = if x.mask[token].load() != R::ZERO {
        let adv = x.advantages[if x.per_token_advantages { token } else { i }];
        let w = x.weights.map_or(R::ONE, |w| w[token]);
        let coef = &c.coefficients[i];
        let seq = SequenceRatio::token_level();
        let inputs = TokenInputs {
            old: x.old[token],
            adv,
            w: effective_weight::<R, S>(w, R::ONE),
            flag: x.flags.map_or(R::ZERO, |f| f[token]),
        };
        let terms = token_terms(log_prob, inputs, &c.p, shape, coef.policy, seq);
        match (c.p.kl, x.reference) {
            (Some(kl), Some(r)) => {
                let ratio = (terms.r, terms.dr);
                terms.g + kl_terms(kl, R::ONE, coef.kl, log_prob, r[token], ratio).2
            }
            _ => terms.g,
        }
    } else {
        R::ZERO
    };
    let g = RowGrad::from_values(target, lin.inv_t, (lse, entropy), (grad_log_prob, R::ZERO));
    if g.silent() {
        dl.fill(R::ZERO);
    } else {
        g.write(row, 0, dl);
    }
    g.silent()
}
