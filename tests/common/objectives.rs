//! Every objective at each ratio level it takes, for the tests that run all of them on every
//! path (`tests/extremes.rs`, `tests/sweep.rs`).

use sapo::{
    Cispo, ClipCov, Divergence, Dppo, Dro, GateFunction, Gmpo, Grpo, Gspo, KlCov, Luspo,
    PolicyLossConfig, RatioLevel, Sapo, Topr, TrustRegion, Vespo,
};

/// Every objective, at each ratio level it takes.
pub fn objectives() -> Vec<(String, PolicyLossConfig)> {
    let mut all = vec![];
    for level in [
        RatioLevel::Token,
        RatioLevel::Sequence,
        RatioLevel::SequenceToken,
    ] {
        let mut at_level: Vec<(String, PolicyLossConfig)> = vec![];
        for gate in GateFunction::ALL {
            let sapo = Sapo {
                gate,
                ..Sapo::default()
            };
            at_level.push((format!("sapo {gate:?}"), sapo.config()));
        }
        at_level.push(("grpo".into(), Grpo::default().config()));
        at_level.push(("gspo".into(), Gspo::default().config()));
        at_level.push(("cispo".into(), Cispo::default().config()));
        at_level.push(("gmpo".into(), Gmpo::default().config()));
        at_level.push(("luspo".into(), Luspo::default().config()));
        at_level.push((
            "unclipped".into(),
            PolicyLossConfig::new(level, TrustRegion::Unclipped),
        ));
        let named = |(name, config): (String, PolicyLossConfig)| {
            (format!("{name} {level:?}"), config.with_ratio_level(level))
        };
        all.extend(at_level.into_iter().map(named));
    }
    // The token-level-only objectives.
    for (name, region) in [
        ("pg", TrustRegion::PolicyGradient),
        ("dro", TrustRegion::Dro(Dro { beta: 0.1 })),
        ("kl-cov", TrustRegion::KlCov(KlCov::default())),
        ("vespo", TrustRegion::Vespo(Vespo::default())),
        (
            "dppo-tv",
            TrustRegion::Dppo(Dppo::new(Divergence::BinaryTv, 0.2, 0.2, 10.0)),
        ),
        (
            "dppo-kl",
            TrustRegion::Dppo(Dppo::new(Divergence::BinaryKl, 0.05, 0.05, 10.0)),
        ),
        ("topr", TrustRegion::Topr(Topr::default())),
        (
            "clip-cov",
            // Every token a candidate: the seeded draw zeroes half of them.
            TrustRegion::ClipCov(ClipCov {
                ratio: 0.5,
                cov_lower: -1e9,
                cov_upper: 1e9,
                ..ClipCov::default()
            }),
        ),
    ] {
        all.push((
            name.into(),
            PolicyLossConfig::new(RatioLevel::Token, region),
        ));
    }
    all
}
