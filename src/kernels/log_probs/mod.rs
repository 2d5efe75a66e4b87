//! The fused token log-probs + entropy op and its backward, an op of its own.
//!
//! Forward `[N,V]` logits → `[3,N]` (`ℓ`, `H`, `lse`), one streaming pass per row. Backward:
//! [`LogProbsBackward`] takes the logits, that output and its upstream gradient, recomputes the
//! softmax on the fly and writes the logits' gradient once; nothing is read on the host.
//!
//! Device files sit beside this one: `cpu.rs`; the GPU kernels `log_probs.h` with their CUDA
//! entry points `log_probs.cu` and host code `cuda.rs` (behind the `cuda` feature), their Metal
//! entry points `log_probs.metal` and host code `metal.rs` (behind the `metal` feature), and
//! `gpu.rs` (launch geometry, and the CPU simulation of the same kernels that the tests run); on
//! the GPU an out-of-range target id makes its row's `ℓ` and `H` NaN instead of a host-side
//! check.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", feature = "metal", feature = "gpu-sim"))]
pub(crate) mod gpu;
#[cfg(feature = "metal")]
mod metal;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::Gpu;

/// `[N, V]` logits → `[3, N]` (`ℓ`, `H`, `lse`); the targets ride along.
pub(crate) struct FusedLogProbs {
    /// `[N]`, contiguous, u8/u32/i64, ids already checked to be in `[0, V)`.
    targets: Tensor,
    temperature: f64,
    /// Runs the GPU kernels (on a CUDA or Metal device; simulated on the CPU under `gpu-sim`).
    gpu: Option<Gpu>,
}

impl FusedLogProbs {
    /// Runs the op on `[N,V]` logits and `[N]` targets: `([N] log-probs, [N] entropies)`; with
    /// `gpu`, the GPU kernels.
    pub(crate) fn forward(
        logits: &Tensor,
        targets: &Tensor,
        temperature: f64,
        gpu: Option<Gpu>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let op = Self {
            targets: targets.contiguous()?,
            temperature,
            gpu,
        };
        let out = logits.contiguous()?.apply_op1(op)?;
        Ok((out.get(0)?, out.get(1)?))
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
        if let Some(kernels) = self.gpu {
            #[cfg(feature = "gpu-sim")]
            return gpu::simulate_forward(
                kernels.simulated()?,
                &self.targets,
                self.temperature,
                storage,
                layout,
            );
            #[cfg(not(feature = "gpu-sim"))]
            candle_core::bail!("the GPU kernels ({kernels:?}) need a CUDA or Metal device");
        }
        let (n, vocab) = layout.shape().dims2()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("logits must be contiguous".into()))?;
        let inv_t = 1.0 / self.temperature;
        let targets = cpu::target_ids(&self.targets)?;
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(cpu::forward(&v[start..end], vocab, &targets, inv_t as f32))
            }
            CpuStorage::F16(v) => {
                CpuStorage::F32(cpu::forward(&v[start..end], vocab, &targets, inv_t as f32))
            }
            CpuStorage::BF16(v) => {
                CpuStorage::F32(cpu::forward(&v[start..end], vocab, &targets, inv_t as f32))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(cpu::forward(&v[start..end], vocab, &targets, inv_t))
            }
            other => candle_core::bail!("logits: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((3, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(&self.targets, self.temperature, storage, layout)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        metal::forward(&self.targets, self.temperature, storage, layout)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let backward = LogProbsBackward {
            targets: self.targets.clone(),
            temperature: self.temperature,
            gpu: self.gpu,
        };
        let grad =
            logits.apply_op3_no_bwd(&res.contiguous()?, &grad_res.contiguous()?, &backward)?;
        Ok(Some(grad))
    }
}

/// `(logits [N,V], output [3,N], upstream gradient [3,N])` → the logits' gradient `[N,V]`, in
/// the logits' dtype.
pub(crate) struct LogProbsBackward {
    targets: Tensor,
    temperature: f64,
    gpu: Option<Gpu>,
}

impl CustomOp3 for LogProbsBackward {
    fn name(&self) -> &'static str {
        "sapo-fused-token-log-probs-backward"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        res: &CpuStorage,
        res_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let Some(kernels) = self.gpu {
            #[cfg(feature = "gpu-sim")]
            return gpu::simulate_backward(
                kernels.simulated()?,
                &self.targets,
                self.temperature,
                (logits, logits_layout),
                (res, res_layout),
                (grad, grad_layout),
            );
            #[cfg(not(feature = "gpu-sim"))]
            candle_core::bail!("the GPU kernels ({kernels:?}) need a CUDA or Metal device");
        }
        let shape = logits_layout.shape().clone();
        let (_, vocab) = shape.dims2()?;
        let targets = cpu::target_ids(&self.targets)?;
        let inv_t = 1.0 / self.temperature;
        let rows = |s: &CpuStorage, l: &Layout| cpu::RowStats::new(s, l);
        let (res, grad) = (rows(res, res_layout)?, rows(grad, grad_layout)?);
        let (start, end) = logits_layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("logits must be contiguous".into()))?;
        let pass = cpu::Backward {
            vocab,
            targets: &targets,
            res: &res,
            grad: &grad,
        };
        let out = match logits {
            CpuStorage::F32(v) => CpuStorage::F32(pass.run(&v[start..end], inv_t as f32)),
            CpuStorage::F16(v) => CpuStorage::F16(pass.run(&v[start..end], inv_t as f32)),
            CpuStorage::BF16(v) => CpuStorage::BF16(pass.run(&v[start..end], inv_t as f32)),
            CpuStorage::F64(v) => CpuStorage::F64(pass.run(&v[start..end], inv_t)),
            other => candle_core::bail!("logits: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        logits: &candle_core::CudaStorage,
        logits_layout: &Layout,
        res: &candle_core::CudaStorage,
        res_layout: &Layout,
        grad: &candle_core::CudaStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(
            &self.targets,
            self.temperature,
            (logits, logits_layout),
            ((res, res_layout), (grad, grad_layout)),
        )
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        logits: &candle_core::MetalStorage,
        logits_layout: &Layout,
        res: &candle_core::MetalStorage,
        res_layout: &Layout,
        grad: &candle_core::MetalStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        metal::backward(
            &self.targets,
            self.temperature,
            (logits, logits_layout),
            ((res, res_layout), (grad, grad_layout)),
        )
    }
}
