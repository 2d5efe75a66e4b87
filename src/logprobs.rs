//! Token log-probs and entropy from logits, without a softmax tensor in the result.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! With temperature `τ`, `z = logits/τ`, `lse = log Σ_v e^{z_v}`:
//!
//! ```text
//! ℓ = z_y − lse                         log-prob of the target y
//! H = lse − Σ_v p_v z_v,  p = e^{z−lse}  entropy (p_v·z_v = 0 where p_v = 0, e.g. z_v = −∞)
//! ∂ℓ/∂logits_v = (1[v=y] − p_v)/τ,   ∂H/∂logits_v = −p_v (z_v − lse + H)/τ
//! ```
//!
//! Callers shift: `logits[.., t, :]` must already be aligned with `targets[.., t]`. A row whose
//! `lse` is not finite (every logit −∞, a NaN, a +∞: garbage at a padded position) gives NaN
//! log-prob and entropy and **no gradient**, on every path, so padding never reaches the logits'
//! gradient. Both forms live here: the tensor form (composed ops) and the scalar forms the
//! kernels run per row and per logit.

use candle_core::{DType, Device, Tensor, D};

use crate::checks::compute_dtype;
use crate::error::{check_device, check_float, check_positive_scale, Error, Result};
use crate::kernels::log_probs::FusedLogProbs;
use crate::kernels::{empty_on_gpu, from_kernel, Backend, Path};

/// Checks that the sampling temperature `T` is finite and > 0 with `1/T` finite in f32.
pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    check_positive_scale(
        "temperature",
        temperature,
        1.0,
        "finite and > 0, with 1/temperature finite in f32",
    )
}

/// Checks that `targets` has the shape `lead`, an integer dtype, `reference`'s device and, with
/// `read_ids`, ids in `[0, vocab)` (one host read; the GPU kernels check the ids themselves).
pub(crate) fn check_targets(
    targets: &Tensor,
    lead: &[usize],
    vocab: usize,
    reference: &Tensor,
    read_ids: bool,
) -> Result<()> {
    if targets.dims() != lead {
        return Err(Error::Shape {
            arg: "targets",
            expected: format!("{lead:?} (the leading dims)"),
            actual: targets.dims().to_vec(),
        });
    }
    check_device("targets", targets, reference)?;
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::DType {
            arg: "targets",
            expected: "an integer dtype (u8, u32, i64)",
            actual: targets.dtype(),
        });
    }
    if read_ids && targets.elem_count() > 0 {
        let flat = targets.flatten_all()?.to_dtype(DType::F64)?;
        let (min, max) = (
            flat.min(0)?.to_scalar::<f64>()?,
            flat.max(0)?.to_scalar::<f64>()?,
        );
        if min < 0.0 || max >= vocab as f64 {
            return Err(Error::InvalidValue {
                arg: "targets",
                expected: format!("ids in [0, V) = [0, {vocab})"),
                actual: format!("ids in [{min}, {max}]"),
            });
        }
    }
    Ok(())
}

fn check_inputs(logits: &Tensor, targets: &Tensor, temperature: f64, read_ids: bool) -> Result<()> {
    check_temperature(temperature)?;
    check_float("logits", logits)?;
    let dims = logits.dims();
    if !(2..=3).contains(&dims.len()) || dims[dims.len() - 1] == 0 {
        return Err(Error::Shape {
            arg: "logits",
            expected: "[B, T, V] or [N, V] with V >= 1".into(),
            actual: dims.to_vec(),
        });
    }
    check_targets(
        targets,
        &dims[..dims.len() - 1],
        dims[dims.len() - 1],
        logits,
        read_ids,
    )
}

// ---------------------------------------------------------------------------------------------
// Public functions and the tensor form.

/// Log-probs `ℓ = z_y − lse` of the `targets` under `softmax(logits/τ)`, differentiable with
/// respect to `logits`.
///
/// `logits` is `[B,T,V]` or `[N,V]` (f16/bf16/f32 computed in f32, f64 in f64), `targets` the
/// leading dims in u8/u32/i64 with ids in `[0, V)`. Returns `[B,T]` or `[N]`. Runs the fused
/// kernel on the CPU (see [`token_log_probs_and_entropy_with`] to choose).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::new(&[[0f32, 0.0], [2.0, 0.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[1u32, 0], &Device::Cpu)?;
/// let lp = sapo::token_log_probs(&logits, &targets, 1.0)?.to_vec1::<f32>()?;
/// assert!((lp[0] - 0.5f32.ln()).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn token_log_probs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    Ok(token_log_probs_and_entropy_with(logits, targets, temperature, Backend::Auto)?.0)
}

