//! The policy loss on Metal: the three dispatches of `policy_loss.h` through the entry points of
//! `policy_loss.metal` (compiled once per device, `gpu/metal.rs`), with no host read: the value
//! checks come back in the output (see [`crate::PolicyMetrics::check`]). The simulation
//! (`gpu.rs`, `sim.cpp`) runs the same dispatches on the CPU.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, MetalDevice, MetalStorage, Shape, Storage, Tensor};
use candle_metal_kernels::metal::Buffer;
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::{Input, Output};
use candle_metal_kernels::BufferOffset;

use super::gpu::{kernel_suffix, PolicyParams, GPU_OUT_LEN, METAL_PROGRAM, ROW_LEN, ROW_STATS};
use super::FusedPolicyLoss;
use crate::kernels::gpu::metal::{
    input, optional_input, output, pipeline, size, storage_input, threads,
};

/// The buffers of one call: the inputs (absent ones stand in as the log-probs, never read) and
/// the outputs, all allocated before the encoder is taken.
struct Buffers<'a> {
    log_probs: BufferOffset<'a>,
    old: BufferOffset<'a>,
    adv: BufferOffset<'a>,
    mask: BufferOffset<'a>,
    weights: BufferOffset<'a>,
    reference: BufferOffset<'a>,
    flags: BufferOffset<'a>,
    row_stats: Arc<Buffer>,
    row_out: Arc<Buffer>,
    out: Arc<Buffer>,
    grad: Arc<Buffer>,
}

/// `metal_fwd` of [`FusedPolicyLoss`]: the output `[GPU_OUT_LEN]` (f32); the gradient is kept.
pub(super) fn forward(
    op: &FusedPolicyLoss,
    storage: &MetalStorage,
    layout: &Layout,
) -> candle_core::Result<(MetalStorage, Shape)> {
    let dtype = storage.dtype();
    let Some(suffix) = kernel_suffix(dtype, op.mask.dtype() == DType::U8) else {
        candle_core::bail!("Metal policy loss: unsupported dtype {dtype:?}")
    };
    let device = storage.device();
    let (rows, t) = layout.shape().dims2()?;
    let params = PolicyParams::new(op, rows, t);

    let old = op.old_log_probs.storage_and_layout();
    let adv = op.advantages.storage_and_layout();
    let mask = op.mask.storage_and_layout();
    let weights = op.is_weights.as_ref().map(Tensor::storage_and_layout);
    let reference = op.ref_log_probs.as_ref().map(Tensor::storage_and_layout);
    let flags = op.flags.as_ref().map(Tensor::storage_and_layout);
    let log_probs = input(storage, layout)?;
    let buffer = |count, dtype| output(device, count, dtype, "sapo-policy-loss");
    let buffers = Buffers {
        old: storage_input(&old.0, old.1)?,
        adv: storage_input(&adv.0, adv.1)?,
        mask: storage_input(&mask.0, mask.1)?,
        weights: optional_input(&weights, &log_probs)?,
        reference: optional_input(&reference, &log_probs)?,
        flags: optional_input(&flags, &log_probs)?,
        log_probs,
        row_stats: buffer(rows * ROW_STATS, DType::F32)?,
        row_out: buffer(rows * ROW_LEN, DType::F32)?,
        out: buffer(GPU_OUT_LEN, DType::F32)?,
        grad: buffer(rows * t, dtype)?,
    };
    encode(device, suffix, &params, rows, &buffers)?;

    let grad = MetalStorage::new(buffers.grad, device.clone(), rows * t, dtype);
    let grad = Tensor::from_storage(Storage::Metal(grad), (rows, t), BackpropOp::none(), false);
    *op.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
    Ok((
        MetalStorage::new(buffers.out, device.clone(), GPU_OUT_LEN, DType::F32),
        Shape::from(GPU_OUT_LEN),
    ))
}

/// The three dispatches (the row pre-pass and the rows when there are rows, the reduction) on
/// one encoder.
fn encode(
    device: &MetalDevice,
    suffix: &str,
    params: &PolicyParams,
    rows: usize,
    b: &Buffers<'_>,
) -> candle_core::Result<()> {
    let kernel = |name: &str| pipeline(device, &METAL_PROGRAM, name);
    let prepass = kernel(&format!("sapo_policy_prepass_{suffix}"))?;
    let rows_pipeline = kernel(&format!("sapo_policy_rows_{suffix}"))?;
    let reduce = kernel("sapo_policy_reduce")?;
    let params_bytes = std::slice::from_ref(params);
    let encoder = device.command_encoder()?;
    let encoder = encoder.as_ref();
    encoder.set_label("sapo-policy-loss");
    if rows > 0 {
        encoder.set_compute_pipeline_state(&prepass);
        set_params!(
            encoder,
            (
                &b.log_probs,
                &b.old,
                &b.adv,
                &b.mask,
                &b.weights,
                params_bytes,
                Output::new(&b.row_stats)
            )
        );
        encoder.dispatch_thread_groups(size(rows), threads(&prepass, params.threads as u32));

        encoder.set_compute_pipeline_state(&rows_pipeline);
        set_params!(
            encoder,
            (
                &b.log_probs,
                &b.old,
                &b.adv,
                &b.mask,
                &b.weights,
                &b.reference,
                &b.flags,
                params_bytes,
                Input::new(&b.row_stats),
                Output::new(&b.row_out),
                Output::new(&b.grad)
            )
        );
        let block = threads(&rows_pipeline, params.threads as u32);
        encoder.dispatch_thread_groups(size(rows), block);
    }
    encoder.set_compute_pipeline_state(&reduce);
    set_params!(
        encoder,
        (
            params_bytes,
            Input::new(&b.row_stats),
            Input::new(&b.row_out),
            Output::new(&b.out)
        )
    );
    encoder.dispatch_thread_groups(size(1), threads(&reduce, 256));
    Ok(())
}
