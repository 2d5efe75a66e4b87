//! Kernels and their one dispatch point, organised by op: one folder per op (`policy_loss/`,
//! `log_probs/`) holding the candle `CustomOp` and its device files side by side.
//!
//! Every objective and the token log-probs have two implementations with the same results:
//!
//! - **composed**: candle ops, gradients from candle's autograd; runs on every device;
//! - **fused**: one kernel per call that computes the loss, its metrics and its gradient in a
//!   single parallel pass (handing the gradient to the backward), or the log-probs and entropy in
//!   one streaming pass over the logits. On the CPU (`cpu.rs`), with the `cuda` feature on CUDA
//!   (`<op>.cu` + `cuda.rs`), with the `metal` feature on Metal (`<op>.metal` + `metal.rs`). The
//!   GPU kernels' bodies are one source (`<op>.h`, in the common subset of CUDA C++ and MSL,
//!   `gpu/common.h`); `.cu` and `.metal` hold only each language's entry points.
//!
//! [`Backend::path`] is the one dispatch point. [`Backend::Auto`] (the default) picks the fused
//! kernels that have run on their hardware (the CPU's and the CUDA kernels; the Metal kernels
//! have run in simulation only so far); [`Backend::Fused`] picks every fused kernel that exists for the
//! device; [`Backend::Composed`] forces the composed path (for checking, or to differentiate
//! twice).
//!
//! The CUDA and Metal sources are also compiled with g++ and the shim `gpu/shim.h` and run on the
//! CPU by the tests (the internal `gpu-sim` feature, [`crate::simulation`]: `Backend::Fused`
//! calls on a thread that simulates a GPU), against the CPU kernels.

use candle_core::{DType, Layout, Storage, WithDType};

use crate::error::Error;

pub(crate) mod gpu;
pub(crate) mod linear_log_probs;
pub(crate) mod linear_policy_loss;
pub(crate) mod log_probs;
pub(crate) mod memory;
pub(crate) mod policy_loss;
pub(crate) mod simd;

/// Whether `tensor` holds no element and lives on a GPU. candle 0.11's CUDA backend launches a
/// grid of zero blocks for a cast, a comparison, a selection or a reduction of an empty tensor,
/// which the driver refuses (`CUDA_ERROR_INVALID_VALUE`, first seen on an H200): the public
/// entry points compute a batch of no token on the CPU, where there is nothing to compute, and
/// move the results back. `to_device` is differentiable in candle, so gradients still reach the
/// inputs on the GPU (empty, as on the CPU).
pub(crate) fn empty_on_gpu(tensor: &candle_core::Tensor) -> bool {
    tensor.elem_count() == 0 && !tensor.device().is_cpu()
}

/// Which implementation runs.
///
/// ```
/// let loss = sapo::Sapo::default().build()?.with_backend(sapo::Backend::Composed);
/// assert_eq!(loss.backend(), sapo::Backend::Composed);
/// # Ok::<(), sapo::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The fused kernels that have run on their hardware: the CPU's and (with the `cuda`
    /// feature) the CUDA kernels, which passed the golden cases, the GPU-against-CPU tests, the
    /// property tests and compute-sanitizer on an H200 (see the README). The Metal kernels have
    /// run in simulation only, so on Metal `Auto` runs the composed ops.
    #[default]
    Auto,
    /// The fused kernel wherever one exists for the device and dtype: the CPU's, with the `cuda`
    /// feature the CUDA kernels and with the `metal` feature the Metal kernels (f32/f16/bf16
    /// inputs; f64 runs composed).
    Fused,
    /// Composed candle ops and autograd, on every device.
    Composed,
}

/// Where one call of an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    /// The CPU kernel.
    Cpu,
    /// The GPU kernels: on a CUDA or Metal device, or simulated on the CPU.
    Gpu(Gpu),
    /// Composed candle ops.
    Composed,
}

/// Which GPU kernels a [`Path::Gpu`] call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gpu {
    /// The device's own: CUDA or Metal, as the tensors' device.
    Device,
    /// Their sources, run on the CPU by the simulation.
    #[cfg(feature = "gpu-sim")]
    Simulated(gpu::sim::Target),
}

impl Path {
    /// The GPU kernels this path runs, if any.
    pub(crate) fn gpu(self) -> Option<Gpu> {
        match self {
            Path::Gpu(gpu) => Some(gpu),
            _ => None,
        }
    }
}

impl Gpu {
    /// The simulation target of a GPU call whose tensors are on the CPU: only the simulation
    /// runs GPU kernels there.
    #[cfg(feature = "gpu-sim")]
    pub(crate) fn simulated(self) -> candle_core::Result<gpu::sim::Target> {
        match self {
            Gpu::Simulated(target) => Ok(target),
            Gpu::Device => candle_core::bail!("the GPU kernels need a CUDA or Metal device"),
        }
    }
}

impl Backend {
    /// Whether this backend runs a fused kernel for inputs of `dtype` on `device` (for an op
    /// that has a GPU kernel).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// assert!(sapo::Backend::Auto.is_fused_on(&Device::Cpu, DType::F32));
    /// assert!(!sapo::Backend::Composed.is_fused_on(&Device::Cpu, DType::F32));
    /// ```
    pub fn is_fused_on(self, device: &candle_core::Device, dtype: DType) -> bool {
        self.path(device, dtype, true) != Path::Composed
    }

    /// Where an op runs on `device` for inputs of `dtype`, given whether it has a GPU kernel.
    pub(crate) fn path(self, device: &candle_core::Device, dtype: DType, gpu_kernel: bool) -> Path {
        let gpu_dtype = gpu_kernel && matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        // This crate's tests: the GPU kernel sources simulated on the CPU (`crate::simulation`),
        // fused where a GPU would be.
        #[cfg(feature = "gpu-sim")]
        if let (Backend::Fused, true, Some(target)) = (self, device.is_cpu(), gpu::sim::current()) {
            return if gpu_dtype {
                Path::Gpu(Gpu::Simulated(target))
            } else {
                Path::Composed
            };
        }
        match self {
            Backend::Composed => Path::Composed,
            Backend::Auto | Backend::Fused if device.is_cpu() => Path::Cpu,
            Backend::Auto | Backend::Fused
                if device.is_cuda() && gpu_dtype && cfg!(feature = "cuda") =>
            {
                Path::Gpu(Gpu::Device)
            }
            Backend::Fused if device.is_metal() && gpu_dtype && cfg!(feature = "metal") => {
                Path::Gpu(Gpu::Device)
            }
            Backend::Auto | Backend::Fused => Path::Composed,
        }
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
