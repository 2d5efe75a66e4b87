//! What the GPU kernels of the token log-probs (`log_probs.h`) take, for every GPU backend and
//! for the CPU simulation that tests them: the launch geometry and the kernels' names.

#[cfg(feature = "gpu-sim")]
use crate::kernels::gpu::sim;
use candle_core::DType;

/// Threads per block for rows of `vocab` logits: about 16 logits per thread, 32 to 1024.
pub(crate) fn block_threads(vocab: usize) -> u32 {
    (vocab.div_ceil(16).div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// The kernels' name suffix for logits of `dtype` and targets of `targets`; `None` for the
/// dtypes the GPU kernels do not take.
pub(crate) fn kernel_suffix(dtype: DType, targets: DType) -> Option<&'static str> {
    Some(match (dtype, targets) {
        (DType::F32, DType::U8) => "f32_u8",
        (DType::F32, DType::U32) => "f32_u32",
        (DType::F32, DType::I64) => "f32_i64",
        (DType::F16, DType::U8) => "f16_u8",
        (DType::F16, DType::U32) => "f16_u32",
        (DType::F16, DType::I64) => "f16_i64",
        (DType::BF16, DType::U8) => "bf16_u8",
        (DType::BF16, DType::U32) => "bf16_u32",
        (DType::BF16, DType::I64) => "bf16_i64",
        _ => return None,
    })
}

/// The simulation's input header: mode, storage types, geometry, `1/T`.
#[cfg(feature = "gpu-sim")]
fn header(
    backward: bool,
    dtype: DType,
    targets: DType,
    (rows, vocab): (usize, usize),
    inv_t: f32,
) -> candle_core::Result<Vec<u8>> {
    if kernel_suffix(dtype, targets).is_none() {
        candle_core::bail!("GPU simulation: unsupported dtypes {dtype:?}, {targets:?}");
    }
    let code = |d| match d {
        DType::F32 | DType::U8 => 0u32,
        DType::F16 | DType::U32 => 1,
        _ => 2,
    };
    let mut out = Vec::new();
    for word in [
        u32::from(backward),
        code(dtype),
        code(targets),
        block_threads(vocab),
    ] {
        out.extend(word.to_le_bytes());
    }
    out.extend((rows as i64).to_le_bytes());
    out.extend((vocab as i64).to_le_bytes());
    out.extend(inv_t.to_le_bytes());
    Ok(out)
}

/// The forward kernel run on the CPU by the simulation: `[3, N]` (f32).
#[cfg(feature = "gpu-sim")]
pub(crate) fn simulate_forward(
    target: sim::Target,
    targets: &candle_core::Tensor,
    temperature: f64,
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;

    let (rows, vocab) = layout.shape().dims2()?;
    let inv_t = (1.0 / temperature) as f32;
    let mut input = header(
        false,
        storage.dtype(),
        targets.dtype(),
        (rows, vocab),
        inv_t,
    )?;
    input.extend(sim::storage_bytes(storage, layout)?);
    input.extend(sim::tensor_bytes(targets)?);
    let out = sim::run(&METAL_PROGRAM, target, &input)?;
    let values = sim::tensor_from_bytes(&out, DType::F32, 3 * rows, &candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok((
        candle_core::CpuStorage::F32(values),
        candle_core::Shape::from((3, rows)),
    ))
}

/// The backward kernel run on the CPU by the simulation: the logits' gradient.
#[cfg(feature = "gpu-sim")]
pub(crate) fn simulate_backward(
    target: sim::Target,
    targets: &candle_core::Tensor,
    temperature: f64,
    (logits, logits_layout): (&candle_core::CpuStorage, &candle_core::Layout),
    (res, res_layout): (&candle_core::CpuStorage, &candle_core::Layout),
    (grad, grad_layout): (&candle_core::CpuStorage, &candle_core::Layout),
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;

    let shape = logits_layout.shape().clone();
    let (rows, vocab) = shape.dims2()?;
    let dtype = logits.dtype();
    let inv_t = (1.0 / temperature) as f32;
    let mut input = header(true, dtype, targets.dtype(), (rows, vocab), inv_t)?;
    input.extend(sim::storage_bytes(logits, logits_layout)?);
    input.extend(sim::tensor_bytes(targets)?);
    input.extend(sim::storage_bytes(res, res_layout)?);
    input.extend(sim::storage_bytes(grad, grad_layout)?);
    let out = sim::run(&METAL_PROGRAM, target, &input)?;
    let grad = sim::tensor_from_bytes(&out, dtype, (rows, vocab), &candle_core::Device::Cpu)?;
    let (storage, _) = grad.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("GPU simulation: gradient not on the CPU")
    };
    Ok((cpu.clone(), shape))
}

/// The Metal program of these kernels (`metal.rs` compiles it; the simulation runs it).
#[cfg(any(feature = "metal", feature = "gpu-sim"))]
pub(crate) const METAL_PROGRAM: crate::kernels::gpu::program::Program =
    crate::kernels::gpu::program::Program {
        op: "log_probs",
        files: &[
            crate::kernels::gpu::program::COMMON,
            crate::kernels::gpu::program::SOFTMAX,
            include_str!("log_probs.h"),
            include_str!("log_probs.metal"),
        ],
        includes: None,
    };
