//! The policy loss straight from hidden states, in one sweep: `(hidden [N,H], weight [V,H], bias
//! [V])` → the policy loss's output `[loss, metric sums, ratio min, ratio max]`, the gradients of
//! the three inputs computed in the forward (three gemms per block of tokens instead of four)
//! and handed to the backward. Token-level ratios only: the sequence levels need whole rows
//! before any gradient, and compose the fused linear log-probs with the loss instead.
//!
//! Device files sit beside this one: `cpu.rs` now; `cuda.rs` and `metal.rs` (behind the
//! features) will plug into `cuda_fwd` / `metal_fwd`.

mod cpu;

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use crate::error::Result;
use crate::kernels::linear_log_probs::{problem, Inputs};
use crate::kernels::log_probs::cpu::target_ids;
use crate::kernels::policy_loss::cpu::{run as policy_run, with_constants, with_shape};
use crate::kernels::policy_loss::{split_output, FusedPolicyLoss, ScaleByUpstream, OUT_LEN};
use crate::kernels::simd::{Load, Store};
use crate::kernels::{cpu_slice, from_kernel};
use crate::lm_head::LmHead;
use crate::losses::config::PolicyLossConfig;
use crate::losses::inputs::PolicyInputs;
use crate::real::Real;

/// The op; the policy loss's constants ride along in `policy`.
pub(crate) struct FusedLinearPolicyLoss {
    policy: FusedPolicyLoss,
    /// `[B·T]`, contiguous, ids already checked to be in `[0, V)`.
    targets: Tensor,
    temperature: f64,
    has_bias: bool,
    /// `(B, T)`.
    dims: (usize, usize),
    /// Whether the weight needs a gradient (candle tracks it: a variable or computed from one);
    /// a frozen lm_head (a constant) skips the `∂W` gemm.
    weight_gradient: bool,
    /// `∂loss/∂(hidden, weight, bias)`, written by the forward pass (`∂W` only with
    /// `weight_gradient`).
    grads: Mutex<Option<(Tensor, Option<Tensor>, Tensor)>>,
}

impl FusedLinearPolicyLoss {
    /// Runs the op on checked inputs (`hidden` `[B,T,H]`): the loss (differentiable with respect
    /// to the hidden states, the weight and the bias), the metric sums and the ratio's extrema.
    pub(crate) fn forward(
        config: &PolicyLossConfig,
        inputs: &PolicyInputs<'_, LmHead<'_>>,
        (b, t): (usize, usize),
        dtype: DType,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let head = inputs.log_probs;
        let h = head.weight.dim(1)?;
        let op = Self {
            policy: FusedPolicyLoss::new(config, inputs, t, dtype)?,
            targets: head.targets.flatten_all()?.contiguous()?,
            temperature: head.temperature,
            has_bias: head.bias.is_some(),
            dims: (b, t),
            weight_gradient: head.weight.track_op(),
            grads: Mutex::new(None),
        };
        let hidden = head
            .hidden
            .reshape((b * t, h))?
            .to_dtype(dtype)?
            .contiguous()?;
        let weight = head.weight.to_dtype(dtype)?.contiguous()?;
        let bias = match head.bias {
            Some(bias) => bias.to_dtype(dtype)?.contiguous()?,
            None => Tensor::zeros(weight.dim(0)?, dtype, weight.device())?,
        };
        let out = hidden.apply_op3(&weight, &bias, op).map_err(from_kernel)?;
        split_output(&out)
    }

    /// The sweep, then the loss's value and metrics from its log-probs (the policy kernel, which
    /// also checks every value); keeps the gradients.
    fn cpu_run<M, R>(
        &self,
        inputs: Inputs<'_, '_>,
        targets: &[usize],
        mask: &[M],
    ) -> candle_core::Result<Vec<R>>
    where
        M: Load<R> + WithDType,
        R: Real + Load<R> + Store<R> + WithDType,
    {
        let (hidden, weight, bias) = inputs;
        let mut lin = problem::<R>(
            hidden,
            weight,
            bias,
            targets,
            (self.temperature, self.has_bias),
        )?;
        lin.parallel = true;
        let grads = with_constants::<R, M, R, _>(&self.policy, &[], mask, self.dims, |c| {
            Ok(with_shape(
                &self.policy.config.trust_region,
                cpu::Sweep {
                    lin: &lin,
                    c,
                    weight_gradient: self.weight_gradient,
                },
            ))
        })?;
        let (output, _) = policy_run::<R, M, R>(&self.policy, &grads.log_probs, mask, self.dims)?;
        let dev = candle_core::Device::Cpu;
        let kept = (
            Tensor::from_vec(grads.hidden, (lin.n, lin.h), &dev)?,
            grads
                .weight
                .map(|w| Tensor::from_vec(w, (lin.v, lin.h), &dev))
                .transpose()?,
            Tensor::from_vec(grads.bias, lin.v, &dev)?,
        );
        *self.grads.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        Ok(output)
    }

    fn cpu_dtype<R>(&self, inputs: Inputs<'_, '_>, targets: &[usize]) -> candle_core::Result<Vec<R>>
    where
        u8: Load<R>,
        R: Real + Load<R> + Store<R> + WithDType,
    {
        let (guard, layout) = self.policy.mask.storage_and_layout();
        match self.policy.mask.dtype() {
            DType::U8 => self.cpu_run::<u8, R>(inputs, targets, cpu_slice(&guard, layout)?),
            _ => self.cpu_run::<R, R>(inputs, targets, cpu_slice(&guard, layout)?),
        }
    }
}

impl CustomOp3 for FusedLinearPolicyLoss {
    fn name(&self) -> &'static str {
        "sapo-fused-linear-policy-loss"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let targets = target_ids(&self.targets)?;
        let inputs = (
            (hidden, hidden_layout),
            (weight, weight_layout),
            (bias, bias_layout),
        );
        let out = match hidden {
            CpuStorage::F32(_) => CpuStorage::F32(self.cpu_dtype::<f32>(inputs, &targets)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.cpu_dtype::<f64>(inputs, &targets)?),
            other => candle_core::bail!("hidden: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(OUT_LEN)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let take = || self.grads.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Handed over, not copied; a second backward through the same graph reruns the sweep.
        let grads = match take() {
            Some(grads) => grads,
            None => {
                hidden.apply_op3_no_bwd(weight, bias, self)?;
                take().ok_or_else(|| candle_core::Error::Msg("kernel kept no gradient".into()))?
            }
        };
        let upstream = grad_res.narrow(0, 0, 1)?;
        let (grad_hidden, grad_weight, grad_bias) = grads;
        for g in [Some(&grad_hidden), grad_weight.as_ref(), Some(&grad_bias)]
            .into_iter()
            .flatten()
        {
            g.inplace_op2(&upstream, &ScaleByUpstream)?;
        }
        Ok((
            Some(grad_hidden),
            grad_weight,
            self.has_bias.then_some(grad_bias),
        ))
    }
}
