//! The fused linear log-probs op: `[N,H]` hidden states, the `[V,H]` lm_head weight and its `[V]`
//! bias → `[3,N]` (`ℓ`, `H`, `lse`) without the `[N,V]` logits, and its backward, an op of its
//! own that returns the three gradients at once.
//!
//! Device files sit beside this one: `cpu.rs`; the tile kernels `linear_log_probs.h` with their
//! CUDA entry points `linear_log_probs.cu` and host code `cuda.rs` (cuBLAS GEMMs, behind the
//! `cuda` feature), their Metal entry points `linear_log_probs.metal` and host code `metal.rs`
//! (MLX's GEMMs, behind the `metal` feature), and `gpu.rs` (tiling, and the CPU simulation of the
//! same loop that the tests run).

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", feature = "metal", feature = "gpu-sim"))]
pub(crate) mod gpu;
#[cfg(feature = "metal")]
mod metal;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::kernels::log_probs::cpu::{target_ids, RowStats};
use crate::kernels::simd::{Load, Store};
use crate::kernels::Gpu;
use crate::real::Real;

/// `(hidden [N,H], weight [V,H], bias [V])` → `[3,N]`; the targets ride along. The inputs are
/// contiguous and share the compute dtype (f32 or f64).
pub(crate) struct FusedLinearLogProbs {
    /// `[N]`, contiguous, ids already checked to be in `[0, V)`.
    targets: Tensor,
    temperature: f64,
    /// Whether `bias` is the caller's (else zeros that are neither added nor differentiated).
    has_bias: bool,
    /// Runs the GPU path (on a CUDA or Metal device; simulated on the CPU under `gpu-sim`).
    gpu: Option<Gpu>,
}

impl FusedLinearLogProbs {
    /// Runs the op: `([N] log-probs, [N] entropies)`; with `gpu`, the GPU path (f32 inputs; an
    /// out-of-range target id makes its row NaN instead of a host-side check).
    pub(crate) fn forward(
        hidden: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        targets: &Tensor,
        temperature: f64,
        gpu: Option<Gpu>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let op = Self {
            targets: targets.contiguous()?,
            temperature,
            has_bias: bias.is_some(),
            gpu,
        };
        let bias = match bias {
            Some(b) => b.contiguous()?,
            None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
        };
        let out = hidden
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias, op)?;
        Ok((out.get(0)?, out.get(1)?))
    }
}

/// The contiguous slice of a CPU storage in the compute type `R`.
fn slice<'a, R: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [R]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused linear inputs must be contiguous".into()))?;
    Ok(&storage.as_slice::<R>()?[start..end])
}

