//! The contract between this crate and the GPU kernels of the policy loss, written once, here:
//! the per-call constants (`PolicyParams`, `#[repr(C)]`), the metric slots, the layouts of the
//! kernels' buffers and the codes of ratio levels, KL estimators, aggregations and objectives.
//! The C++ side is generated from these definitions: `contract.h` (the structs and constants)
//! and `objectives.h` (every objective's header and the dispatch to its device function, from
//! [`TrustRegion::visit_types`]). Both are checked in; the test `generated_headers_are_current`
//! regenerates them and fails when they differ (`SAPO_REGENERATE=1 cargo test --lib
//! generated_headers` rewrites them).
//!
//! Compiled with or without a GPU feature, so that `cargo test` checks the headers everywhere;
//! outside the tests the generator and, without a GPU feature, the structs are unused.
#![cfg_attr(not(test), allow(dead_code))]

use crate::aggregation::{BatchCount, CoefficientParts, RowDivisor};
use crate::gate::GateFunction;
use crate::kl::KlEstimator;
use crate::losses::metrics;
use crate::losses::objective::{Objective, Shape, VisitType};
use crate::losses::ratio::RatioLevel;
use crate::losses::trust_region::TrustRegion;
use crate::real::Real;

/// `[loss, metric sums (NUM_SLOTS), ratio min, ratio max]`: the fused op's output.
pub(crate) const OUT_LEN: usize = 1 + metrics::NUM_SLOTS + 2;
/// The number of value-check counts after [`OUT_LEN`] in the GPU output: mask values other than
/// 0/1, then non-finite unmasked `ℓ`, `ℓold`, `A`, `w`, `ℓref`.
pub(crate) const CHECKS: usize = 6;
/// The GPU output: [`OUT_LEN`] then [`CHECKS`] counts.
pub(crate) const GPU_OUT_LEN: usize = OUT_LEN + CHECKS;
/// Floats per row in the `prepass` kernel's record: `n`, invalid mask values, `Σ m·y`,
/// `Σ m·row_term`.
pub(crate) const ROW_STATS: usize = 4;

/// The `rows` kernel's per-row record, read by `reduce`: offsets and length.
pub(crate) mod row {
    use crate::losses::metrics::NUM_SLOTS;
    /// `Σ m·w·l`.
    pub(crate) const P: usize = 0;
    /// `Σ m·k̂`.
    pub(crate) const K: usize = 1;
    /// The policy coefficient.
    pub(crate) const CP: usize = 2;
    /// `β` × the KL coefficient.
    pub(crate) const CK: usize = 3;
    /// The KL coefficient.
    pub(crate) const KA: usize = 4;
    /// The metric sums (`NUM_SLOTS`).
    pub(crate) const SUMS: usize = 5;
    /// The ratio's minimum.
    pub(crate) const MIN: usize = SUMS + NUM_SLOTS;
    /// The ratio's maximum.
    pub(crate) const MAX: usize = MIN + 1;
    /// The 5 non-finite counts: `ℓ`, `ℓold`, `A`, `w`, `ℓref`.
    pub(crate) const BAD: usize = MAX + 1;
    /// Floats per row.
    pub(crate) const LEN: usize = BAD + 5;
}

/// A Rust type of the contract as C++ declares it.
pub(crate) trait CType {
    /// Its C++ name.
    const C_NAME: &'static str;
    /// Its size in 4-byte words.
    const WORDS: usize;
    /// `<type> <name><extent>;`.
    fn declaration(name: &str) -> String {
        format!("{} {name};", Self::C_NAME)
    }
}

impl CType for i32 {
    const C_NAME: &'static str = "int";
    const WORDS: usize = 1;
}

impl CType for f32 {
    const C_NAME: &'static str = "float";
    const WORDS: usize = 1;
}

impl<T: CType, const N: usize> CType for [T; N] {
    const C_NAME: &'static str = T::C_NAME;
    const WORDS: usize = N * T::WORDS;
    fn declaration(name: &str) -> String {
        format!("{} {name}[{N}];", T::C_NAME)
    }
}

