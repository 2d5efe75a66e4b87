//! The fused policy-loss op: loss, metric sums and gradient of every ratio level × trust region
//! × aggregation × KL estimator × rollout weights in one pass, the gradient handed from the
//! forward to the backward.
//!
//! Device files sit beside this one: `cpu.rs` (the CPU implementation, [`CustomOp1::cpu_fwd`]);
//! the CUDA and Metal implementations will be `cuda.rs` and `metal.rs`, behind the features, and
//! plug into `cuda_fwd` / `metal_fwd`. The backward is device-agnostic: it scales the kept
//! gradient by the upstream gradient with a tensor op, reading nothing on the host.

mod cpu;

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use half::{bf16, f16};

use super::simd::{Load, Store};
use super::{cpu_slice, from_kernel};
use crate::aggregation::Normalizer;
use crate::error::Result;
use crate::losses::config::PolicyLossConfig;
use crate::losses::inputs::{check_mask_values, PolicyInputs};
use crate::losses::metrics::NUM_SLOTS;
use crate::losses::policy_loss::fused_input_dtype;
use crate::real::Real;

/// Output layout: `[loss, metric sums (NUM_SLOTS), ratio min, ratio max]`.
const OUT_LEN: usize = 1 + NUM_SLOTS + 2;

/// The fused policy loss as a candle op on `log_probs`; every other input rides along as a
/// constant.
pub(crate) struct FusedPolicyLoss {
    config: PolicyLossConfig,
    /// `[B,T]`, contiguous, the kernel's input dtype.
    old_log_probs: Tensor,
    /// `[B]` or `[B,T]`, contiguous, the kernel's input dtype.
    advantages: Tensor,
    /// `[B,T]`, contiguous, `u8` or the kernel's input dtype.
    mask: Tensor,
    ref_log_probs: Option<Tensor>,
    is_weights: Option<Tensor>,
    normalizer: Normalizer,
    /// `∂loss/∂log_probs`, written by the forward pass.
    grad: Mutex<Option<Tensor>>,
}

impl FusedPolicyLoss {
    /// Checks the inputs and runs the op: the loss (differentiable with respect to `log_probs`),
    /// the metric sums and the ratio's extrema (detached).
    pub(crate) fn forward(
        config: &PolicyLossConfig,
        inputs: &PolicyInputs<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        inputs.check(config.kl.is_some())?;
        let dtype = fused_input_dtype(inputs);
        let same = |x: &Tensor| -> Result<Tensor> { Ok(x.detach().to_dtype(dtype)?.contiguous()?) };
        let mask = if inputs.mask.dtype() == DType::U8 || inputs.mask.dtype() == dtype {
            inputs.mask.contiguous()?
        } else {
            // Other mask dtypes: checked in their own dtype (one host read), then read as u8.
            check_mask_values(inputs.mask)?;
            inputs.mask.ne(0.0)?.contiguous()?
        };
        let op = Self {
            config: *config,
            old_log_probs: same(inputs.old_log_probs)?,
            advantages: same(&inputs.advantages()?)?,
            mask,
            ref_log_probs: inputs.ref_log_probs.map(same).transpose()?,
            is_weights: inputs.is_weights.map(same).transpose()?,
            normalizer: inputs.normalizer,
            grad: Mutex::new(None),
        };
        let log_probs = inputs.log_probs.to_dtype(dtype)?.contiguous()?;
        let out = log_probs.apply_op1(op).map_err(from_kernel)?;
        Ok((
            out.narrow(0, 0, 1)?.squeeze(0)?,
            out.narrow(0, 1, NUM_SLOTS)?.detach(),
            out.narrow(0, 1 + NUM_SLOTS, 2)?.detach(),
        ))
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
        let (output, grad) = match self.mask.dtype() {
            DType::U8 => cpu::run::<F, u8, R>(self, log_probs, cpu_slice(&guard, layout)?, dims)?,
            _ => cpu::run::<F, F, R>(self, log_probs, cpu_slice(&guard, layout)?, dims)?,
        };
        let grad = Tensor::from_vec(grad, dims, &candle_core::Device::Cpu)?;
        // A poisoned lock only means an earlier call panicked; the slot is overwritten anyway.
        *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
        Ok(R::to_cpu_storage_owned(output))
    }
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

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = self
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("backward before forward".into()))?;
        // Only the loss (slot 0) carries gradient; the metrics are detached. Scaled on the
        // device, without reading the upstream gradient on the host.
        let upstream = grad_res.narrow(0, 0, 1)?.to_dtype(grad.dtype())?;
        Ok(Some(grad.broadcast_mul(&upstream)?))
    }
}
