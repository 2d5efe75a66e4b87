//! Token log-probs and entropy on CUDA: the launches of `log_probs.h`'s kernels through the entry
//! points of `log_probs.cu` (PTX compiled by
//! `build.rs` for `compute_80`, loaded once per device); nothing is read on the host. The
//! simulation (`gpu.rs`, `sim.cpp`) runs the same launches on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use super::gpu::{block_threads, kernel_suffix};
use crate::kernels::gpu::cuda::{storage_view, view};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/log_probs.ptx"));
const MODULE: &str = "sapo_log_probs";

/// `$f::<F, I>` for logits stored as `F` (f32, f16, bf16) and targets as `I` (u8, u32, i64);
/// the dtypes are known to be supported (`kernel_suffix`).
macro_rules! by_storage_types {
    ($f:ident, $dtype:expr, $ids:expr) => {
        match ($dtype, $ids) {
            (DType::F32, DType::U8) => $f::<f32, u8>,
            (DType::F32, DType::U32) => $f::<f32, u32>,
            (DType::F32, _) => $f::<f32, i64>,
            (DType::F16, DType::U8) => $f::<f16, u8>,
            (DType::F16, DType::U32) => $f::<f16, u32>,
            (DType::F16, _) => $f::<f16, i64>,
            (_, DType::U8) => $f::<bf16, u8>,
            (_, DType::U32) => $f::<bf16, u32>,
            _ => $f::<bf16, i64>,
        }
    };
}

fn config(rows: usize, vocab: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block_threads(vocab), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn forward_with<F: CudaDType + DeviceRepr, I: CudaDType + DeviceRepr>(
    logits: &CudaStorage,
    layout: &Layout,
    targets: &Tensor,
    inv_t: f32,
    suffix: &str,
) -> candle_core::Result<CudaStorage> {
    let dev = logits.device().clone();
    let (rows, vocab) = layout.shape().dims2()?;
    let (guard, target_layout) = targets.storage_and_layout();
    let (x, ids) = (
        view::<F>(logits, layout)?,
        storage_view::<I>(&guard, target_layout)?,
    );
    // At least one element: CUDA refuses zero-byte allocations (empty batches).
    let out = dev.alloc_zeros::<f32>((3 * rows).max(1))?;
    if rows > 0 {
        let name = format!("sapo_log_probs_forward_{suffix}");
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        let (vocab_arg, rows_arg) = (vocab as i64, rows as i64);
        b.arg(&x)
            .arg(&ids)
            .arg(&vocab_arg)
            .arg(&inv_t)
            .arg(&rows_arg)
            .arg(&out);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(config(rows, vocab)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `cuda_fwd` of the forward op: `[3, N]` (f32).
pub(super) fn forward(
    targets: &Tensor,
    temperature: f64,
    logits: &CudaStorage,
    layout: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (dtype, ids) = (logits.dtype(), targets.dtype());
    let Some(suffix) = kernel_suffix(dtype, ids) else {
        candle_core::bail!("CUDA log-probs: unsupported dtypes {dtype:?}, {ids:?}")
    };
    let inv_t = (1.0 / temperature) as f32;
    let run = by_storage_types!(forward_with, dtype, ids);
    let rows = layout.shape().dims2()?.0;
    Ok((
        run(logits, layout, targets, inv_t, suffix)?,
        Shape::from((3, rows)),
    ))
}

/// The backward's inputs besides the logits: the forward's output and its upstream gradient.
type Rows<'a> = ((&'a CudaStorage, &'a Layout), (&'a CudaStorage, &'a Layout));

fn backward_with<F, I>(
    (logits, layout): (&CudaStorage, &Layout),
    ((res, res_layout), (grad, grad_layout)): Rows<'_>,
    targets: &Tensor,
    inv_t: f32,
    suffix: &str,
) -> candle_core::Result<CudaStorage>
where
    F: CudaDType + DeviceRepr + ValidAsZeroBits,
    I: CudaDType + DeviceRepr,
{
    let dev = logits.device().clone();
    let (rows, vocab) = layout.shape().dims2()?;
    let (guard, target_layout) = targets.storage_and_layout();
    let x = view::<F>(logits, layout)?;
    let ids = storage_view::<I>(&guard, target_layout)?;
    let (res, grad) = (
        view::<f32>(res, res_layout)?,
        view::<f32>(grad, grad_layout)?,
    );
    // At least one element: CUDA refuses zero-byte allocations (empty batches).
    let out = dev.alloc_zeros::<F>((rows * vocab).max(1))?;
    if rows > 0 {
        let name = format!("sapo_log_probs_backward_{suffix}");
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        let (vocab_arg, rows_arg) = (vocab as i64, rows as i64);
        b.arg(&x)
            .arg(&ids)
            .arg(&vocab_arg)
            .arg(&inv_t)
            .arg(&rows_arg);
        b.arg(&res).arg(&grad).arg(&out);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(config(rows, vocab)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// `cuda_fwd` of the backward op: the logits' gradient, in their dtype.
pub(super) fn backward(
    targets: &Tensor,
    temperature: f64,
    logits: (&CudaStorage, &Layout),
    rows: Rows<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (dtype, ids) = (logits.0.dtype(), targets.dtype());
    let Some(suffix) = kernel_suffix(dtype, ids) else {
        candle_core::bail!("CUDA log-probs: unsupported dtypes {dtype:?}, {ids:?}")
    };
    if rows.0 .0.dtype() != DType::F32 || rows.1 .0.dtype() != DType::F32 {
        candle_core::bail!("CUDA log-probs backward: the row statistics must be f32")
    }
    let inv_t = (1.0 / temperature) as f32;
    let run = by_storage_types!(backward_with, dtype, ids);
    let shape = logits.1.shape().clone();
    Ok((run(logits, rows, targets, inv_t, suffix)?, shape))
}
