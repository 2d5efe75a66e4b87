//! The fused linear log-probs on CUDA: chunks of rows × tiles of the vocabulary, each tile's
//! logits multiplied by cuBLAS (f32) into one reused buffer, the tile kernels of
//! `linear_log_probs.h` (entry points in `linear_log_probs.cu`) folding or differentiating them; the `[N, V]` logits never exist.
//! Nothing is read on the host. The simulation (`gpu.rs`, `sim.cpp`) runs the same loop on the CPU
//! with a plain GEMM.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t;
use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig};
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Shape, Tensor};

use super::gpu::{tiles, Tile, CUDA_TILING};
use crate::kernels::gpu::cuda::{storage_view, view};
use crate::kernels::log_probs::gpu::block_threads;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/linear_log_probs.ptx"));
const MODULE: &str = "sapo_linear_log_probs";

/// cuBLAS's `C = op(A)·op(B) + β·C` on column-major f32 matrices (`transpose_a`, `transpose_b`).
#[allow(clippy::too_many_arguments)]
fn gemm<A, B, C>(
    dev: &candle_core::CudaDevice,
    (transpose_a, transpose_b): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda): (&A, usize),
    (b, ldb): (&B, usize),
    beta: f32,
    (c, ldc): (&mut C, usize),
) -> candle_core::Result<()>
where
    A: candle_core::cuda_backend::cudarc::driver::DevicePtr<f32>,
    B: candle_core::cuda_backend::cudarc::driver::DevicePtr<f32>,
    C: candle_core::cuda_backend::cudarc::driver::DevicePtrMut<f32>,
{
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    let cfg = GemmConfig {
        transa: op(transpose_a),
        transb: op(transpose_b),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: lda as i32,
        ldb: ldb as i32,
        beta,
        ldc: ldc as i32,
    };
    // SAFETY: the dimensions and leading dimensions describe buffers of the given sizes.
    unsafe { dev.cublas_handle().gemm(cfg, a, b, c) }.w()
}

/// The targets as i64 on the device (a device op; no host read).
fn target_ids(targets: &Tensor) -> candle_core::Result<Tensor> {
    targets.to_dtype(DType::I64)?.contiguous()
}

fn rows_config(rows: usize, width: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (block_threads(width), 1, 1),
        shared_mem_bytes: 0,
    }
}

