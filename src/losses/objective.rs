//! What every objective is: the [`Objective`] trait, and the token as the objectives see it.
//!
//! An objective (a trust-region shape of the unified surrogate `l = −f(ρ)·A`, or the per-token
//! objective that replaces it) lives in one file of `losses/`, with its device function in the
//! header beside it (`<name>.h`), and implements [`Objective`]: its parameters' checks, its
//! scalar form ([`Shape`], what the CPU kernels run per token), its tensor form (the composed
//! path's), its GPU constants, its batch pre-pass and its flags. [`crate::TrustRegion`] holds one
//! of them and dispatches to it in one exhaustive match ([`crate::TrustRegion::visit`]), so an
//! objective that is added to the enum but not handled does not compile. The page
//! `docs/adding-an-objective.md` names every file a new one touches.
//!
//! Some objectives read the log-prob `ℓ` itself, not only the ratio (CISPO, GPG, DRO, DPPO,
//! VESPO weigh `ℓ` by a detached factor). An objective therefore sees the whole token
//! ([`Token`]): `ℓ`, `ℓold`, the log-ratio, the ratio, the advantage, and where it needs them a
//! row statistic (VESPO) or a per-token selection (KL-Cov); it returns the value, its slope in
//! the ratio and its direct slope in `ℓ`.
//!
//! Layer: objectives. Imports the math layer and `losses/{inputs,metrics}` only.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::losses::inputs::PolicyInputs;
use crate::real::Real;

/// One objective, everything about it in its own file.
pub(crate) trait Objective: Clone + 'static {
    /// Its name: its header is `losses/<NAME>.h`, its device function `<NAME>_eval` there, its
    /// GPU id `SAPO_OBJECTIVE_<NAME>` (upper case) in the generated `objectives.h`.
    const NAME: &'static str;
    /// Its id in `PolicyParams::shape` (the GPU kernels'); the ids are 0, 1, … in the order of
    /// [`crate::TrustRegion::visit_types`] (a test checks it).
    const ID: i32;
    /// Its device code: `include_str!("<NAME>.h")`.
    const DEVICE: &'static str;
    /// Whether it is defined at [`crate::RatioLevel::Token`] only (it weighs `ℓ` by a token
    /// quantity).
    const TOKEN_ONLY: bool = false;
    /// Whether it needs [`Objective::prepass`], a pass over the whole batch before the loss
    /// (the lm_head path's single pass cannot run it).
    const BATCH_PREPASS: bool = false;
    /// Whether it reads the rows' reward scores ([`PolicyInputs::scores`], TOPR), which are then
    /// required (and refused otherwise).
    const READS_SCORES: bool = false;
    /// Its scalar form in the compute type `R`.
    type Scalar<R: Real>: Shape<R>;

    /// Checks its parameters (a typed error naming the parameter).
    fn validate(&self) -> Result<()>;
    /// Its scalar form, the constants in the compute type.
    fn scalar<R: Real>(&self) -> Self::Scalar<R>;
    /// Its tensor form: the per-token loss and its metrics' per-token values.
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken>;
    /// The log-ratio transform before the ratio (tensor form): the identity but for GMPO.
    fn log_ratio(&self, log_ratio: &Tensor, _advantages: &Tensor) -> Result<Tensor> {
        Ok(log_ratio.clone())
    }
    /// Its constants as the GPU kernels read them (`shape_flag`, `shape_param`).
    #[cfg_attr(
        not(any(feature = "cuda", feature = "metal", feature = "gpu-sim")),
        allow(dead_code)
    )]
    fn gpu(&self) -> GpuShape {
        GpuShape::default()
    }
    /// The constants it derives from the whole batch (with [`Objective::BATCH_PREPASS`]).
    fn prepass(&self, _batch: &Batch<'_>) -> Result<Prepass> {
        Ok(Prepass::default())
    }
}

