//! Kernels and their one dispatch point, organised by op: one folder per op (`policy_loss/`,
//! `log_probs/`) holding the candle `CustomOp` and its device files side by side.
//!
//! Every objective and the token log-probs have two implementations with the same results:
//!
//! - **composed**: candle ops, gradients from candle's autograd; runs on every device;
//! - **fused**: one kernel per call that computes the loss, its metrics and its gradient in a
//!   single parallel pass (handing the gradient to the backward), or the log-probs and entropy in
//!   one streaming pass over the logits. Exists on the CPU; CUDA and Metal use the composed path
//!   until their kernels land.
//!
//! [`Backend::Auto`] (the default) picks the fused kernel wherever one exists for the inputs'
//! device; [`Backend::Composed`] forces the composed path (for checking, or to differentiate
//! twice).

use candle_core::{Layout, Storage, WithDType};

use crate::error::Error;

pub(crate) mod linear_log_probs;
pub(crate) mod linear_policy_loss;
pub(crate) mod log_probs;
pub(crate) mod policy_loss;
pub(crate) mod simd;

/// Which implementation runs.
///
/// ```
/// let loss = sapo::Sapo::default().build()?.with_backend(sapo::Backend::Composed);
/// assert_eq!(loss.backend(), sapo::Backend::Composed);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The fused kernel where one exists for the device (CPU), composed ops elsewhere.
    #[default]
    Auto,
    /// Composed candle ops and autograd, on every device.
    Composed,
}

impl Backend {
    /// Whether this backend runs the fused kernel on `device`.
    ///
    /// ```
    /// use candle_core::Device;
    /// assert!(sapo::Backend::Auto.is_fused_on(&Device::Cpu));
    /// assert!(!sapo::Backend::Composed.is_fused_on(&Device::Cpu));
    /// ```
    pub fn is_fused_on(self, device: &candle_core::Device) -> bool {
        self == Backend::Auto && device.is_cpu()
    }
}

/// The contiguous CPU slice of a tensor's storage.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("fused CPU kernel called on a non-CPU tensor")
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused kernel input must be contiguous".into()))?;
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// A crate error raised inside a kernel, carried through candle's error type.
pub(crate) fn kernel_error(err: Error) -> candle_core::Error {
    candle_core::Error::WrappedContext {
        wrapped: Box::new(err),
        context: "in a sapo kernel".into(),
    }
}

/// Recovers a crate error raised inside a kernel; other candle errors stay candle errors.
pub(crate) fn from_kernel(err: candle_core::Error) -> Error {
    match err {
        candle_core::Error::WrappedContext { wrapped, context } => {
            match wrapped.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(wrapped) => {
                    Error::Candle(candle_core::Error::WrappedContext { wrapped, context })
                }
            }
        }
        candle_core::Error::WithBacktrace { inner, .. } => from_kernel(*inner),
        other => Error::Candle(other),
    }
}
