//! The trust-region shape `f` in the unified surrogate `l = −f(ρ)·A`, or the per-token
//! objective that replaces it: the enum a user configures, and the one dispatch from it to the
//! objective it holds ([`TrustRegion::visit`]). Each objective lives in its own file
//! (`soft_gate.rs`, `clip.rs`, `unclipped.rs`, `policy_gradient.rs`, `cispo.rs`, `dro.rs`,
//! `kl_cov.rs`, `dppo.rs`, `vespo.rs`, `gmpo.rs`, `topr.rs`, `clip_cov.rs`, `gate_family.rs`) behind [`Objective`]; adding one is the
//! page `docs/adding-an-objective.md`.
//!
//! Layer: objectives.

use crate::error::Result;
use crate::gate::GateFunction;
use crate::losses::cispo::IsWeightClip;
use crate::losses::clip::HardClip;
use crate::losses::clip_cov::ClipCov;
use crate::losses::dppo::Dppo;
use crate::losses::dro::Dro;
use crate::losses::gate_family::GateFamily;
use crate::losses::gmpo::GeometricClip;
use crate::losses::kl_cov::KlCov;
use crate::losses::objective::{DynObjective, Objective, Visit, VisitType};
use crate::losses::policy_gradient::PolicyGradient;
use crate::losses::soft_gate::SoftGate;
use crate::losses::topr::Topr;
use crate::losses::unclipped::Unclipped;
use crate::losses::vespo::Vespo;

/// The trust-region shape `f` in `loss = −f(ρ)·A`, or the per-token objective that replaces it.
///
/// ```
/// use sapo::{HardClip, TrustRegion};
/// let soft = TrustRegion::SoftGate { tau_pos: 1.0, tau_neg: 1.05, gate: sapo::GateFunction::Sigmoid };
/// assert!(soft.validate().is_ok());
/// assert!(TrustRegion::HardClip(HardClip::new(0.2, -0.1)).validate().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrustRegion {
    /// SAPO's gate `f(ρ) = σ(τ(ρ−1))·4/τ`, `τ = τ_pos` if `A > 0` else `τ_neg` (or another gate
    /// of the family, [`GateFunction`]).
    SoftGate {
        /// Temperature for positive advantages (> 0).
        tau_pos: f64,
        /// Temperature for non-positive advantages (> 0).
        tau_neg: f64,
        /// The gate function (SAPO's sigmoid by default).
        gate: GateFunction,
    },
    /// PPO's clip (GRPO, GSPO, DAPO, dual clip, two-sided δ).
    HardClip(HardClip),
    /// No trust region: `f(ρ) = ρ` (vanilla importance-weighted policy gradient).
    Unclipped,
    /// CISPO: `l = −sg[clip_w(ρ)]·A·ℓ` (verl's bounds or TRL's cap, [`IsWeightClip`]).
    Cispo(IsWeightClip),
    /// GPG / REINFORCE: `l = −A·ℓ` (verl `gpg`; bypass mode's `reinforce`).
    PolicyGradient,
    /// DRO: `l = −(A·ℓ − ½β(ℓ − ℓold)²)`.
    Dro(Dro),
    /// KL-Cov: `l = −A·ρ + [t ∈ S]·κ·|ℓ − ℓold|` on the highest-covariance tokens `S`.
    KlCov(KlCov),
    /// DPPO: `l = −A·sg[min(ρ, C)]·ℓ·valid` inside a binary TV or KL trust region.
    Dppo(Dppo),
    /// VESPO: `l = −sg[φ_i]·A·ℓ` with a gamma-shaped sequence weight `φ_i`.
    Vespo(Vespo),
    /// GMPO's sign-aware clip of the log-ratio, `y = sgn(A)·min(sgn(A)·x, sgn(A)·clamp(x))`,
    /// then `f = e^y` (with [`crate::RatioLevel::Sequence`]: the geometric mean of the clipped
    /// token ratios).
    GeometricClip(GeometricClip),
    /// TOPR (ROLL `topr`): `l = −w₊·A·ℓ` on rows with a positive reward score, else
    /// `l = −w₋·sg[min(ρ, 1)]·A·ℓ`; needs [`crate::PolicyInputs::with_scores`].
    Topr(Topr),
    /// Clip-Cov (verl `clip_cov`): PPO's clip with the loss of a seeded random subset of the
    /// high-covariance tokens multiplied by 0.
    ClipCov(ClipCov),
}

