//! Token log-probs and entropy on Metal: the dispatches of `log_probs.h` through the entry points
//! of `log_probs.metal` (compiled once per device, `gpu/metal.rs`); nothing is read on the host.
//! The simulation (`gpu.rs`, `sim.cpp`) runs the same dispatches on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalStorage, Shape, Tensor};
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::Output;

use super::gpu::{block_threads, kernel_suffix, METAL_PROGRAM};
use crate::kernels::gpu::metal::{input, output, pipeline, size, storage_input, threads};

/// The kernel suffix of a call, or the error.
fn suffix(dtype: DType, targets: DType) -> candle_core::Result<&'static str> {
    kernel_suffix(dtype, targets).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "Metal log-probs: unsupported dtypes {dtype:?}, {targets:?}"
        ))
    })
}

/// `metal_fwd` of the forward op: `[3, N]` (f32).
pub(super) fn forward(
    targets: &Tensor,
    temperature: f64,
    logits: &MetalStorage,
    layout: &Layout,
) -> candle_core::Result<(MetalStorage, Shape)> {
    let suffix = suffix(logits.dtype(), targets.dtype())?;
    let device = logits.device();
    let (rows, vocab) = layout.shape().dims2()?;
    let kernel = pipeline(
        device,
        &METAL_PROGRAM,
        &format!("sapo_log_probs_forward_{suffix}"),
    )?;
    let (guard, target_layout) = targets.storage_and_layout();
    let (x, ids) = (
        input(logits, layout)?,
        storage_input(&guard, target_layout)?,
    );
    let out = output(device, 3 * rows, DType::F32, "sapo-log-probs")?;
    if rows > 0 {
        let encoder = device.command_encoder()?;
        let encoder = encoder.as_ref();
        encoder.set_label("sapo-log-probs");
        encoder.set_compute_pipeline_state(&kernel);
        let inv_t = (1.0 / temperature) as f32;
        set_params!(
            encoder,
            (
                &x,
                &ids,
                vocab as i64,
                inv_t,
                rows as i64,
                Output::new(&out)
            )
        );
        encoder.dispatch_thread_groups(size(rows), threads(&kernel, block_threads(vocab)));
    }
    Ok((
        MetalStorage::new(out, device.clone(), 3 * rows, DType::F32),
        Shape::from((3, rows)),
    ))
}

/// `metal_fwd` of the backward op: the logits' gradient, in their dtype, from the forward's
/// output and its upstream gradient (`[3, N]`, f32).
pub(super) fn backward(
    targets: &Tensor,
    temperature: f64,
    (logits, layout): (&MetalStorage, &Layout),
    ((res, res_layout), (grad, grad_layout)): ((&MetalStorage, &Layout), (&MetalStorage, &Layout)),
) -> candle_core::Result<(MetalStorage, Shape)> {
    let dtype = logits.dtype();
    let suffix = suffix(dtype, targets.dtype())?;
    if res.dtype() != DType::F32 || grad.dtype() != DType::F32 {
        candle_core::bail!("Metal log-probs backward: the row statistics must be f32")
    }
    let device = logits.device();
    let (rows, vocab) = layout.shape().dims2()?;
    let kernel = pipeline(
        device,
        &METAL_PROGRAM,
        &format!("sapo_log_probs_backward_{suffix}"),
    )?;
    let (guard, target_layout) = targets.storage_and_layout();
    let (x, ids) = (
        input(logits, layout)?,
        storage_input(&guard, target_layout)?,
    );
    let (res, grad) = (input(res, res_layout)?, input(grad, grad_layout)?);
    let out = output(device, rows * vocab, dtype, "sapo-log-probs-backward")?;
    if rows > 0 {
        let encoder = device.command_encoder()?;
        let encoder = encoder.as_ref();
        encoder.set_label("sapo-log-probs-backward");
        encoder.set_compute_pipeline_state(&kernel);
        let inv_t = (1.0 / temperature) as f32;
        set_params!(
            encoder,
            (
                &x,
                &ids,
                vocab as i64,
                inv_t,
                rows as i64,
                &res,
                &grad,
                Output::new(&out)
            )
        );
        encoder.dispatch_thread_groups(size(rows), threads(&kernel, block_threads(vocab)));
    }
    Ok((
        MetalStorage::new(out, device.clone(), rows * vocab, dtype),
        layout.shape().clone(),
    ))
}
