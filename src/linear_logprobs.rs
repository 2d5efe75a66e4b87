//! Token log-probs and entropy straight from hidden states through the lm_head, without the
//! `[N,V]` logits: `logits = hidden·Wᵀ + b` exists one tile of rows × vocabulary at a time.
//! Every formula, with the peer it matches: [the formulas page](crate::formulas).
//!
//! ```text
//! x = hidden·Wᵀ + b,  z = x/τ,  ℓ = z_y − lse(z),  H = lse(z) − Σ_v p_v z_v
//! ∂/∂hidden = dx·W,   ∂/∂W = dxᵀ·hidden,   ∂/∂b = Σ_rows dx      (dx: the logits' gradient, see
//!                                                               [`crate::logprobs`])
//! ```
//!
//! A row whose hidden state or log-sum-exp is not finite (garbage at a padded position) gives NaN
//! log-prob and entropy and no gradient, on both paths. The loss stays outside (verl's contract): the function returns `ℓ` and `H`, differentiable
//! with respect to `hidden`, `weight` and `bias` under any upstream gradients, so every objective
//! composes with it. The fused CPU kernel computes each tile with gemm and an online
//! log-sum-exp, forward and backward (the backward recomputes each tile's logits), in f32 for
//! f16/bf16/f32 inputs (f64 stays f64), with the same bits whatever the number of threads.

use candle_core::{Device, Tensor, D};

use crate::checks::compute_dtype;
use crate::error::{check_device, check_float, Error, Result};
use crate::kernels::linear_log_probs::FusedLinearLogProbs;
use crate::kernels::{empty_on_gpu, from_kernel, Backend, Path};
use crate::logprobs::{check_targets, check_temperature};

pub use crate::lm_head::LmHead;

impl LmHead<'_> {
    /// Checks the head, and with `read_ids` the target ids (one host read); returns `(N, H, V)`.
    pub(crate) fn check(&self, read_ids: bool) -> Result<(usize, usize, usize)> {
        check_inputs(
            self.hidden,
            self.weight,
            self.bias,
            self.targets,
            (self.temperature, read_ids),
        )
    }
}

/// Checks the shapes, dtypes and devices, and with `read_ids` the target ids (the GPU kernels
/// check them on the device); returns `(N, H, V)`.
fn check_inputs(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    (temperature, read_ids): (f64, bool),
) -> Result<(usize, usize, usize)> {
    check_temperature(temperature)?;
    check_float("hidden", hidden)?;
    check_float("weight", weight)?;
    check_device("weight", weight, hidden)?;
    let dims = hidden.dims();
    if !(2..=3).contains(&dims.len()) {
        return Err(Error::Shape {
            arg: "hidden",
            expected: "[N, H] or [B, T, H]".into(),
            actual: dims.to_vec(),
        });
    }
    let h = dims[dims.len() - 1];
    if h == 0 {
        // No hidden features: the backward's vocabulary chunks of ∂W would be empty.
        return Err(Error::Shape {
            arg: "hidden",
            expected: "[.., H] with H >= 1".into(),
            actual: dims.to_vec(),
        });
    }
    let v = match weight.dims() {
        &[v, wh] if wh == h && v >= 1 => v,
        other => {
            return Err(Error::Shape {
                arg: "weight",
                expected: format!("[V, H] = [V, {h}] with V >= 1"),
                actual: other.to_vec(),
            })
        }
    };
    if let Some(b) = bias {
        check_float("bias", b)?;
        check_device("bias", b, hidden)?;
        if b.dims() != [v] {
            return Err(Error::Shape {
                arg: "bias",
                expected: format!("[V] = [{v}]"),
                actual: b.dims().to_vec(),
            });
        }
    }
    check_targets(targets, &dims[..dims.len() - 1], v, hidden, read_ids)?;
    Ok((dims[..dims.len() - 1].iter().product(), h, v))
}

/// Log-probs and entropies of `targets` under `softmax((hidden·Wᵀ + b)/τ)`, without the logits
/// tensor; runs the fused kernel on the CPU (see [`linear_log_probs_and_entropy_with`]).
///
/// `hidden` is `[N,H]` or `[B,T,H]`, `weight` the lm_head's `[V,H]`, `bias` `[V]`, `targets` the
/// leading dims (u8/u32/i64, ids in `[0, V)`); returns `[N]` or `[B,T]` twice, in f32 (f64 for f64
/// hidden states). Differentiable with respect to `hidden`, `weight` and `bias`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let hidden = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev)?;
/// let weight = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.0, 0.0]], &dev)?; // V = 3
/// let targets = Tensor::new(&[0u32, 1], &dev)?;
/// let (lp, h) = sapo::linear_log_probs_and_entropy(&hidden, &weight, None, &targets, 1.0)?;
/// let want = 1.0 - (1f32.exp() + 2.0).ln(); // logits [1, 0, 0], target 0
/// assert!((lp.to_vec1::<f32>()?[0] - want).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn linear_log_probs_and_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    linear_log_probs_and_entropy_with(hidden, weight, bias, targets, temperature, Backend::Auto)
}

