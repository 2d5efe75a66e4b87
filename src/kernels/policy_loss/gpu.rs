//! What the GPU kernels of the policy loss (`policy_loss.h`) take, built once for every GPU
//! backend (CUDA, Metal) and for the CPU simulation that tests them: the per-call constants as one `#[repr(C)]`
//! struct passed by value, the launch geometry, and the kernels' names.

use candle_core::DType;

use super::contract::{estimator_code, level_code};
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) use super::contract::{row::LEN as ROW_LEN, ROW_STATS};
pub(crate) use super::contract::{PolicyParams, GPU_OUT_LEN};
use super::FusedPolicyLoss;
use crate::aggregation::CoefficientParts;
use crate::kl::{K3_LOG_RATIO_BOUND, K3_VALUE_BOUND};

/// Threads per block for rows of `t` tokens: one warp for short rows, up to 256.
pub(crate) fn block_threads(t: usize) -> u32 {
    (t.div_ceil(32) * 32).clamp(32, 256) as u32
}

impl PolicyParams {
    /// The constants of `op` for `[rows, t]` log-probs.
    pub(crate) fn new(op: &FusedPolicyLoss, rows: usize, t: usize) -> Self {
        let config = &op.config;
        let objective = config.trust_region.objective();
        let gpu = objective.gpu();
        let mut slots = [-1i32; 4];
        for (slot, &s) in slots.iter_mut().zip(objective.metric_slots()) {
            *slot = s as i32;
        }
        let kl = config.kl;
        let inf = f32::INFINITY;
        let kl_clamp = kl.is_some_and(|k| k.clamp);
        Self {
            rows: rows as i32,
            t: t as i32,
            threads: block_threads(t) as i32,
            level: level_code(config.ratio_level),
            shape: objective.id(),
            shape_flag: gpu.flag,
            per_token_advantages: i32::from(op.advantages.rank() == 2),
            has_weights: i32::from(op.is_weights.is_some()),
            has_reference: i32::from(op.ref_log_probs.is_some()),
            has_flags: i32::from(op.flags.is_some()),
            kl: i32::from(kl.is_some()),
            kl_estimator: kl.map_or(0, |k| estimator_code(k.estimator)),
            kl_importance: i32::from(kl.is_some_and(|k| k.importance_weighted)),
            slots,
            clamp: config.log_ratio_clamp.map_or(inf, |c| c as f32),
            seq_max: config.seq_log_ratio_max.map_or(inf, |c| c as f32),
            kl_coef: kl.map_or(0.0, |k| k.coef as f32),
            kl_bounds: if kl_clamp {
                [K3_LOG_RATIO_BOUND as f32, K3_VALUE_BOUND as f32]
            } else {
                [inf, inf]
            },
            shape_param: gpu.params,
            policy_aggregation: CoefficientParts::new(config.aggregation, t, &op.normalizer).into(),
            kl_aggregation: kl
                .map(|k| CoefficientParts::new(k.aggregation, t, &op.normalizer).into())
                .unwrap_or_default(),
        }
    }

    /// The struct's bytes, as the kernels receive it.
    #[cfg(feature = "gpu-sim")]
    pub(crate) fn to_bytes(self) -> Vec<u8> {
        let size = std::mem::size_of::<Self>();
        // SAFETY: `Self` is #[repr(C)] plain data of 4-byte fields: no padding, every byte
        // initialised.
        unsafe { std::slice::from_raw_parts((&self as *const Self).cast::<u8>(), size) }.to_vec()
    }
}

/// The storage types of a call: `ℓ`'s dtype and whether the mask is `u8` (else `ℓ`'s dtype).
/// `None` for the dtypes the GPU kernels do not take (f64).
pub(crate) fn kernel_suffix(dtype: DType, mask_u8: bool) -> Option<&'static str> {
    Some(match (dtype, mask_u8) {
        (DType::F32, true) => "f32_u8",
        (DType::F32, false) => "f32_f32",
        (DType::F16, true) => "f16_u8",
        (DType::F16, false) => "f16_f16",
        (DType::BF16, true) => "bf16_u8",
        (DType::BF16, false) => "bf16_bf16",
        _ => return None,
    })
}

/// The GPU kernels run on the CPU by the simulation: the output `[GPU_OUT_LEN]` (f32); the
/// gradient is kept for the backward as on a device.
#[cfg(feature = "gpu-sim")]
pub(crate) fn simulate(
    target: crate::kernels::gpu::sim::Target,
    op: &FusedPolicyLoss,
    storage: &candle_core::CpuStorage,
    layout: &candle_core::Layout,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    use candle_core::backend::BackendStorage;
    use candle_core::Device;

    use crate::kernels::gpu::sim;

    let (rows, t) = layout.shape().dims2()?;
    let dtype = storage.dtype();
    let mask_u8 = op.mask.dtype() == DType::U8;
    if kernel_suffix(dtype, mask_u8).is_none() {
        candle_core::bail!("GPU simulation: unsupported dtype {dtype:?}");
    }
    let params = PolicyParams::new(op, rows, t);
    let dtype_code: u32 = match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        _ => 2,
    };
    let mut input = Vec::new();
    for word in [
        dtype_code,
        u32::from(mask_u8),
        std::mem::size_of::<PolicyParams>() as u32,
    ] {
        input.extend(word.to_le_bytes());
    }
    input.extend(params.to_bytes());
    input.extend(sim::storage_bytes(storage, layout)?);
    let constants = [
        Some(&op.old_log_probs),
        Some(&op.advantages),
        Some(&op.mask),
        op.is_weights.as_ref(),
        op.ref_log_probs.as_ref(),
        op.flags.as_ref(),
    ];
    for tensor in constants.into_iter().flatten() {
        input.extend(sim::tensor_bytes(tensor)?);
    }
    let output = sim::run(&METAL_PROGRAM, target, &input)?;
    let (out, grad) = output.split_at(4 * GPU_OUT_LEN);
    let out: Vec<f32> = out
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let grad = sim::tensor_from_bytes(grad, dtype, (rows, t), &Device::Cpu)?;
    *op.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
    Ok((
        candle_core::CpuStorage::F32(out),
        candle_core::Shape::from(GPU_OUT_LEN),
    ))
}

/// The Metal program of these kernels (`metal.rs` compiles it; the simulation runs it).
#[cfg(any(feature = "metal", feature = "gpu-sim"))]
pub(crate) const METAL_PROGRAM: crate::kernels::gpu::program::Program =
    crate::kernels::gpu::program::Program {
        op: "policy_loss",
        files: &[
            crate::kernels::gpu::program::COMMON,
            include_str!("contract.h"),
            include_str!("token.h"),
            include_str!("objectives.h"),
            include_str!("policy_loss.h"),
            include_str!("policy_loss.metal"),
        ],
        includes: Some(super::contract::objective_header),
    };
