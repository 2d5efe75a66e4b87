//! The policy loss on Metal: the three dispatches of `policy_loss.h` through the entry points of
//! `policy_loss.metal` (compiled once per device, `gpu/metal.rs`), with no host read: the value
//! checks come back in the output (see [`crate::PolicyMetrics::check`]). The simulation
//! (`gpu.rs`, `sim.cpp`) runs the same dispatches on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, MetalStorage, Shape, Storage, Tensor};
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::{Input, Output};

use super::gpu::{kernel_suffix, PolicyParams, GPU_OUT_LEN, METAL_PROGRAM, ROW_LEN, ROW_STATS};
use super::FusedPolicyLoss;
use crate::kernels::gpu::metal::{
    input, optional_input, output, pipeline, size, storage_input, threads,
};

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
    let prepass = pipeline(
        device,
        &METAL_PROGRAM,
        &format!("sapo_policy_prepass_{suffix}"),
    )?;
    let rows_pipeline = pipeline(
        device,
        &METAL_PROGRAM,
        &format!("sapo_policy_rows_{suffix}"),
    )?;
    let reduce = pipeline(device, &METAL_PROGRAM, "sapo_policy_reduce")?;

    let old = op.old_log_probs.storage_and_layout();
    let adv = op.advantages.storage_and_layout();
    let mask = op.mask.storage_and_layout();
    let weights = op.is_weights.as_ref().map(Tensor::storage_and_layout);
    let reference = op.ref_log_probs.as_ref().map(Tensor::storage_and_layout);
    let flags = op.flags.as_ref().map(Tensor::storage_and_layout);
    let log_probs = input(storage, layout)?;
    let old = storage_input(&old.0, old.1)?;
    let adv = storage_input(&adv.0, adv.1)?;
    let mask = storage_input(&mask.0, mask.1)?;
    // Absent inputs are never read: the log-probs stand in.
    let weights = optional_input(&weights, &log_probs)?;
    let reference = optional_input(&reference, &log_probs)?;
    let flags = optional_input(&flags, &log_probs)?;

    // Every buffer is allocated before the encoder is taken.
    let buffer = |count, dtype| output(device, count, dtype, "sapo-policy-loss");
    let row_stats = buffer(rows * ROW_STATS, DType::F32)?;
    let row_out = buffer(rows * ROW_LEN, DType::F32)?;
    let out = buffer(GPU_OUT_LEN, DType::F32)?;
    let grad = buffer(rows * t, dtype)?;
    let params_bytes = std::slice::from_ref(&params);
    {
        let encoder = device.command_encoder()?;
        let encoder = encoder.as_ref();
        encoder.set_label("sapo-policy-loss");
        if rows > 0 {
            encoder.set_compute_pipeline_state(&prepass);
            set_params!(
                encoder,
                (
                    &log_probs,
                    &old,
                    &adv,
                    &mask,
                    &weights,
                    params_bytes,
                    Output::new(&row_stats)
                )
            );
            encoder.dispatch_thread_groups(size(rows), threads(&prepass, params.threads as u32));

            encoder.set_compute_pipeline_state(&rows_pipeline);
            set_params!(
                encoder,
                (
                    &log_probs,
                    &old,
                    &adv,
                    &mask,
                    &weights,
                    &reference,
                    &flags,
                    params_bytes,
                    Input::new(&row_stats),
                    Output::new(&row_out),
                    Output::new(&grad)
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
                Input::new(&row_stats),
                Input::new(&row_out),
                Output::new(&out)
            )
        );
        encoder.dispatch_thread_groups(size(1), threads(&reduce, 256));
    }

    let grad = MetalStorage::new(grad, device.clone(), rows * t, dtype);
    let grad = Tensor::from_storage(Storage::Metal(grad), (rows, t), BackpropOp::none(), false);
    *op.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
    Ok((
        MetalStorage::new(out, device.clone(), GPU_OUT_LEN, DType::F32),
        Shape::from(GPU_OUT_LEN),
    ))
}