/// An objective's constants in the GPU kernels' `PolicyParams`.
#[cfg_attr(
    not(any(feature = "cuda", feature = "metal", feature = "gpu-sim")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct GpuShape {
    /// `shape_flag`: a switch of the objective (hard clip: dual clip on; DPPO: binary KL).
    pub flag: i32,
    /// `shape_param`: its parameters, as its device function reads them.
    pub params: [f32; 8],
}

#[cfg_attr(
    not(any(feature = "cuda", feature = "metal", feature = "gpu-sim")),
    allow(dead_code)
)]
impl GpuShape {
    /// The parameters `params`, the rest 0, no flag.
    pub(crate) fn new(params: &[f32]) -> Self {
        let mut out = Self::default();
        out.params[..params.len()].copy_from_slice(params);
        out
    }
}

/// What an objective's batch pre-pass reads.
pub(crate) struct Batch<'a> {
    /// The loss's inputs.
    pub inputs: &'a PolicyInputs<'a>,
    /// Tokens per row.
    pub t: usize,
    /// The config's log-ratio clamp `c` (the ratio a selection sees, as the loss's).
    pub log_ratio_clamp: Option<f64>,
    /// The mask as a 0/1 tensor of a dtype (its values checked, but on the GPU path, where the
    /// kernels check them).
    pub mask_as: &'a dyn Fn(DType) -> Result<Tensor>,
}

/// What an objective's batch pre-pass gives the loss (every path takes the same tensors).
#[derive(Debug, Default)]
pub(crate) struct Prepass {
    /// Rollout weights that replace the inputs' (GMPO's per-row geometric means, VESPO's row
    /// weights spread over the row).
    pub is_weights: Option<Tensor>,
    /// A per-token 0/1 selection (KL-Cov's tokens).
    pub flags: Option<Tensor>,
}

/// A body run with one objective, monomorphised for it: the one dispatch point is
/// [`crate::TrustRegion::visit`].
pub(crate) trait Visit {
    /// What the body returns.
    type Output;
    /// Runs the body with `objective`.
    fn visit<O: Objective>(self, objective: &O) -> Self::Output;
}

/// A body run once per objective type, in GPU-id order ([`crate::TrustRegion::visit_types`]).
pub(crate) trait VisitType {
    /// Runs the body for `O`.
    fn visit<O: Objective>(&mut self);
}

/// The queries of [`Objective`] that need no type parameter, on a boxed objective
/// ([`crate::TrustRegion::objective`]).
#[cfg_attr(
    not(any(feature = "cuda", feature = "metal", feature = "gpu-sim")),
    allow(dead_code)
)]
pub(crate) trait DynObjective {
    fn validate(&self) -> Result<()>;
    fn id(&self) -> i32;
    fn token_only(&self) -> bool;
    fn batch_prepass(&self) -> bool;
    fn reads_scores(&self) -> bool;
    /// The metric slots of its [`Eval::metrics`].
    fn metric_slots(&self) -> &'static [usize];
    /// Whether the rollout weights multiply its per-token loss.
    fn weights_multiply(&self) -> bool;
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken>;
    fn log_ratio(&self, log_ratio: &Tensor, advantages: &Tensor) -> Result<Tensor>;
    fn gpu(&self) -> GpuShape;
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass>;
}

