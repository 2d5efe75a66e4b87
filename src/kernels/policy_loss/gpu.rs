//! What the GPU kernels of the policy loss (`policy_loss.h`) take, built once for every GPU
//! backend (CUDA, Metal) and for the CPU simulation that tests them: the per-call constants as one `#[repr(C)]`
//! struct passed by value, the launch geometry, and the kernels' names.

use candle_core::DType;

use super::FusedPolicyLoss;
use crate::aggregation::{BatchCount, CoefficientParts, RowDivisor};
use crate::kl::{KlEstimator, K3_LOG_RATIO_BOUND, K3_VALUE_BOUND};
use crate::losses::ratio::RatioLevel;
use crate::losses::trust_region::TrustRegion;
use crate::losses::vespo::{VESPO_LOG_W_MAX, VESPO_LOG_W_MIN};

/// `[loss, sums (NUM_SLOTS), ratio min, ratio max, invalid counts (6)]`: the GPU output, with
/// the value checks' counts (mask values other than 0/1, then non-finite unmasked `ℓ`, `ℓold`,
/// `A`, `w`, `ℓref`) that the CPU kernel turns into an error at once.
pub(crate) const GPU_OUT_LEN: usize = super::OUT_LEN + CHECKS;
/// The number of value-check counts at the end of the GPU output.
pub(crate) const CHECKS: usize = 6;
/// Floats per row in the `rows` kernel's record (`ROW_LEN` in `policy_loss.h`).
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) const ROW_LEN: usize = 28;
/// Floats per row in the `prepass` kernel's record.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(crate) const ROW_STATS: usize = 4;

/// An aggregation's [`CoefficientParts`] as the kernel reads them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct AggregationParams {
    batch: i32,
    row: i32,
    world: f32,
    global: f32,
    row_constant: f32,
}

impl From<CoefficientParts> for AggregationParams {
    fn from(parts: CoefficientParts) -> Self {
        let (row, row_constant) = match parts.row {
            RowDivisor::One => (0, 0.0),
            RowDivisor::Tokens => (1, 0.0),
            RowDivisor::Constant(c) => (2, c as f32),
        };
        Self {
            batch: match parts.batch {
                BatchCount::One => 0,
                BatchCount::Tokens => 1,
                BatchCount::Sequences => 2,
                BatchCount::Rows => 3,
            },
            row,
            world: parts.world as f32,
            global: parts.global.map_or(-1.0, |g| g as f32),
            row_constant,
        }
    }
}

/// The per-call constants of `policy_loss.h` (its `PolicyParams`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PolicyParams {
    rows: i32,
    t: i32,
    pub(crate) threads: i32,
    level: i32,
    shape: i32,
    shape_flag: i32,
    per_token_advantages: i32,
    has_weights: i32,
    has_reference: i32,
    has_flags: i32,
    kl: i32,
    kl_estimator: i32,
    kl_importance: i32,
    slots: [i32; 4],
    clamp: f32,
    seq_max: f32,
    kl_coef: f32,
    kl_bounds: [f32; 2],
    shape_param: [f32; 8],
    policy_aggregation: AggregationParams,
    kl_aggregation: AggregationParams,
}

/// Threads per block for rows of `t` tokens: one warp for short rows, up to 256.
pub(crate) fn block_threads(t: usize) -> u32 {
    (t.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// `(id, flag, parameters)` of a trust region as `shape_eval` in `policy_loss.h` reads them,
/// taken from the shape's scalar form (the constants the CPU kernel runs).
fn shape_params(trust_region: &TrustRegion) -> (i32, i32, [f32; 8]) {
    let mut s = [0.0f32; 8];
    let (id, flag) = match trust_region {
        TrustRegion::SoftGate { tau_pos, tau_neg } => {
            s[..2].copy_from_slice(&[*tau_pos as f32, *tau_neg as f32]);
            (0, 0)
        }
        TrustRegion::HardClip(c) => {
            let b = c.bounds::<f32>();
            s[..4].copy_from_slice(&[b.low, b.high, b.delta, b.dual.unwrap_or(0.0)]);
            (1, i32::from(b.dual.is_some()))
        }
        TrustRegion::Unclipped => (2, 0),
        TrustRegion::PolicyGradient => (3, 0),
        TrustRegion::Cispo(c) => {
            let b = c.bounds::<f32>();
            s[..2].copy_from_slice(&[b.low, b.high]);
            (4, 0)
        }
        TrustRegion::Dro(d) => {
            s[0] = d.shape::<f32>().beta;
            (5, 0)
        }
        TrustRegion::KlCov(k) => {
            s[0] = k.shape::<f32>().coef;
            (6, 0)
        }
        TrustRegion::Dppo(d) => {
            let b = d.shape::<f32>();
            s[..3].copy_from_slice(&[b.low, b.high, b.cap]);
            (7, i32::from(b.kl))
        }
        TrustRegion::Vespo(v) => {
            let b = v.shape::<f32>();
            s.copy_from_slice(&[
                b.k_pos,
                b.lambda_pos,
                b.k_neg,
                b.lambda_neg,
                b.min,
                b.max,
                VESPO_LOG_W_MIN as f32,
                VESPO_LOG_W_MAX as f32,
            ]);
            (8, 0)
        }
        TrustRegion::GeometricClip(g) => {
            let b = g.shape::<f32>();
            s[..2].copy_from_slice(&[b.low, b.high]);
            (9, 0)
        }
    };
    (id, flag, s)
}

impl PolicyParams {
    /// The constants of `op` for `[rows, t]` log-probs.
    pub(crate) fn new(op: &FusedPolicyLoss, rows: usize, t: usize) -> Self {
        let config = &op.config;
        let (shape, shape_flag, shape_param) = shape_params(&config.trust_region);
        let mut slots = [-1i32; 4];
        for (slot, &s) in slots.iter_mut().zip(config.trust_region.metric_slots()) {
            *slot = s as i32;
        }
        let kl = config.kl;
        let inf = f32::INFINITY;
        let kl_clamp = kl.is_some_and(|k| k.clamp);
        Self {
            rows: rows as i32,
            t: t as i32,
            threads: block_threads(t) as i32,
            level: match config.ratio_level {
                RatioLevel::Token => 0,
                RatioLevel::Sequence => 1,
                RatioLevel::SequenceToken => 2,
            },
            shape,
            shape_flag,
            per_token_advantages: i32::from(op.advantages.rank() == 2),
            has_weights: i32::from(op.is_weights.is_some()),
            has_reference: i32::from(op.ref_log_probs.is_some()),
            has_flags: i32::from(op.flags.is_some()),
            kl: i32::from(kl.is_some()),
            kl_estimator: match kl.map(|k| k.estimator) {
                None | Some(KlEstimator::K1) => 0,
                Some(KlEstimator::Abs) => 1,
                Some(KlEstimator::K2) => 2,
                Some(KlEstimator::K3) => 3,
                Some(KlEstimator::K3Plus) => 4,
            },
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
            shape_param,
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
            include_str!("policy_loss.h"),
            include_str!("policy_loss.metal"),
        ],
    };
