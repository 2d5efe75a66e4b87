//! The fused policy-loss op: loss, metric sums and gradient of every ratio level × trust region
//! × aggregation × KL estimator × rollout weights in one pass, the gradient handed from the
//! forward to the backward.
//!
//! Device files sit beside this one: `cpu.rs` (the CPU implementation, [`CustomOp1::cpu_fwd`]);
//! the GPU kernels `policy_loss.h` with their CUDA entry points `policy_loss.cu` and host code
//! `cuda.rs` (`cuda_fwd`, behind the `cuda` feature) and their Metal entry points
//! `policy_loss.metal` and host code `metal.rs` (`metal_fwd`, behind the `metal` feature);
//! `gpu.rs`, what both take and the CPU simulation of the same kernels. The backward reads nothing on the host: it hands over the
//! kept gradient, scaled by the upstream gradient in place on the CPU (no copy, no pass when it is
//! 1) and with a tensor op on other devices.

pub(crate) mod contract;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", feature = "metal", feature = "gpu-sim"))]
pub(crate) mod gpu;
#[cfg(feature = "metal")]
mod metal;

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::simd::{Load, Store};
use super::{cpu_slice, from_kernel, Gpu};
use crate::aggregation::Normalizer;
use crate::checks::check_mask_values;
use crate::error::Result;
use crate::losses::config::PolicyLossConfig;
use crate::losses::inputs::PolicyInputs;
use crate::losses::masks::KeepRule;
use crate::losses::metrics::NUM_SLOTS;
use crate::real::Real;

pub(crate) use contract::OUT_LEN;

/// The fused policy loss as a candle op on `log_probs`; every other input rides along as a
/// constant.
pub(crate) struct FusedPolicyLoss {
    pub(crate) config: PolicyLossConfig,
    /// `[B,T]`, contiguous, the kernel's input dtype.
    old_log_probs: Tensor,
    /// `[B]` or `[B,T]`, contiguous, the kernel's input dtype.
    advantages: Tensor,
    /// `[B,T]`, contiguous, `u8` or the kernel's input dtype.
    pub(crate) mask: Tensor,
    ref_log_probs: Option<Tensor>,
    is_weights: Option<Tensor>,
    /// `[B,T]` KL-Cov selection, the kernel's input dtype.
    flags: Option<Tensor>,
    /// OPSM's and the top-entropy selection's decisions, applied by the CPU kernel (the other
    /// paths take them as a factor in `is_weights`).
    pub(crate) keep_rule: Option<KeepRule>,
    normalizer: Normalizer,
    /// Runs the GPU kernels (on a CUDA or Metal device; simulated on the CPU under `gpu-sim`).
    gpu: Option<Gpu>,
    /// `∂loss/∂log_probs`, written by the forward pass.
    grad: Mutex<Option<Tensor>>,
}

impl FusedPolicyLoss {
    /// Runs the op on inputs already checked (`PolicyInputs::check`) with rows of `t` tokens, in
    /// the input dtype `dtype` (`fused_input_dtype`, decided by the caller):
    /// the loss (differentiable with respect to `log_probs`), the metric sums and the ratio's
    /// extrema (detached), and with the GPU kernels (`gpu`) the value checks' counts.
    ///
    /// The kernels check the values themselves: the CPU kernel returns the error at once; the GPU
    /// kernels, which read nothing back to the host, return the counts (`[CHECKS]`), which become
    /// the error when the metrics are read ([`crate::PolicyMetrics::check`]).
    pub(crate) fn forward(
        config: &PolicyLossConfig,
        inputs: &PolicyInputs<'_>,
        (t, dtype): (usize, DType),
        flags: Option<&Tensor>,
        keep_rule: Option<KeepRule>,
        gpu: Option<Gpu>,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Tensor>)> {
        let mut op = Self::new(config, inputs, t, dtype)?;
        debug_assert!(gpu.is_none() || keep_rule.is_none());
        op.gpu = gpu;
        op.keep_rule = keep_rule;
        op.flags = flags.map(|f| f.to_dtype(dtype)?.contiguous()).transpose()?;
        let log_probs = inputs.log_probs.to_dtype(dtype)?.contiguous()?;
        let out = log_probs.apply_op1(op).map_err(from_kernel)?;
        let (loss, sums, extrema) = split_output(&out)?;
        let checks = if gpu.is_some() {
            Some(out.narrow(0, OUT_LEN, out.dim(0)? - OUT_LEN)?.detach())
        } else {
            None
        };
        Ok((loss, sums, extrema, checks))
    }

    /// The op for checked inputs: every constant converted to `dtype` (the mask kept as `u8` or
    /// `dtype`), contiguous and detached; rows of `t` tokens.
    pub(crate) fn new<L>(
        config: &PolicyLossConfig,
        inputs: &PolicyInputs<'_, L>,
        t: usize,
        dtype: DType,
    ) -> Result<Self> {
        let same = |x: &Tensor| -> Result<Tensor> { Ok(x.detach().to_dtype(dtype)?.contiguous()?) };
        let mask = if inputs.mask.dtype() == DType::U8 || inputs.mask.dtype() == dtype {
            inputs.mask.contiguous()?
        } else {
            // Other mask dtypes: checked in their own dtype (one host read), then read as u8.
            check_mask_values(inputs.mask)?;
            inputs.mask.ne(0.0)?.contiguous()?
        };
        Ok(Self {
            config: *config,
            old_log_probs: same(inputs.old_log_probs)?,
            advantages: same(&inputs.advantages(t)?)?,
            mask,
            ref_log_probs: inputs.ref_log_probs.map(same).transpose()?,
            is_weights: inputs.is_weights(t)?.as_ref().map(same).transpose()?,
            flags: None,
            keep_rule: None,
            normalizer: inputs.normalizer,
            gpu: None,
            grad: Mutex::new(None),
        })
    }

