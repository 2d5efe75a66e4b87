//! Token log-probs and entropy from logits, without a softmax tensor in the result.
//!
//! With temperature `τ`, `z = logits/τ`, `lse = log Σ_v e^{z_v}`:
//!
//! ```text
//! ℓ = z_y − lse                         log-prob of the target y
//! H = lse − Σ_v p_v z_v,  p = e^{z−lse}  entropy
//! ∂ℓ/∂logits_v = (1[v=y] − p_v)/τ,   ∂H/∂logits_v = −p_v (z_v − lse + H)/τ
//! ```
//!
//! Callers shift: `logits[.., t, :]` must already be aligned with `targets[.., t]`.

use candle_core::{DType, Tensor, D};

use crate::error::{check_config, check_device, check_float, Error, Result};
use crate::inputs::compute_dtype;
use crate::kernels::cpu_logprobs::FusedLogProbs;
use crate::kernels::{from_kernel, Backend};

fn check_inputs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<()> {
    check_config(
        temperature.is_finite() && temperature > 0.0,
        "temperature",
        "finite and > 0",
        temperature,
    )?;
    check_float("logits", logits)?;
    let dims = logits.dims();
    if !(2..=3).contains(&dims.len()) || dims[dims.len() - 1] == 0 {
        return Err(Error::Shape {
            arg: "logits",
            expected: "[B, T, V] or [N, V] with V >= 1".into(),
            actual: dims.to_vec(),
        });
    }
    let lead = &dims[..dims.len() - 1];
    if targets.dims() != lead {
        return Err(Error::Shape {
            arg: "targets",
            expected: format!("{lead:?} (the logits' leading dims)"),
            actual: targets.dims().to_vec(),
        });
    }
    check_device("targets", targets, logits)?;
    if !matches!(targets.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::DType {
            arg: "targets",
            expected: "an integer dtype (u8, u32, i64)",
            actual: targets.dtype(),
        });
    }
    if targets.elem_count() > 0 {
        let vocab = dims[dims.len() - 1];
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

/// `(z, lse, e)` with `z = logits/τ` in the compute dtype, `lse` keeping the last dim, and
/// `e = exp(z − max)`.
fn log_sum_exp(logits: &Tensor, temperature: f64) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let z = logits
        .to_dtype(compute_dtype(logits.dtype()))?
        .affine(1.0 / temperature, 0.0)?;
    let max = z.max_keepdim(D::Minus1)?.detach();
    let shifted = z.broadcast_sub(&max)?.exp()?;
    let sum = shifted.sum_keepdim(D::Minus1)?;
    let lse = (sum.log()? + max)?;
    Ok((z, lse, shifted, sum))
}

fn gather_target(z: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(z.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?)
}

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
    check_inputs(logits, targets, temperature)?;
    if backend.is_fused_on(logits.device()) {
        fused(logits, targets, temperature)
    } else {
        composed(logits, targets, temperature)
    }
}

fn fused(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let dims = logits.dims();
    let (lead, vocab) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
    let rows: usize = lead.iter().product();
    let flat = logits.reshape((rows, vocab))?.contiguous()?;
    let op = FusedLogProbs {
        targets: targets.flatten_all()?.contiguous()?,
        temperature,
    };
    let out = flat.apply_op1(op).map_err(from_kernel)?;
    Ok((
        out.narrow(1, 0, 1)?.reshape(lead)?,
        out.narrow(1, 1, 1)?.reshape(lead)?,
    ))
}

fn composed(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<(Tensor, Tensor)> {
    let (z, lse, shifted, sum) = log_sum_exp(logits, temperature)?;
    let log_probs = (gather_target(&z, targets)? - &lse)?.squeeze(D::Minus1)?;
    let probs = shifted.broadcast_div(&sum)?;
    let mean_z = probs.mul(&z)?.sum_keepdim(D::Minus1)?;
    let entropy = (lse - mean_z)?.squeeze(D::Minus1)?;
    Ok((log_probs, entropy))
}