impl<O: Objective> DynObjective for O {
    fn validate(&self) -> Result<()> {
        Objective::validate(self)
    }
    fn id(&self) -> i32 {
        O::ID
    }
    fn token_only(&self) -> bool {
        O::TOKEN_ONLY
    }
    fn batch_prepass(&self) -> bool {
        O::BATCH_PREPASS
    }
    fn reads_scores(&self) -> bool {
        O::READS_SCORES
    }
    fn metric_slots(&self) -> &'static [usize] {
        <O::Scalar<f32> as Shape<f32>>::SLOTS
    }
    fn weights_multiply(&self) -> bool {
        <O::Scalar<f32> as Shape<f32>>::WEIGHTS_MULTIPLY
    }
    fn per_token(&self, x: &TokenTensors<'_>) -> Result<PerToken> {
        Objective::per_token(self, x)
    }
    fn log_ratio(&self, log_ratio: &Tensor, advantages: &Tensor) -> Result<Tensor> {
        Objective::log_ratio(self, log_ratio, advantages)
    }
    fn gpu(&self) -> GpuShape {
        Objective::gpu(self)
    }
    fn prepass(&self, batch: &Batch<'_>) -> Result<Prepass> {
        Objective::prepass(self, batch)
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar form (the kernels').

/// One token as a shape sees it (all in the compute type; 0 at masked positions).
#[derive(Clone, Copy)]
pub(crate) struct Token<R> {
    /// `ℓ`.
    pub lp: R,
    /// `ℓold`.
    pub old: R,
    /// The log-ratio `δ = clamp(ℓ − ℓold, ±c)` (before the shape's own transform).
    pub delta: R,
    /// The ratio the shape sees (token `ρ` or sequence `s`).
    pub r: R,
    /// The advantage.
    pub a: R,
    /// The row statistic `Σ_t m·row_term` (shapes with `ROW_STATISTIC`), else 0.
    pub row: R,
    /// The per-token flag (KL-Cov's selection, TOPR's positive rows), else 0.
    pub flag: R,
}

/// What one token contributes, from the trust region.
#[derive(Clone, Copy)]
pub(crate) struct Eval<R> {
    /// `−f(ρ)·A` (or the objective's per-token loss).
    pub value: R,
    /// `∂value/∂ρ` (through the ratio).
    pub slope: R,
    /// `∂value/∂ℓ` at a fixed ratio (the shapes that read `ℓ` itself).
    pub direct: R,
    /// Per-token metric values, for the slots `Shape::SLOTS` (in that order).
    pub metrics: [R; 4],
}

impl<R: Real> Eval<R> {
    /// An evaluation through the ratio only.
    #[inline(always)]
    pub(crate) fn through_ratio(value: R, slope: R, metrics: [R; 4]) -> Self {
        Self {
            value,
            slope,
            direct: R::ZERO,
            metrics,
        }
    }
}

/// The scalar form of an objective, evaluated token by token by the kernels.
pub(crate) trait Shape<R: Real>: Sync {
    /// The metric slots of `Eval::metrics`.
    const SLOTS: &'static [usize];
    /// Whether the rollout weights multiply the per-token loss.
    const WEIGHTS_MULTIPLY: bool = true;
    /// Whether [`Shape::eval`] reads [`Token::row`], the row sum of [`Shape::row_term`].
    const ROW_STATISTIC: bool = false;
    /// The per-token term summed over the row (masked) into `Token::row`.
    #[inline(always)]
    fn row_term(&self, _delta: R, _w: R) -> R {
        R::ZERO
    }
    /// Whether [`Shape::log_ratio`] is not the identity (GMPO; read by the GPU contract's
    /// generator).
    #[cfg_attr(not(test), allow(dead_code))]
    const TRANSFORMS_LOG_RATIO: bool = false;
    /// The log-ratio the ratio is taken of, and its derivative in `δ` (identity but for GMPO).
    #[inline(always)]
    fn log_ratio(&self, delta: R, _a: R) -> (R, R) {
        (delta, R::ONE)
    }
    /// The token's loss, its slopes and its metric values.
    fn eval(&self, t: &Token<R>) -> Eval<R>;
}

// ---------------------------------------------------------------------------------------------
// Tensor form (the composed path's).

/// The tensors a shape's tensor form reads (scrubbed: 0 at masked positions).
pub(crate) struct TokenTensors<'a> {
    /// `ℓ`, carrying the gradient.
    pub log_probs: &'a Tensor,
    /// `ℓold`.
    pub old_log_probs: &'a Tensor,
    /// `δ`, carrying the gradient (before the shape's transform).
    pub log_ratio: &'a Tensor,
    /// The ratio the shape sees, carrying the gradient.
    pub ratio: &'a Tensor,
    /// `[B,T]` advantages.
    pub advantages: &'a Tensor,
    /// `[B,T]` 0/1 mask in the compute dtype.
    pub mask: &'a Tensor,
    /// `[B,T]` rollout weights, if any.
    pub is_weights: Option<&'a Tensor>,
    /// `[B,T]` KL-Cov selection, if any.
    pub flags: Option<&'a Tensor>,
}

/// The per-token policy loss `−f(ρ)·A` and the per-token values of the shape's metrics.
pub(crate) struct PerToken {
    pub loss: Tensor,
    /// `(slot, [B,T] values)`, detached; masked and summed by the caller.
    pub metrics: Vec<(usize, Tensor)>,
}

/// `[cond]` as a 0/1 tensor of `like`'s dtype.
pub(crate) fn indicator(cond: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(cond.to_dtype(like.dtype())?)
}