    /// Runs the CPU kernel for log-probs of storage type `F` computed in `R`, with a `u8` mask or
    /// one of `F`, and keeps the gradient for the backward.
    fn cpu_run<F, R>(&self, log_probs: &[F], dims: &[usize]) -> candle_core::Result<CpuStorage>
    where
        F: Load<R> + Store<R> + WithDType,
        u8: Load<R>,
        R: Real + WithDType,
    {
        let (guard, layout) = self.mask.storage_and_layout();
        let bt = (dims[0], dims[1]);
        let (output, grad) = match self.mask.dtype() {
            DType::U8 => cpu::run::<F, u8, R>(self, log_probs, cpu_slice(&guard, layout)?, bt)?,
            _ => cpu::run::<F, F, R>(self, log_probs, cpu_slice(&guard, layout)?, bt)?,
        };
        let grad = Tensor::from_vec(grad, dims, &candle_core::Device::Cpu)?;
        // A poisoned lock only means an earlier call panicked; the slot is overwritten anyway.
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
        Ok(R::to_cpu_storage_owned(output))
    }
}

/// `(loss, metric sums, ratio extrema)` of an output `[loss, sums (NUM_SLOTS), min, max]`; only
/// the loss carries gradient.
pub(crate) fn split_output(out: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        out.narrow(0, 0, 1)?.squeeze(0)?,
        out.narrow(0, 1, NUM_SLOTS)?.detach(),
        out.narrow(0, 1 + NUM_SLOTS, 2)?.detach(),
    ))
}

impl CustomOp1 for FusedPolicyLoss {
    fn name(&self) -> &'static str {
        "sapo-fused-policy-loss"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims().to_vec();
        if let Some(kernels) = self.gpu {
            #[cfg(feature = "gpu-sim")]
            return gpu::simulate(kernels.simulated()?, self, storage, layout);
            #[cfg(not(feature = "gpu-sim"))]
            candle_core::bail!("the GPU kernels ({kernels:?}) need a CUDA or Metal device");
        }
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("log_probs must be contiguous".into()))?;
        let out = match storage {
            CpuStorage::F32(v) => self.cpu_run::<f32, f32>(&v[start..end], &dims)?,
            CpuStorage::F16(v) => self.cpu_run::<f16, f32>(&v[start..end], &dims)?,
            CpuStorage::BF16(v) => self.cpu_run::<bf16, f32>(&v[start..end], &dims)?,
            CpuStorage::F64(v) => self.cpu_run::<f64, f64>(&v[start..end], &dims)?,
            other => candle_core::bail!("log_probs: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(OUT_LEN)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, storage, layout)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        metal::forward(self, storage, layout)
    }

    fn bwd(
        &self,
        log_probs: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let take = || self.grad.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The forward's gradient is handed over (not copied); a second backward through the
        // same graph runs the kernel again.
        let grad = match take() {
            Some(grad) => grad,
            None => {
                log_probs.apply_op1_no_bwd(self)?;
                take().ok_or_else(|| candle_core::Error::Msg("kernel kept no gradient".into()))?
            }
        };
        // Only the loss (slot 0) carries gradient; the metrics are detached. Nothing is read on
        // the host here: on the CPU the kept gradient is scaled in place by a kernel, elsewhere
        // by a tensor op.
        let upstream = grad_res.narrow(0, 0, 1)?;
        if grad.elem_count() == 0 {
            // Rows of no token: nothing to scale (and candle refuses in-place ops on them).
            Ok(Some(grad))
        } else if grad.device().is_cpu() {
            grad.inplace_op2(&upstream, &ScaleByUpstream)?;
            Ok(Some(grad))
        } else {
            Ok(Some(grad.broadcast_mul(&upstream.to_dtype(grad.dtype())?)?))
        }
    }
}

/// Scales a kept gradient in place by the loss's upstream gradient (a 1-element tensor); a
/// no-op when it is 1, the usual case.
pub(crate) struct ScaleByUpstream;

impl InplaceOp2 for ScaleByUpstream {
    fn name(&self) -> &'static str {
        "sapo-scale-by-upstream"
    }

    fn cpu_fwd(
        &self,
        grad: &mut CpuStorage,
        _grad_layout: &Layout,
        upstream: &CpuStorage,
        upstream_layout: &Layout,
    ) -> candle_core::Result<()> {
        let at = upstream_layout.start_offset();
        let u = match upstream {
            CpuStorage::F32(v) => f64::from(v[at]),
            CpuStorage::F64(v) => v[at],
            CpuStorage::F16(v) => v[at].to_f64(),
            CpuStorage::BF16(v) => v[at].to_f64(),
            other => candle_core::bail!("upstream gradient: unsupported dtype {:?}", other.dtype()),
        };
        if u == 1.0 {
            return Ok(());
        }
        match grad {
            CpuStorage::F32(v) => v.iter_mut().for_each(|x| *x *= u as f32),
            CpuStorage::F64(v) => v.iter_mut().for_each(|x| *x *= u),
            CpuStorage::F16(v) => v
                .iter_mut()
                .for_each(|x| *x = f16::from_f64(x.to_f64() * u)),
            CpuStorage::BF16(v) => v
                .iter_mut()
                .for_each(|x| *x = bf16::from_f64(x.to_f64() * u)),
            other => candle_core::bail!("gradient: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}