/// A `#[repr(C)]` struct of 4-byte fields and its C++ declaration, from one definition.
macro_rules! contract_struct {
    ($(#[$meta:meta])* $name:ident { $($(#[doc = $doc:literal])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub(crate) struct $name {
            $($(#[doc = $doc])* pub(crate) $field: $ty,)*
        }

        impl CType for $name {
            const C_NAME: &'static str = stringify!($name);
            const WORDS: usize = 0 $(+ <$ty as CType>::WORDS)*;
        }

        impl $name {
            /// The C++ declaration of this struct.
            fn c_declaration() -> String {
                let mut out = format!("struct {} {{\n", stringify!($name));
                $(
                    let doc: &[&str] = &[$($doc.trim()),*];
                    let decl = <$ty as CType>::declaration(stringify!($field));
                    if doc.is_empty() {
                        out.push_str(&format!("  {decl}\n"));
                    } else {
                        out.push_str(&format!("  {decl:<28} // {}\n", doc.join(" ")));
                    }
                )*
                out.push_str("};\n");
                out
            }
        }
    };
}

contract_struct! {
    /// An aggregation's [`CoefficientParts`] as the kernels read them.
    AggregationParams {
        /// SAPO_BATCH_*: the batch count.
        batch: i32,
        /// SAPO_ROW_*: the row divisor.
        row: i32,
        /// The data-parallel world size.
        world: f32,
        /// The global count replacing the local one; < 0: none.
        global: f32,
        /// A fixed row divisor (the horizon).
        row_constant: f32,
    }
}

contract_struct! {
    /// The per-call constants of the policy-loss kernels, passed by value.
    PolicyParams {
        /// Rows.
        rows: i32,
        /// Tokens per row.
        t: i32,
        /// Threads per block.
        threads: i32,
        /// SAPO_LEVEL_*.
        level: i32,
        /// SAPO_OBJECTIVE_*.
        shape: i32,
        /// The objective's switch (soft gate: SAPO_GATE_*; hard clip: dual clip; DPPO: binary KL).
        shape_flag: i32,
        /// Advantages `[B,T]` (else `[B]`).
        per_token_advantages: i32,
        /// Rollout weights given.
        has_weights: i32,
        /// Reference log-probs given.
        has_reference: i32,
        /// Per-token flags given (KL-Cov).
        has_flags: i32,
        /// A KL penalty.
        kl: i32,
        /// SAPO_KL_*.
        kl_estimator: i32,
        /// The KL term weighted by the ratio.
        kl_importance: i32,
        /// The metric slot of each objective metric, −1: none.
        slots: [i32; 4],
        /// The log-ratio clamp c (+inf: none).
        clamp: f32,
        /// The sequence log-ratio bound (+inf: none).
        seq_max: f32,
        /// β.
        kl_coef: f32,
        /// k3's log-ratio and value bounds (+inf: unclamped).
        kl_bounds: [f32; 2],
        /// The objective's parameters.
        shape_param: [f32; 8],
        /// The policy term's aggregation.
        policy_aggregation: AggregationParams,
        /// The KL term's aggregation.
        kl_aggregation: AggregationParams,
    }
}

/// The code of a ratio level.
pub(crate) fn level_code(level: RatioLevel) -> i32 {
    match level {
        RatioLevel::Token => 0,
        RatioLevel::Sequence => 1,
        RatioLevel::SequenceToken => 2,
    }
}

/// The code of a KL estimator.
pub(crate) fn estimator_code(estimator: KlEstimator) -> i32 {
    match estimator {
        KlEstimator::K1 => 0,
        KlEstimator::Abs => 1,
        KlEstimator::K2 => 2,
        KlEstimator::K3 => 3,
        KlEstimator::K3Plus => 4,
    }
}

fn batch_code(batch: BatchCount) -> i32 {
    match batch {
        BatchCount::One => 0,
        BatchCount::Tokens => 1,
        BatchCount::Sequences => 2,
        BatchCount::Rows => 3,
    }
}

/// The code of a row divisor and its constant.
fn row_code(row: RowDivisor) -> (i32, f32) {
    match row {
        RowDivisor::One => (0, 0.0),
        RowDivisor::Tokens => (1, 0.0),
        RowDivisor::Constant(c) => (2, c as f32),
    }
}

impl From<CoefficientParts> for AggregationParams {
    fn from(parts: CoefficientParts) -> Self {
        let (row, row_constant) = row_code(parts.row);
        Self {
            batch: batch_code(parts.batch),
            row,
            world: parts.world as f32,
            global: parts.global.map_or(-1.0, |g| g as f32),
            row_constant,
        }
    }
}

/// What the generated headers say of one objective.
struct ObjectiveEntry {
    name: &'static str,
    id: i32,
    transforms_log_ratio: bool,
    row_statistic: bool,
    weights_multiply: bool,
}

struct Entries(Vec<ObjectiveEntry>);

impl VisitType for Entries {
    fn visit<O: Objective>(&mut self) {
        type S<O> = <O as Objective>::Scalar<f32>;
        self.0.push(ObjectiveEntry {
            name: O::NAME,
            id: O::ID,
            transforms_log_ratio: <S<O> as Shape<f32>>::TRANSFORMS_LOG_RATIO,
            row_statistic: <S<O> as Shape<f32>>::ROW_STATISTIC,
            weights_multiply: <S<O> as Shape<f32>>::WEIGHTS_MULTIPLY,
        });
    }
}

fn objectives() -> Vec<ObjectiveEntry> {
    let mut entries = Entries(vec![]);
    TrustRegion::visit_types(&mut entries);
    entries.0
}

/// `objectives.h`'s include line of an objective's header (resolved by the Metal program).
fn include_path(name: &str) -> String {
    format!("../../losses/{name}.h")
}

/// The device source of the header `path` of an objective, as `objectives.h` includes it.
pub(crate) fn objective_header(path: &str) -> Option<&'static str> {
    struct Find<'a>(&'a str, Option<&'static str>);
    impl VisitType for Find<'_> {
        fn visit<O: Objective>(&mut self) {
            if self.0 == include_path(O::NAME) {
                self.1 = Some(O::DEVICE);
            }
        }
    }
    let mut find = Find(path, None);
    TrustRegion::visit_types(&mut find);
    find.1
}