impl TrustRegion {
    /// Checks the shape's parameters (τ finite and > 0 with `4/τ` finite in f32; the clip's
    /// bounds; every new objective's ranges).
    ///
    /// ```
    /// let bad = sapo::TrustRegion::SoftGate { tau_pos: 1e-40, tau_neg: 1.0, gate: Default::default() };
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.objective().validate()
    }

    /// Runs `body` with the objective this holds: the one dispatch from the enum to the
    /// objectives (exhaustive: a variant not handled here does not compile).
    pub(crate) fn visit<V: Visit>(&self, body: V) -> V::Output {
        match *self {
            // The sigmoid keeps its own objective (a branch-free scalar form the kernels
            // vectorize); the other gates share one.
            Self::SoftGate {
                tau_pos,
                tau_neg,
                gate: GateFunction::Sigmoid,
            } => body.visit(&SoftGate { tau_pos, tau_neg }),
            Self::SoftGate {
                tau_pos,
                tau_neg,
                gate,
            } => body.visit(&GateFamily {
                tau_pos,
                tau_neg,
                gate,
            }),
            Self::HardClip(ref o) => body.visit(o),
            Self::Unclipped => body.visit(&Unclipped),
            Self::PolicyGradient => body.visit(&PolicyGradient),
            Self::Cispo(ref o) => body.visit(o),
            Self::Dro(ref o) => body.visit(o),
            Self::KlCov(ref o) => body.visit(o),
            Self::Dppo(ref o) => body.visit(o),
            Self::Vespo(ref o) => body.visit(o),
            Self::GeometricClip(ref o) => body.visit(o),
            Self::Topr(ref o) => body.visit(o),
            Self::ClipCov(ref o) => body.visit(o),
        }
    }

    /// Runs `body` for every objective type, in the order of their GPU ids (the generated
    /// `objectives.h` is written from this list; a test checks it against [`TrustRegion::visit`]).
    pub(crate) fn visit_types<V: VisitType>(body: &mut V) {
        body.visit::<SoftGate>();
        body.visit::<HardClip>();
        body.visit::<Unclipped>();
        body.visit::<PolicyGradient>();
        body.visit::<IsWeightClip>();
        body.visit::<Dro>();
        body.visit::<KlCov>();
        body.visit::<Dppo>();
        body.visit::<Vespo>();
        body.visit::<GeometricClip>();
        body.visit::<Topr>();
        body.visit::<ClipCov>();
        body.visit::<GateFamily>();
    }

    /// The objective this holds, for the queries that need no type parameter.
    pub(crate) fn objective(&self) -> Box<dyn DynObjective> {
        struct Boxed;
        impl Visit for Boxed {
            type Output = Box<dyn DynObjective>;
            fn visit<O: Objective>(self, objective: &O) -> Box<dyn DynObjective> {
                Box::new(objective.clone())
            }
        }
        self.visit(Boxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::dppo::Divergence;

    /// One value of every variant.
    fn every_variant() -> Vec<TrustRegion> {
        vec![
            TrustRegion::SoftGate {
                tau_pos: 1.0,
                tau_neg: 1.05,
                gate: GateFunction::Sigmoid,
            },
            TrustRegion::HardClip(HardClip::new(0.2, 0.28)),
            TrustRegion::Unclipped,
            TrustRegion::PolicyGradient,
            TrustRegion::Cispo(IsWeightClip::RatioMax(5.0)),
            TrustRegion::Dro(Dro { beta: 0.1 }),
            TrustRegion::KlCov(KlCov {
                ratio: 0.002,
                coef: 1.0,
            }),
            TrustRegion::Dppo(Dppo::new(Divergence::BinaryTv, 0.2, 0.2, 2.0)),
            TrustRegion::Vespo(Vespo::default()),
            TrustRegion::GeometricClip(GeometricClip {
                log_clip_low: 0.4,
                log_clip_high: 0.4,
            }),
            TrustRegion::Topr(Topr::default()),
            TrustRegion::ClipCov(ClipCov::default()),
            TrustRegion::SoftGate {
                tau_pos: 1.0,
                tau_neg: 1.05,
                gate: GateFunction::Arctan,
            },
        ]
    }

    struct Ids(Vec<(i32, &'static str)>);
    impl VisitType for Ids {
        fn visit<O: Objective>(&mut self) {
            self.0.push((O::ID, O::NAME));
        }
    }

    /// The type list is the dispatch's: ids 0, 1, … in order, every variant's objective in it,
    /// names unique.
    #[test]
    fn type_list_matches_the_dispatch() {
        let mut ids = Ids(vec![]);
        TrustRegion::visit_types(&mut ids);
        for (i, (id, name)) in ids.0.iter().enumerate() {
            assert_eq!(
                *id, i as i32,
                "{name}: ids must be 0, 1, … in visit_types' order"
            );
        }
        let mut names: Vec<_> = ids.0.iter().map(|(_, n)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ids.0.len(), "objective names must be unique");
        let variants = every_variant();
        assert_eq!(
            variants.len(),
            ids.0.len(),
            "a variant missing from every_variant or visit_types"
        );
        let mut seen: Vec<i32> = variants.iter().map(|v| v.objective().id()).collect();
        seen.sort();
        assert_eq!(seen, (0..ids.0.len() as i32).collect::<Vec<_>>());
        for v in &variants {
            assert!(v.validate().is_ok(), "{v:?}");
        }
    }
}