/// The problem of the three inputs, in `R`.
pub(crate) fn problem<'a, R: Real + candle_core::WithDType>(
    (hidden, hl): (&'a CpuStorage, &Layout),
    (weight, wl): (&'a CpuStorage, &Layout),
    (bias, bl): (&'a CpuStorage, &Layout),
    targets: &'a [usize],
    (temperature, has_bias): (f64, bool),
) -> candle_core::Result<cpu::Problem<'a, R>> {
    let (n, h) = hl.shape().dims2()?;
    let (v, _) = wl.shape().dims2()?;
    Ok(cpu::Problem {
        hidden: slice(hidden, hl)?,
        weight: slice(weight, wl)?,
        bias: if has_bias {
            Some(slice(bias, bl)?)
        } else {
            None
        },
        targets,
        n,
        h,
        v,
        inv_t: <R as Real>::from_f64(1.0 / temperature),
        parallel: false,
    })
}

impl CustomOp3 for FusedLinearLogProbs {
    fn name(&self) -> &'static str {
        "sapo-fused-linear-log-probs"
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
        let inputs = (
            (hidden, hidden_layout),
            (weight, weight_layout),
            (bias, bias_layout),
        );
        if let Some(kernels) = self.gpu {
            #[cfg(feature = "gpu-sim")]
            {
                let n = hidden_layout.shape().dims2()?.0;
                let options = (self.temperature, self.has_bias);
                let out =
                    gpu::simulate_forward(kernels.simulated()?, inputs, &self.targets, options)?;
                return Ok((CpuStorage::F32(out), Shape::from((3, n))));
            }
            #[cfg(not(feature = "gpu-sim"))]
            candle_core::bail!("the GPU kernels ({kernels:?}) need a CUDA or Metal device");
        }
        let targets = target_ids(&self.targets)?;
        let t = (self.temperature, self.has_bias);
        let out = match hidden {
            CpuStorage::F32(_) => CpuStorage::F32(run::<f32>(inputs, &targets, t)?),
            CpuStorage::F64(_) => CpuStorage::F64(run::<f64>(inputs, &targets, t)?),
            other => candle_core::bail!("hidden: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((3, targets.len()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        hidden: &candle_core::CudaStorage,
        hidden_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        bias: &candle_core::CudaStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(
            &self.targets,
            (self.temperature, self.has_bias),
            (hidden, hidden_layout),
            (weight, weight_layout),
            (bias, bias_layout),
        )
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        hidden: &candle_core::MetalStorage,
        hidden_layout: &Layout,
        weight: &candle_core::MetalStorage,
        weight_layout: &Layout,
        bias: &candle_core::MetalStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        metal::forward(
            &self.targets,
            (self.temperature, self.has_bias),
            (hidden, hidden_layout),
            (weight, weight_layout),
            (bias, bias_layout),
        )
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, h) = hidden.dims2()?;
        let v = weight.dim(0)?;
        let backward = LinearBackward {
            targets: self.targets.clone(),
            temperature: self.temperature,
            has_bias: self.has_bias,
            bias: bias.clone(),
            gpu: self.gpu,
        };
        let packed = Tensor::cat(&[res, grad_res], 0)?.contiguous()?;
        let flat = hidden.apply_op3_no_bwd(weight, &packed, &backward)?;
        let grad_bias = self
            .has_bias
            .then(|| flat.narrow(0, (n + v) * h, v))
            .transpose()?;
        Ok((
            Some(flat.narrow(0, 0, n * h)?.reshape((n, h))?),
            Some(flat.narrow(0, n * h, v * h)?.reshape((v, h))?),
            grad_bias,
        ))
    }
}

pub(crate) type Inputs<'a, 'l> = (
    (&'a CpuStorage, &'l Layout),
    (&'a CpuStorage, &'l Layout),
    (&'a CpuStorage, &'l Layout),
);

fn run<R: Real + Load<R> + Store<R> + candle_core::WithDType>(
    (hidden, weight, bias): Inputs<'_, '_>,
    targets: &[usize],
    temperature: (f64, bool),
) -> candle_core::Result<Vec<R>> {
    Ok(problem::<R>(hidden, weight, bias, targets, temperature)?.forward())
}

/// `(hidden, weight, [forward output; upstream gradient] [6,N])` → `[N·H + V·H + V]`: the
/// gradients of the hidden states, the weight and the bias, end to end.
struct LinearBackward {
    targets: Tensor,
    temperature: f64,
    has_bias: bool,
    bias: Tensor,
    gpu: Option<Gpu>,
}

fn run_backward<R: Real + Load<R> + Store<R> + candle_core::WithDType>(
    inputs: Inputs<'_, '_>,
    targets: &[usize],
    temperature: (f64, bool),
    packed: RowStats,
) -> candle_core::Result<Vec<R>> {
    let (hidden, weight, bias) = inputs;
    let p = problem::<R>(hidden, weight, bias, targets, temperature)?;
    let (res, grad) = packed.split();
    Ok(p.backward(&res, &grad))
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "sapo-fused-linear-log-probs-backward"
    }

    fn cpu_fwd(
        &self,
        hidden: &CpuStorage,
        hidden_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        packed: &CpuStorage,
        packed_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bias_guard, bias_layout) = self.bias.storage_and_layout();
        let candle_core::Storage::Cpu(bias) = &*bias_guard else {
            candle_core::bail!("bias must be on the CPU")
        };
        let inputs = (
            (hidden, hidden_layout),
            (weight, weight_layout),
            (bias, bias_layout),
        );
        let (n, h) = hidden_layout.shape().dims2()?;
        let v = weight_layout.shape().dims2()?.0;
        if let Some(kernels) = self.gpu {
            #[cfg(feature = "gpu-sim")]
            {
                let options = (self.temperature, self.has_bias);
                let packed = (packed, packed_layout);
                let out = gpu::simulate_backward(
                    kernels.simulated()?,
                    inputs,
                    &self.targets,
                    options,
                    packed,
                )?;
                return Ok((CpuStorage::F32(out), Shape::from(n * h + v * h + v)));
            }
            #[cfg(not(feature = "gpu-sim"))]
            candle_core::bail!("the GPU kernels ({kernels:?}) need a CUDA or Metal device");
        }
        let targets = target_ids(&self.targets)?;
        let rows = RowStats::new(packed, packed_layout)?;
        let t = (self.temperature, self.has_bias);
        let out = match hidden {
            CpuStorage::F32(_) => CpuStorage::F32(run_backward::<f32>(inputs, &targets, t, rows)?),
            CpuStorage::F64(_) => CpuStorage::F64(run_backward::<f64>(inputs, &targets, t, rows)?),
            other => candle_core::bail!("hidden: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(n * h + v * h + v)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        hidden: &candle_core::CudaStorage,
        hidden_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        packed: &candle_core::CudaStorage,
        packed_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(
            &self.targets,
            (self.temperature, self.has_bias),
            &self.bias,
            (hidden, hidden_layout),
            (weight, weight_layout),
            (packed, packed_layout),
        )
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        hidden: &candle_core::MetalStorage,
        hidden_layout: &Layout,
        weight: &candle_core::MetalStorage,
        weight_layout: &Layout,
        packed: &candle_core::MetalStorage,
        packed_layout: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        metal::backward(
            &self.targets,
            (self.temperature, self.has_bias),
            &self.bias,
            (hidden, hidden_layout),
            (weight, weight_layout),
            (packed, packed_layout),
        )
    }
}
