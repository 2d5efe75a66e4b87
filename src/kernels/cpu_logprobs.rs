//! Fused CPU kernel for token log-probs and entropy from logits.
//!
//! Forward: one streaming pass per row — blocks of the row give a block maximum, the running
//! log-sum-exp is rescaled once per block (online max), and `Σ e^{z−max}` and `Σ e^{z−max}·z`
//! are accumulated in lanes — then `ℓ = z_y − lse`, `H = lse − Σ p·z`. Backward: the softmax is
//! recomputed on the fly and the logits' gradient written once. No `[N,V]` temporary exists
//! besides that gradient; f16/bf16 logits are read in place and accumulated in f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use super::cpu_slice;
use super::simd::{multiversion, Load, Real, Store, LANES};

/// Block of the online maximum: fits L1 comfortably.
const BLOCK: usize = 512;

/// `[N, V]` logits → `[N, 2]` (`ℓ`, `H`); the targets ride along.
pub(crate) struct FusedLogProbs {
    /// `[N]`, contiguous, u8/u32/i64, ids already checked to be in `[0, V)`.
    pub targets: Tensor,
    pub temperature: f64,
}

fn target_ids(targets: &Tensor) -> candle_core::Result<Vec<usize>> {
    Ok(match targets.dtype() {
        DType::U8 => targets
            .to_vec1::<u8>()?
            .into_iter()
            .map(usize::from)
            .collect(),
        DType::U32 => targets
            .to_vec1::<u32>()?
            .into_iter()
            .map(|v| v as usize)
            .collect(),
        _ => targets
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as usize)
            .collect(),
    })
}

/// Adds `e^{z−max}` and `e^{z−max}·z` of one lane block to the lane sums.
#[inline(always)]
fn accumulate<F: Load<R>, R: Real>(
    block: &[F; LANES],
    inv_t: R,
    max: R,
    sum: &mut [R; LANES],
    weighted: &mut [R; LANES],
) {
    for l in 0..LANES {
        let z = block[l].load() * inv_t;
        let e = (z - max).exp();
        sum[l] = sum[l] + e;
        // e = 0 for z = −inf: keep 0·(−inf) out of the sum.
        weighted[l] = weighted[l] + R::select(e > R::ZERO, e * z, R::ZERO);
    }
}

/// Moves the running maximum up to `block_max`, rescaling the sums accumulated against the old
/// one (`e^{−inf} = 0` at the start).
#[inline(always)]
fn rescale<R: Real>(block_max: R, max: &mut R, sum: &mut R, weighted: &mut R) {
    if block_max > *max {
        let scale = (*max - block_max).exp();
        *sum = *sum * scale;
        *weighted = *weighted * scale;
        *max = block_max;
    }
}

#[inline(always)]
fn forward_row<F: Load<R>, R: Real>(row: &[F], target: usize, inv_t: R) -> (R, R) {
    let neg_inf = -R::INFINITY;
    let (chunks, tail) = row.as_chunks::<LANES>();
    // The tail, padded with −inf (which contributes nothing), is one more lane block.
    let mut padded_tail = [neg_inf; LANES];
    for (p, v) in padded_tail.iter_mut().zip(tail) {
        *p = v.load() * inv_t;
    }
    let mut max = neg_inf;
    let mut sum = R::ZERO;
    let mut weighted = R::ZERO;
    for group in chunks.chunks(BLOCK / LANES) {
        let mut lane_max = [neg_inf; LANES];
        for block in group {
            for l in 0..LANES {
                lane_max[l] = lane_max[l].max_of(block[l].load() * inv_t);
            }
        }
        let block_max = lane_max.iter().fold(neg_inf, |m, &v| m.max_of(v));
        rescale(block_max, &mut max, &mut sum, &mut weighted);
        if max == neg_inf {
            continue;
        }
        let mut lane_sum = [R::ZERO; LANES];
        let mut lane_weighted = [R::ZERO; LANES];
        for block in group {
            accumulate(block, inv_t, max, &mut lane_sum, &mut lane_weighted);
        }
        for l in 0..LANES {
            sum = sum + lane_sum[l];
            weighted = weighted + lane_weighted[l];
        }
    }
    if !tail.is_empty() {
        let block_max = padded_tail.iter().fold(neg_inf, |m, &v| m.max_of(v));
        rescale(block_max, &mut max, &mut sum, &mut weighted);
        if max > neg_inf {
            for z in padded_tail {
                let e = (z - max).exp();
                sum = sum + e;
                weighted = weighted + R::select(e > R::ZERO, e * z, R::ZERO);
            }
        }
    }
    let lse = max + sum.ln();
    let log_prob = row[target].load() * inv_t - lse;
    let entropy = lse - weighted / sum;
    (log_prob, entropy)
}