/// Log-probs (as [`token_log_probs`]) and entropies `H = lse − Σ p·z`, both differentiable with
/// respect to `logits`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let logits = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu)?;
/// let targets = Tensor::zeros((1, 2), candle_core::DType::U32, &Device::Cpu)?;
/// let (lp, h) = sapo::token_log_probs_and_entropy(&logits, &targets, 1.0)?;
/// let h = h.to_vec2::<f32>()?;
/// assert!((h[0][0] - 4f32.ln()).abs() < 1e-6); // uniform over 4
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn token_log_probs_and_entropy(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    token_log_probs_and_entropy_with(logits, targets, temperature, Backend::Auto)
}

/// [`token_log_probs_and_entropy`] on a chosen [`Backend`]: the fused kernel (one streaming pass
/// over the logits forward, the softmax recomputed on the fly backward, no `[B,T,V]` temporary
/// besides the logits' gradient) or composed candle ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{token_log_probs_and_entropy_with, Backend};
/// let logits = Tensor::new(&[[1f32, 2.0, 3.0]], &Device::Cpu)?;
/// let targets = Tensor::new(&[2u32], &Device::Cpu)?;
/// let (fused, _) = token_log_probs_and_entropy_with(&logits, &targets, 0.7, Backend::Auto)?;
/// let (composed, _) = token_log_probs_and_entropy_with(&logits, &targets, 0.7, Backend::Composed)?;
/// let (a, b) = (fused.to_vec1::<f32>()?[0], composed.to_vec1::<f32>()?[0]);
/// assert!((a - b).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn token_log_probs_and_entropy_with(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
    backend: Backend,
) -> Result<(Tensor, Tensor)> {
    // The GPU kernels check the target ids on the device (no host read).
    let path = backend.path(logits.device(), logits.dtype(), true);
    check_inputs(logits, targets, temperature, path.gpu().is_none())?;
    if empty_on_gpu(logits) {
        // No row: computed on the CPU (see `empty_on_gpu`), the results moved back.
        let (cpu, device) = (&Device::Cpu, logits.device());
        let (log_probs, entropy) = token_log_probs_and_entropy_with(
            &logits.to_device(cpu)?,
            &targets.to_device(cpu)?,
            temperature,
            backend,
        )?;
        return Ok((log_probs.to_device(device)?, entropy.to_device(device)?));
    }
    let dims = logits.dims();
    let (lead, vocab) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
    let rows: usize = lead.iter().product();
    let flat = logits.reshape((rows, vocab))?;
    let targets = targets.flatten_all()?.contiguous()?;
    let (log_probs, entropy) = match path {
        Path::Composed => composed(&flat, &targets, temperature)?,
        path => {
            FusedLogProbs::forward(&flat, &targets, temperature, path.gpu()).map_err(from_kernel)?
        }
    };
    Ok((log_probs.reshape(lead)?, entropy.reshape(lead)?))
}

/// The composed path on `[N,V]` logits: `([N], [N])`.
fn composed(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let z = logits
        .to_dtype(compute_dtype(logits.dtype()))?
        .affine(1.0 / temperature, 0.0)?;
    if z.dim(0)? == 0 {
        // Empty batch: empty results, still connected to the logits.
        let empty = z.sum(D::Minus1)?;
        return Ok((empty.clone(), empty));
    }
    // Rows with a non-finite lse (garbage: a NaN, a +∞, or every logit −∞, i.e. exactly the rows
    // whose maximum is not finite or that hold a NaN) are computed on zeros (no gradient) and
    // reported as NaN.
    let raw = z.detach();
    let finite_max = raw.max_keepdim(D::Minus1)?.abs()?.lt(f64::INFINITY)?;
    let nans = raw.ne(&raw)?.to_dtype(DType::F32)?.sum_keepdim(D::Minus1)?;
    let valid = finite_max
        .to_dtype(DType::F32)?
        .mul(&nans.eq(0.0)?.to_dtype(DType::F32)?)?
        .ne(0.0)?;
    let z = valid
        .broadcast_as(z.shape())?
        .where_cond(&z, &z.zeros_like()?)?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?.exp()?;
    let sum = shifted.sum_keepdim(D::Minus1)?;
    let lse = (sum.log()? + max)?;
    let target = z.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?;
    let log_probs = (target - &lse)?;
    // p·z with p = 0 where z = −∞: the −∞ never enters a product (nor its gradient).
    let finite = z.abs()?.lt(f64::INFINITY)?;
    let z_finite = finite.where_cond(&z, &z.zeros_like()?)?;
    let mean_z = shifted
        .broadcast_div(&sum)?
        .mul(&z_finite)?
        .sum_keepdim(D::Minus1)?;
    let entropy = (&lse - mean_z)?;
    let nan = lse.ones_like()?.affine(f64::NAN, 0.0)?.detach();
    let report =
        |x: Tensor| -> Result<Tensor> { Ok(valid.where_cond(&x, &nan)?.squeeze(D::Minus1)?) };
    Ok((report(log_probs)?, report(entropy)?))
}