const GENERATED: &str = "// Generated from `src/kernels/policy_loss/contract.rs` by its test `generated_headers_are_current`\n// (`SAPO_REGENERATE=1 cargo test --lib generated_headers`): do not edit.\n#pragma once\n";

fn define(out: &mut String, name: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("#define {name} {value}\n"));
}

/// `contract.h`: the structs and constants.
pub(crate) fn contract_header() -> String {
    let mut out = format!("{GENERATED}\n");
    out.push_str(&AggregationParams::c_declaration());
    out.push('\n');
    out.push_str(&PolicyParams::c_declaration());
    out.push('\n');
    define(
        &mut out,
        "SAPO_MAX_EXP_ARG",
        format!("{:.1}f", f32::MAX_EXP_ARG),
    );
    define(&mut out, "SAPO_NUM_SLOTS", metrics::NUM_SLOTS);
    for (name, slot) in [
        ("SLOT_TOKENS", metrics::TOKENS),
        ("SLOT_NEG_LOG_RATIO", metrics::NEG_LOG_RATIO),
        ("SLOT_RATIO_EXCESS", metrics::RATIO_EXCESS),
        ("SLOT_KL", metrics::KL),
        ("SLOT_KL_LOSS", metrics::KL_LOSS),
    ] {
        define(&mut out, name, slot);
    }
    define(&mut out, "ROW_STATS", ROW_STATS);
    for (name, offset) in [
        ("ROW_P", row::P),
        ("ROW_K", row::K),
        ("ROW_CP", row::CP),
        ("ROW_CK", row::CK),
        ("ROW_KA", row::KA),
        ("ROW_SUMS", row::SUMS),
        ("ROW_MIN", row::MIN),
        ("ROW_MAX", row::MAX),
        ("ROW_BAD", row::BAD),
        ("ROW_LEN", row::LEN),
    ] {
        define(&mut out, name, offset);
    }
    define(&mut out, "OUT_LEN", GPU_OUT_LEN);
    define(&mut out, "CHECKS", CHECKS);
    for level in [
        RatioLevel::Token,
        RatioLevel::Sequence,
        RatioLevel::SequenceToken,
    ] {
        let name = format!("{level:?}").replace("SequenceToken", "Sequence_Token");
        define(
            &mut out,
            &format!("SAPO_LEVEL_{}", name.to_uppercase()),
            level_code(level),
        );
    }
    for estimator in [
        KlEstimator::K1,
        KlEstimator::Abs,
        KlEstimator::K2,
        KlEstimator::K3,
        KlEstimator::K3Plus,
    ] {
        let name = format!("{estimator:?}").to_uppercase();
        define(
            &mut out,
            &format!("SAPO_KL_{name}"),
            estimator_code(estimator),
        );
    }
    for batch in [
        BatchCount::One,
        BatchCount::Tokens,
        BatchCount::Sequences,
        BatchCount::Rows,
    ] {
        let name = format!("{batch:?}").to_uppercase();
        define(&mut out, &format!("SAPO_BATCH_{name}"), batch_code(batch));
    }
    for (name, row) in [
        ("ONE", RowDivisor::One),
        ("TOKENS", RowDivisor::Tokens),
        ("CONSTANT", RowDivisor::Constant(1.0)),
    ] {
        define(&mut out, &format!("SAPO_ROW_{name}"), row_code(row).0);
    }
    for gate in GateFunction::ALL {
        define(
            &mut out,
            &format!("SAPO_GATE_{}", gate.name().to_uppercase()),
            gate.id(),
        );
    }
    for o in objectives() {
        define(
            &mut out,
            &format!("SAPO_OBJECTIVE_{}", o.name.to_uppercase()),
            o.id,
        );
    }
    out
}

