//! The policy loss on CUDA: the three launches of `policy_loss.h`'s kernels through the entry
//! points of `policy_loss.cu` (PTX compiled by `build.rs`
//! for `compute_80`, loaded once per device), with no host read: the value checks come back in
//! the output (see [`crate::PolicyMetrics::check`]). The simulation (`gpu.rs`, `sim.cpp`) runs the
//! same launches on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::gpu::{kernel_suffix, PolicyParams, GPU_OUT_LEN, ROW_LEN, ROW_STATS};
use super::FusedPolicyLoss;
use crate::kernels::gpu::cuda::{storage_view, view};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/policy_loss.ptx"));
const MODULE: &str = "sapo_policy_loss";

// SAFETY: `PolicyParams` is #[repr(C)] plain data (4-byte fields, no padding), the layout of the
// kernel's `PolicyParams`.
unsafe impl DeviceRepr for PolicyParams {}

/// Runs the kernels for log-probs stored as `F` and a mask stored as `M`.
fn launch<F, M>(
    op: &FusedPolicyLoss,
    storage: &CudaStorage,
    layout: &Layout,
    suffix: &str,
) -> candle_core::Result<CudaStorage>
where
    F: CudaDType + DeviceRepr + ValidAsZeroBits,
    M: CudaDType + DeviceRepr,
{
    let dev = storage.device().clone();
    let (rows, t) = layout.shape().dims2()?;
    let params = PolicyParams::new(op, rows, t);
    let log_probs = view::<F>(storage, layout)?;
    let old = op.old_log_probs.storage_and_layout();
    let adv = op.advantages.storage_and_layout();
    let mask = op.mask.storage_and_layout();
    let weights = op.is_weights.as_ref().map(Tensor::storage_and_layout);
    let reference = op.ref_log_probs.as_ref().map(Tensor::storage_and_layout);
    let flags = op.flags.as_ref().map(Tensor::storage_and_layout);
    let old = storage_view::<F>(&old.0, old.1)?;
    let adv = storage_view::<F>(&adv.0, adv.1)?;
    let mask = storage_view::<M>(&mask.0, mask.1)?;
    // Absent inputs are never read: the log-probs stand in.
    let weights = match &weights {
        Some((guard, layout)) => storage_view::<F>(guard, layout)?,
        None => view::<F>(storage, layout)?,
    };
    let reference = match &reference {
        Some((guard, layout)) => storage_view::<F>(guard, layout)?,
        None => view::<F>(storage, layout)?,
    };
    let flags = match &flags {
        Some((guard, layout)) => storage_view::<F>(guard, layout)?,
        None => view::<F>(storage, layout)?,
    };

    // At least one element: CUDA refuses zero-byte allocations (empty batches).
    let row_stats = dev.alloc_zeros::<f32>((rows * ROW_STATS).max(1))?;
    let row_out = dev.alloc_zeros::<f32>((rows * ROW_LEN).max(1))?;
    let out = dev.alloc_zeros::<f32>(GPU_OUT_LEN)?;
    let grad = dev.alloc_zeros::<F>((rows * t).max(1))?;
    let per_row = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (params.threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    if rows > 0 {
        let prepass =
            dev.get_or_load_custom_func(&format!("sapo_policy_prepass_{suffix}"), MODULE, PTX)?;
        let mut b = prepass.builder();
        b.arg(&log_probs)
            .arg(&old)
            .arg(&adv)
            .arg(&mask)
            .arg(&weights);
        b.arg(&params).arg(&row_stats);
        // SAFETY: the arguments match the kernel's signature; every buffer holds what it reads.
        unsafe { b.launch(per_row) }.w()?;

        let rows_fn =
            dev.get_or_load_custom_func(&format!("sapo_policy_rows_{suffix}"), MODULE, PTX)?;
        let mut b = rows_fn.builder();
        b.arg(&log_probs)
            .arg(&old)
            .arg(&adv)
            .arg(&mask)
            .arg(&weights);
        b.arg(&reference)
            .arg(&flags)
            .arg(&params)
            .arg(&row_stats)
            .arg(&row_out)
            .arg(&grad);
        // SAFETY: as above.
        unsafe { b.launch(per_row) }.w()?;
    }
    let reduce = dev.get_or_load_custom_func("sapo_policy_reduce", MODULE, PTX)?;
    let mut b = reduce.builder();
    b.arg(&params).arg(&row_stats).arg(&row_out).arg(&out);
    let one = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above.
    unsafe { b.launch(one) }.w()?;

    let grad = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(grad, dev.clone())),
        (rows, t),
        BackpropOp::none(),
        false,
    );
    *op.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `cuda_fwd` of [`FusedPolicyLoss`]: the output `[GPU_OUT_LEN]` (f32); the gradient is kept.
pub(super) fn forward(
    op: &FusedPolicyLoss,
    storage: &CudaStorage,
    layout: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = storage.dtype();
    let mask_u8 = op.mask.dtype() == DType::U8;
    let Some(suffix) = kernel_suffix(dtype, mask_u8) else {
        candle_core::bail!("CUDA policy loss: unsupported dtype {dtype:?}")
    };
    let out = match (dtype, mask_u8) {
        (DType::F32, true) => launch::<f32, u8>(op, storage, layout, suffix)?,
        (DType::F32, false) => launch::<f32, f32>(op, storage, layout, suffix)?,
        (DType::F16, true) => launch::<f16, u8>(op, storage, layout, suffix)?,
        (DType::F16, false) => launch::<f16, f16>(op, storage, layout, suffix)?,
        (DType::BF16, true) => launch::<bf16, u8>(op, storage, layout, suffix)?,
        _ => launch::<bf16, bf16>(op, storage, layout, suffix)?,
    };
    Ok((out, Shape::from(GPU_OUT_LEN)))
}