fn linear_config(count: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (count.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The walk both passes make over chunks of rows × tiles of the vocabulary: each tile's logits
/// `h_chunk·W_tileᵀ` (cuBLAS) are written at the start of one reused buffer and handed to `body`.
fn for_each_tile(
    dev: &candle_core::CudaDevice,
    (hidden, weight): (&CudaView<'_, f32>, &CudaView<'_, f32>),
    (n, h, v): (usize, usize, usize),
    mut body: impl FnMut(Tile, &mut CudaViewMut<'_, f32>) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let (chunk, tile) = CUDA_TILING;
    let mut logits = dev.alloc_zeros::<f32>(chunk.min(n).max(1) * tile.min(v).max(1))?;
    for t in tiles(n, v, CUDA_TILING) {
        let Tile { c0, c, v0, w } = t;
        let mut tile_logits = logits.slice_mut(0..c * w);
        gemm(
            dev,
            (true, false),
            (w, c, h),
            (&weight.slice(v0 * h..(v0 + w) * h), h),
            (&hidden.slice(c0 * h..(c0 + c) * h), h),
            0.0,
            (&mut tile_logits, w),
        )?;
        body(t, &mut tile_logits)?;
    }
    Ok(())
}

/// The forward: `[3, N]` (ℓ, H, lse), f32 inputs.
pub(super) fn forward(
    targets: &Tensor,
    (temperature, has_bias): (f64, bool),
    (hidden, hidden_layout): (&CudaStorage, &Layout),
    (weight, weight_layout): (&CudaStorage, &Layout),
    (bias, bias_layout): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = hidden.device().clone();
    let (n, h) = hidden_layout.shape().dims2()?;
    let v = weight_layout.shape().dims2()?.0;
    let (hidden, weight, bias) = (
        view::<f32>(hidden, hidden_layout)?,
        view::<f32>(weight, weight_layout)?,
        view::<f32>(bias, bias_layout)?,
    );
    let ids = target_ids(targets)?;
    let (ids_guard, ids_layout) = ids.storage_and_layout();
    let ids = storage_view::<i64>(&ids_guard, ids_layout)?;
    // At least one element: CUDA refuses zero-byte allocations (empty batches).
    let mut state = dev.alloc_zeros::<f32>((3 * n).max(1))?;
    let mut z_target = dev.alloc_zeros::<f32>(n.max(1))?;
    let out = dev.alloc_zeros::<f32>((3 * n).max(1))?;
    let fold = dev.get_or_load_custom_func("sapo_linear_fold", MODULE, PTX)?;
    let inv_t = (1.0 / temperature) as f32;
    let has_bias = i32::from(has_bias);
    for_each_tile(&dev, (&hidden, &weight), (n, h, v), |t, tile_logits| {
        let mut b = fold.builder();
        let (v0_arg, w_arg, c0_arg) = (t.v0 as i64, t.w as i64, t.c0 as i64);
        b.arg(tile_logits)
            .arg(&bias)
            .arg(&has_bias)
            .arg(&v0_arg)
            .arg(&w_arg);
        b.arg(&c0_arg)
            .arg(&ids)
            .arg(&inv_t)
            .arg(&mut state)
            .arg(&mut z_target);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(rows_config(t.c, t.w)) }.w()?;
        Ok(())
    })?;
    if n > 0 {
        let finish = dev.get_or_load_custom_func("sapo_linear_finish", MODULE, PTX)?;
        let mut b = finish.builder();
        let n_arg = n as i64;
        b.arg(&state).arg(&z_target).arg(&n_arg).arg(&out);
        // SAFETY: as above.
        unsafe { b.launch(linear_config(n)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((3, n))))
}

/// The backward: `[N·H + V·H + V]` (the hidden states', the weight's and the bias's gradients)
/// from the packed `[6, N]` forward output and upstream gradient.
pub(super) fn backward(
    targets: &Tensor,
    (temperature, has_bias): (f64, bool),
    bias: &Tensor,
    (hidden, hidden_layout): (&CudaStorage, &Layout),
    (weight, weight_layout): (&CudaStorage, &Layout),
    (packed, packed_layout): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = hidden.device().clone();
    let (n, h) = hidden_layout.shape().dims2()?;
    let v = weight_layout.shape().dims2()?.0;
    let (hidden, weight, packed) = (
        view::<f32>(hidden, hidden_layout)?,
        view::<f32>(weight, weight_layout)?,
        view::<f32>(packed, packed_layout)?,
    );
    let (res, grad_res) = (packed.slice(0..3 * n), packed.slice(3 * n..6 * n));
    let (bias_guard, bias_layout) = bias.storage_and_layout();
    let bias = storage_view::<f32>(&bias_guard, bias_layout)?;
    let ids = target_ids(targets)?;
    let (ids_guard, ids_layout) = ids.storage_and_layout();
    let ids = storage_view::<i64>(&ids_guard, ids_layout)?;
    // At least one element: CUDA refuses zero-byte allocations (empty batches).
    let mut out = dev.alloc_zeros::<f32>((n * h + v * h + v).max(1))?;
    let grad_tile = dev.get_or_load_custom_func("sapo_linear_grad_tile", MODULE, PTX)?;
    let bias_grad = dev.get_or_load_custom_func("sapo_linear_bias_grad", MODULE, PTX)?;
    let inv_t = (1.0 / temperature) as f32;
    let has_bias_arg = i32::from(has_bias);
    for_each_tile(&dev, (&hidden, &weight), (n, h, v), |t, tile_logits| {
        let Tile { c0, c, v0, w } = t;
        let mut b = grad_tile.builder();
        let (v0_arg, w_arg, c0_arg, n_arg) = (v0 as i64, w as i64, c0 as i64, n as i64);
        b.arg(&mut *tile_logits)
            .arg(&bias)
            .arg(&has_bias_arg)
            .arg(&v0_arg)
            .arg(&w_arg);
        b.arg(&c0_arg)
            .arg(&n_arg)
            .arg(&ids)
            .arg(&inv_t)
            .arg(&res)
            .arg(&grad_res);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { b.launch(rows_config(c, w)) }.w()?;
        if has_bias {
            let mut grad_bias = out.slice_mut(n * h + v * h..n * h + v * h + v);
            let mut b = bias_grad.builder();
            let c_arg = c as i64;
            b.arg(&mut *tile_logits)
                .arg(&c_arg)
                .arg(&w_arg)
                .arg(&v0_arg)
                .arg(&mut grad_bias);
            // SAFETY: as above.
            unsafe { b.launch(linear_config(w)) }.w()?;
        }
        // ∂h (this chunk) += ∂L·W_tile; ∂W (this tile) += ∂Lᵀ·h_chunk.
        let mut grad_hidden = out.slice_mut(c0 * h..(c0 + c) * h);
        gemm(
            &dev,
            (false, false),
            (h, c, w),
            (&weight.slice(v0 * h..(v0 + w) * h), h),
            (&*tile_logits, w),
            1.0,
            (&mut grad_hidden, h),
        )?;
        let mut grad_weight = out.slice_mut(n * h + v0 * h..n * h + (v0 + w) * h);
        gemm(
            &dev,
            (false, true),
            (h, w, c),
            (&hidden.slice(c0 * h..(c0 + c) * h), h),
            (&*tile_logits, w),
            1.0,
            (&mut grad_weight, h),
        )
    })?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from(n * h + v * h + v),
    ))
}