/// `objectives.h`: every objective's header and the dispatch to their device functions (after
/// `contract.h` and `token.h`).
pub(crate) fn objectives_header() -> String {
    let objectives = objectives();
    let mut out = format!("{GENERATED}\n");
    for o in &objectives {
        out.push_str(&format!("#include \"{}\"\n", include_path(o.name)));
    }
    let case = |o: &ObjectiveEntry| format!("SAPO_OBJECTIVE_{}", o.name.to_uppercase());
    // A switch over the objectives for which `has` holds, each returning `<name>_<function>`.
    let switch = |out: &mut String,
                  head: &str,
                  has: &dyn Fn(&ObjectiveEntry) -> bool,
                  call: &str,
                  default: &str| {
        out.push_str(head);
        out.push_str("  switch (p.shape) {\n");
        for o in objectives.iter().filter(|o| has(o)) {
            out.push_str(&format!(
                "    case {}: return {}_{call};\n",
                case(o),
                o.name
            ));
        }
        out.push_str(&format!("    default: {default}\n  }}\n}}\n"));
    };
    switch(
        &mut out,
        concat!(
            "\n// The objective's loss, slopes and metrics. An id no objective has (never sent by the\n",
            "// crate) gives NaN, which the loss's check turns into an error.\n",
            "SAPO_INLINE Eval shape_eval(SAPO_THREAD const PolicyParams& p, Token t) {\n",
        ),
        &|_| true,
        "eval(p, t)",
        "return through_ratio(SAPO_NAN, SAPO_NAN);",
    );
    switch(
        &mut out,
        concat!(
            "\n// The log-ratio the ratio is taken of, and its derivative (the identity but where an\n",
            "// objective transforms it).\n",
            "SAPO_INLINE Pair shape_log_ratio(SAPO_THREAD const PolicyParams& p, float x, float a) {\n",
        ),
        &|o| o.transforms_log_ratio,
        "log_ratio(p, x, a)",
        "{ Pair out; out.v = x; out.d = 1.0f; return out; }",
    );
    out.push_str(concat!(
        "\n// Whether the objective reads a row statistic, the row sum of its `row_term`.\n",
        "SAPO_INLINE bool shape_has_row_statistic(SAPO_THREAD const PolicyParams& p) {\n",
        "  return false",
    ));
    for o in objectives.iter().filter(|o| o.row_statistic) {
        out.push_str(&format!(" || p.shape == {}", case(o)));
    }
    out.push_str(";\n}\n");
    switch(
        &mut out,
        "\nSAPO_INLINE float shape_row_term(SAPO_THREAD const PolicyParams& p, float delta, float w) {\n",
        &|o| o.row_statistic,
        "row_term(p, delta, w)",
        "return 0.0f;",
    );
    out.push_str(concat!(
        "\n// Whether the rollout weights multiply the objective's per-token loss.\n",
        "SAPO_INLINE bool shape_weights_multiply(SAPO_THREAD const PolicyParams& p) {\n",
        "  return true",
    ));
    for o in objectives.iter().filter(|o| !o.weights_multiply) {
        out.push_str(&format!(" && p.shape != {}", case(o)));
    }
    out.push_str(";\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in headers are what the Rust definitions generate.
    #[test]
    fn generated_headers_are_current() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kernels/policy_loss");
        let regenerate = std::env::var("SAPO_REGENERATE").is_ok_and(|v| v == "1");
        for (file, text) in [
            ("contract.h", contract_header()),
            ("objectives.h", objectives_header()),
        ] {
            let path = format!("{dir}/{file}");
            if regenerate {
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "{path} is not what contract.rs generates: run `SAPO_REGENERATE=1 cargo test --lib generated_headers`"
            );
        }
    }

    /// Every objective's header is found by the Metal program's include resolver.
    #[test]
    fn every_objective_header_resolves() {
        for o in objectives() {
            let source = objective_header(&include_path(o.name)).unwrap();
            assert!(source.contains(&format!("{}_eval(", o.name)), "{}", o.name);
        }
        assert!(objective_header("../../losses/nothing.h").is_none());
    }

    /// The Rust structs are plain 4-byte words, as their C++ declarations (no padding).
    #[test]
    fn params_are_plain_words() {
        assert_eq!(std::mem::size_of::<PolicyParams>(), 4 * PolicyParams::WORDS);
        assert_eq!(
            std::mem::size_of::<AggregationParams>(),
            4 * AggregationParams::WORDS
        );
    }
}