/// [`linear_log_probs_and_entropy`] on a chosen [`Backend`]: the fused kernel, or composed candle
/// ops (the logits materialised by `matmul`, then [`crate::token_log_probs_and_entropy_with`]).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use sapo::{linear_log_probs_and_entropy_with, Backend};
/// let dev = Device::Cpu;
/// let hidden = Tensor::new(&[[0.5f32, -1.0]], &dev)?;
/// let weight = Tensor::new(&[[1f32, 2.0], [0.3, 0.1]], &dev)?;
/// let bias = Tensor::new(&[0.1f32, -0.2], &dev)?;
/// let targets = Tensor::new(&[1u32], &dev)?;
/// let (a, _) = linear_log_probs_and_entropy_with(&hidden, &weight, Some(&bias), &targets, 0.8, Backend::Auto)?;
/// let (b, _) = linear_log_probs_and_entropy_with(&hidden, &weight, Some(&bias), &targets, 0.8, Backend::Composed)?;
/// assert!((a.to_vec1::<f32>()?[0] - b.to_vec1::<f32>()?[0]).abs() < 1e-6);
/// # Ok::<(), sapo::Error>(())
/// ```
pub fn linear_log_probs_and_entropy_with(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    temperature: f64,
    backend: Backend,
) -> Result<(Tensor, Tensor)> {
    let dtype = compute_dtype(hidden.dtype());
    let path = backend.path(hidden.device(), dtype, true);
    let (n, h, _) = check_inputs(
        hidden,
        weight,
        bias,
        targets,
        (temperature, path.gpu().is_none()),
    )?;
    let lead = &hidden.dims()[..hidden.rank() - 1];
    if empty_on_gpu(hidden) {
        // No row: computed on the CPU (see `empty_on_gpu`), the results moved back.
        let empty = hidden
            .to_device(&Device::Cpu)?
            .reshape((n, h))?
            .to_dtype(dtype)?
            .sum(D::Minus1)?
            .to_device(hidden.device())?;
        return Ok((empty.reshape(lead)?, empty.reshape(lead)?));
    }
    let hidden_2d = hidden.reshape((n, h))?.to_dtype(dtype)?;
    let weight = weight.to_dtype(dtype)?;
    let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
    let targets = targets.flatten_all()?;
    let (log_probs, entropy) = if n == 0 {
        // Empty batch: empty results, still connected to the hidden states.
        let empty = hidden_2d.sum(D::Minus1)?;
        (empty.clone(), empty)
    } else {
        match path {
            Path::Composed => composed(&hidden_2d, &weight, bias.as_ref(), &targets, temperature)?,
            path => FusedLinearLogProbs::forward(
                &hidden_2d,
                &weight,
                bias.as_ref(),
                &targets,
                temperature,
                path.gpu(),
            )
            .map_err(from_kernel)?,
        }
    };
    Ok((log_probs.reshape(lead)?, entropy.reshape(lead)?))
}

/// The composed path on `[N,H]` hidden states. A row whose hidden state is not finite (garbage
/// at padding) is computed on zeros and reported as NaN, so its garbage never meets a zero in the
/// weight's gradient (`0·NaN`), as in the kernel.
fn composed(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    let finite = hidden.abs()?.lt(f64::INFINITY)?.to_dtype(hidden.dtype())?;
    let valid = finite.min_keepdim(D::Minus1)?.ne(0.0)?;
    let hidden = valid
        .broadcast_as(hidden.shape())?
        .where_cond(hidden, &hidden.zeros_like()?)?;
    let logits = hidden.matmul(&weight.t()?)?;
    let logits = match bias {
        Some(b) => logits.broadcast_add(b)?,
        None => logits,
    };
    let (log_probs, entropy) = crate::logprobs::token_log_probs_and_entropy_with(
        &logits,
        targets,
        temperature,
        Backend::Composed,
    )?;
    let valid = valid.squeeze(D::Minus1)?;
    let nan = log_probs.ones_like()?.affine(f64::NAN, 0.0)?;
    Ok((
        valid.where_cond(&log_probs, &nan)?,
        valid.where_cond(&entropy, &nan)?,
    ))
}