multiversion!(fn forward_row_best<F: Load<R>, R: Real>(row: &[F], target: usize, inv_t: R) -> (R, R) = forward_row);

/// What the backward of one row needs besides its logits.
#[derive(Clone, Copy)]
struct RowGrad<R> {
    target: usize,
    inv_t: R,
    log_prob: R,
    entropy: R,
    grad_log_prob: R,
    grad_entropy: R,
}

/// Writes `∂(g_ℓ·ℓ + g_H·H)/∂logits` of one row.
#[inline(always)]
fn backward_row<F: Load<R> + Store<R>, R: Real>(row: &[F], out: &mut [F], r: RowGrad<R>) {
    let RowGrad {
        target,
        inv_t,
        log_prob,
        entropy,
        grad_log_prob,
        grad_entropy,
    } = r;
    let lse = row[target].load() * inv_t - log_prob;
    let shift = entropy - lse;
    for (dst, x) in out.iter_mut().zip(row) {
        *dst = F::store(softmax_grad(
            x.load(),
            inv_t,
            lse,
            shift,
            grad_log_prob,
            grad_entropy,
        ));
    }
    let at_target = softmax_grad(
        row[target].load(),
        inv_t,
        lse,
        shift,
        grad_log_prob,
        grad_entropy,
    );
    out[target] = F::store(at_target + inv_t * grad_log_prob);
}

/// `−(g_ℓ·p + g_H·p·(z − lse + H))/τ` for one logit, with `p = e^{z−lse}` recomputed.
#[inline(always)]
fn softmax_grad<R: Real>(x: R, inv_t: R, lse: R, shift: R, grad_log_prob: R, grad_entropy: R) -> R {
    let z = x * inv_t;
    let p = (z - lse).exp();
    let term = R::select(p > R::ZERO, p * (z + shift), R::ZERO);
    -(inv_t * (grad_log_prob * p + grad_entropy * term))
}

multiversion!(fn backward_row_best<F: Load<R> | Store<R>, R: Real>(row: &[F], out: &mut [F], r: RowGrad<R>) -> () = backward_row);

impl FusedLogProbs {
    fn forward<F: Load<R> + WithDType, R: Real>(
        &self,
        logits: &[F],
        vocab: usize,
    ) -> candle_core::Result<Vec<R>> {
        let targets = target_ids(&self.targets)?;
        let inv_t = R::from_f64(1.0 / self.temperature);
        let rows: Vec<(R, R)> = logits
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &y)| forward_row_best(row, y, inv_t))
            .collect();
        Ok(rows.into_iter().flat_map(|(l, h)| [l, h]).collect())
    }

    fn backward<F: Load<R> + Store<R> + WithDType, R: Real>(
        &self,
        logits: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (n, vocab) = logits.dims2()?;
        let targets = target_ids(&self.targets)?;
        let res = res.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let upstream = grad_res.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let (guard, layout) = logits.storage_and_layout();
        let x = cpu_slice::<F>(&guard, layout)?;
        let inv_t = R::from_f64(1.0 / self.temperature);
        let mut grad = vec![F::store(R::ZERO); n * vocab];
        grad.par_chunks_mut(vocab)
            .zip(x.par_chunks(vocab))
            .enumerate()
            .for_each(|(i, (out, row))| {
                let r = RowGrad {
                    target: targets[i],
                    inv_t,
                    log_prob: R::from_f64(res[i][0]),
                    entropy: R::from_f64(res[i][1]),
                    grad_log_prob: R::from_f64(upstream[i][0]),
                    grad_entropy: R::from_f64(upstream[i][1]),
                };
                backward_row_best(row, out, r)
            });
        Tensor::from_vec(grad, (n, vocab), logits.device())
    }
}

impl CustomOp1 for FusedLogProbs {
    fn name(&self) -> &'static str {
        "sapo-fused-token-log-probs"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = layout.shape().dims2()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("logits must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward::<f32, f32>(&v[start..end], vocab)?),
            CpuStorage::F16(v) => CpuStorage::F32(self.forward::<f16, f32>(&v[start..end], vocab)?),
            CpuStorage::BF16(v) => {
                CpuStorage::F32(self.forward::<bf16, f32>(&v[start..end], vocab)?)
            }
            CpuStorage::F64(v) => CpuStorage::F64(self.forward::<f64, f64>(&v[start..end], vocab)?),
            other => candle_core::bail!("logits: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match arg.dtype() {
            DType::F32 => self.backward::<f32, f32>(arg, res, grad_res)?,
            DType::F16 => self.backward::<f16, f32>(arg, res, grad_res)?,
            DType::BF16 => self.backward::<bf16, f32>(arg, res, grad_res)?,
            DType::F64 => self.backward::<f64, f64>(arg, res, grad_res)?,
            other => candle_core::bail!("logits: unsupported dtype {other:?}"),
        }))
    }
}
