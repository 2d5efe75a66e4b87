//! Runs every golden case (computed by verl, TRL/Liger-Kernel and PyTorch themselves) through the
//! crate: `tests/golden/*.json`, or every `*.json` in `$SAPO_GOLDEN_DIR` when it is set (several
//! directories separated by `:`).
//!
//! Policy losses and token log-probs run through both paths — the fused kernels
//! (`Backend::Auto` on the CPU) and the composed candle ops (`Backend::Composed`) — and, with the
//! `gpu-sim` feature, through the CUDA and Metal kernel sources run on the CPU, and with the `cuda`
//! feature and `SAPO_TEST_DEVICE=cuda` on a machine with a GPU, through the CUDA kernels and the
//! composed ops on the device; a case passes when every path reproduces it. Prints each failure (case, path and field, max error) and, per directory,
//! `golden (DIR): N passed, M failed`.

#[path = "common/sim.rs"]
mod sim;
use sim::Sim;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use sapo::{
    AdvantageEstimator, Aggregation, Backend, Bypass, BypassLoss, Divergence, Dppo, Dro,
    EntropyBonus, GateFunction, GeometricClip, Groups, HardClip, ImportanceWeights, IsWeightClip,
    KlCov, KlEstimator, KlPenalty, PolicyInputs, PolicyLossConfig, PolicyMasks, RatioLevel,
    RejectionFilter, RolloutCorrection, TokenAdvantageInputs, TokenEstimator, Topr, TrustRegion,
    Vespo, WeightLevel, WeightMode,
};
use serde_json::{Map, Value};

type Res<T> = Result<T, String>;

struct Tolerance {
    abs: f64,
    rel: f64,
}

/// Collects the failures of one case.
struct Check<'a> {
    tol: &'a Tolerance,
    /// Prefix of every field name: the path being checked.
    path: &'static str,
    failures: Vec<String>,
}

impl Check<'_> {
    fn values(&mut self, field: &str, got: &[f64], want: &[f64]) {
        let field = format!("[{}] {field}", self.path);
        if got.len() != want.len() {
            self.failures.push(format!(
                "{field}: length {} != expected {}",
                got.len(),
                want.len()
            ));
            return;
        }
        let mut max_err = 0f64;
        let mut bad = 0;
        for (g, w) in got.iter().zip(want) {
            let err = (g - w).abs();
            let within = err <= self.tol.abs + self.tol.rel * w.abs();
            if !within {
                bad += 1;
            }
            max_err = max_err.max(if err.is_nan() { f64::INFINITY } else { err });
        }
        if bad > 0 {
            self.failures.push(format!(
                "{field}: {bad} of {} values out of tolerance, max error {max_err:.3e}",
                got.len()
            ));
        }
    }
}

fn flatten(v: &Value, out: &mut Vec<f64>) -> Res<()> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|x| flatten(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("bad number")?);
            Ok(())
        }
        other => Err(format!("expected a number, got {other}")),
    }
}

fn shape_of(v: &Value) -> Vec<usize> {
    let mut shape = vec![];
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(x) => cur = x,
            None => break,
        }
    }
    shape
}

fn numbers(v: &Value) -> Res<Vec<f64>> {
    let mut out = vec![];
    flatten(v, &mut out)?;
    Ok(out)
}

fn field<'a>(obj: &'a Value, key: &str) -> Res<&'a Value> {
    obj.get(key).ok_or_else(|| format!("missing field `{key}`"))
}

/// A tensor from a JSON nested list, in f32 (the cases' inputs are f32-exact).
fn tensor(obj: &Value, key: &str) -> Res<Tensor> {
    let v = field(obj, key)?;
    Tensor::from_vec(numbers(v)?, shape_of(v), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| e.to_string())
}

/// [`tensor`] on `device`.
fn tensor_on(obj: &Value, key: &str, device: &Device) -> Res<Tensor> {
    tensor(obj, key)?.to_device(device).map_err(err)
}

fn to_f64(t: &Tensor) -> Res<Vec<f64>> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(|e| e.to_string())
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&str], what: &str) -> Res<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown {what} key `{k}`")),
        None => Ok(()),
    }
}

fn opt_f64(cfg: &Map<String, Value>, key: &str) -> Res<Option<f64>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| format!("`{key}` must be a number or null")),
    }
}

fn req_f64(cfg: &Map<String, Value>, key: &str) -> Res<f64> {
    opt_f64(cfg, key)?.ok_or_else(|| format!("missing `{key}`"))
}

fn aggregation(v: &Value) -> Res<Aggregation> {
    let obj = v.as_object().ok_or("aggregation must be an object")?;
    check_keys(obj, &["mode", "horizon"], "aggregation")?;
    let mode = obj
        .get("mode")
        .and_then(Value::as_str)
        .ok_or("aggregation.mode")?;
    let horizon = obj
        .get("horizon")
        .and_then(Value::as_u64)
        .map(|h| h as usize);
    Aggregation::from_name(mode, horizon).map_err(err)
}

fn req_str<'a>(cfg: &'a Map<String, Value>, key: &str) -> Res<&'a str> {
    cfg.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string `{key}`"))
}

fn hard_clip(cfg: &Map<String, Value>) -> Res<HardClip> {
    Ok(HardClip {
        eps_low: req_f64(cfg, "clip_low")?,
        eps_high: req_f64(cfg, "clip_high")?,
        dual_clip: opt_f64(cfg, "dual_clip")?,
        delta: opt_f64(cfg, "delta")?,
    })
}

/// A `rollout_correction` object (a case's config, or bypass mode's).
fn correction(v: &Value) -> Res<RolloutCorrection> {
    let obj = v
        .as_object()
        .ok_or("rollout_correction must be an object")?;
    check_keys(
        obj,
        &["importance_weights", "rejection", "log_ratio_clamp"],
        "rollout_correction",
    )?;
    let mut rc = RolloutCorrection::new();
    if let Some(c) = opt_f64(obj, "log_ratio_clamp")? {
        rc = rc.with_log_ratio_clamp(c);
    }
    match obj.get("importance_weights") {
        None | Some(Value::Null) => {}
        Some(w) => {
            let w = w
                .as_object()
                .ok_or("importance_weights must be an object")?;
            check_keys(
                w,
                &["level", "mode", "upper", "lower", "batch_normalize"],
                "importance_weights",
            )?;
            let level = match req_str(w, "level")? {
                "token" => WeightLevel::Token,
                "sequence" => WeightLevel::Sequence,
                other => return Err(format!("unknown level `{other}`")),
            };
            let upper = req_f64(w, "upper")?;
            let mode = match req_str(w, "mode")? {
                "truncate" => WeightMode::Truncate { upper },
                "mask" => WeightMode::Mask {
                    lower: req_f64(w, "lower")?,
                    upper,
                },
                other => return Err(format!("unknown mode `{other}`")),
            };
            let normalize = w
                .get("batch_normalize")
                .map(|b| b.as_bool().ok_or("batch_normalize must be a bool"))
                .transpose()?
                .unwrap_or(false);
            rc = rc.with_importance_weights(
                ImportanceWeights::new(level, mode).with_batch_normalize(normalize),
            );
        }
    }
    if let Some(list) = obj.get("rejection") {
        for f in list.as_array().ok_or("rejection must be a list")? {
            let f = f
                .as_object()
                .ok_or("a rejection filter must be an object")?;
            check_keys(f, &["filter", "lower", "upper"], "rejection")?;
            let filter = RejectionFilter::from_name(
                req_str(f, "filter")?,
                opt_f64(f, "lower")?,
                req_f64(f, "upper")?,
            )
            .map_err(err)?;
            rc = rc.with_rejection(filter);
        }
    }
    Ok(rc)
}

fn policy_config(cfg: &Map<String, Value>) -> Res<PolicyLossConfig> {
    check_keys(
        cfg,
        &[
            "objective",
            "ratio_level",
            "tau_pos",
            "tau_neg",
            "clip_low",
            "clip_high",
            "ratio_max",
            "dual_clip",
            "delta",
            "log_ratio_clamp",
            "seq_log_ratio_max",
            "log_clip_low",
            "log_clip_high",
            "dro_beta",
            "kl_cov_ratio",
            "kl_cov_coef",
            "divergence",
            "divergence_low",
            "divergence_high",
            "k_pos",
            "lambda_pos",
            "k_neg",
            "lambda_neg",
            "log_w_min",
            "log_w_max",
            "bypass_loss",
            "rollout_correction",
            "aggregation",
            "kl",
            "entropy",
            "topr_positive_weight",
            "topr_negative_weight",
            "off_policy_mask_threshold",
            "top_entropy_quantile",
            "m2_threshold",
            "gate",
        ],
        "config",
    )?;
    let objective = req_str(cfg, "objective")?;
    let mut bypass = None;
    let trust_region = match objective {
        "sapo" => TrustRegion::SoftGate {
            tau_pos: req_f64(cfg, "tau_pos")?,
            tau_neg: req_f64(cfg, "tau_neg")?,
            gate: match cfg.get("gate") {
                None => GateFunction::Sigmoid,
                Some(_) => GateFunction::from_name(req_str(cfg, "gate")?).map_err(err)?,
            },
        },
        "gspo" | "grpo" => TrustRegion::HardClip(hard_clip(cfg)?),
        "cispo" => TrustRegion::Cispo(match opt_f64(cfg, "ratio_max")? {
            Some(max) => IsWeightClip::RatioMax(max),
            None => IsWeightClip::Bounds {
                eps_low: req_f64(cfg, "clip_low")?,
                eps_high: req_f64(cfg, "clip_high")?,
            },
        }),
        "gmpo" => TrustRegion::GeometricClip(GeometricClip {
            log_clip_low: req_f64(cfg, "log_clip_low")?,
            log_clip_high: req_f64(cfg, "log_clip_high")?,
        }),
        "gpg" => TrustRegion::PolicyGradient,
        "topr" => TrustRegion::Topr(Topr {
            positive_weight: opt_f64(cfg, "topr_positive_weight")?.unwrap_or(1.0),
            negative_weight: opt_f64(cfg, "topr_negative_weight")?.unwrap_or(1.0),
        }),
        "dro" => TrustRegion::Dro(Dro {
            beta: req_f64(cfg, "dro_beta")?,
        }),
        "kl_cov" => TrustRegion::KlCov(KlCov {
            ratio: req_f64(cfg, "kl_cov_ratio")?,
            coef: req_f64(cfg, "kl_cov_coef")?,
        }),
        "dppo" => TrustRegion::Dppo(Dppo::new(
            match req_str(cfg, "divergence")? {
                "binary_tv" => Divergence::BinaryTv,
                "binary_kl" => Divergence::BinaryKl,
                other => return Err(format!("unknown divergence `{other}`")),
            },
            req_f64(cfg, "divergence_low")?,
            req_f64(cfg, "divergence_high")?,
            req_f64(cfg, "ratio_max")?,
        )),
        "vespo" => TrustRegion::Vespo(Vespo {
            k_pos: req_f64(cfg, "k_pos")?,
            lambda_pos: req_f64(cfg, "lambda_pos")?,
            k_neg: req_f64(cfg, "k_neg")?,
            lambda_neg: req_f64(cfg, "lambda_neg")?,
            log_w_min: req_f64(cfg, "log_w_min")?,
            log_w_max: req_f64(cfg, "log_w_max")?,
        }),
        "bypass" => {
            let rc = correction(field_map(cfg, "rollout_correction")?)?;
            let (loss, region) = match req_str(cfg, "bypass_loss")? {
                "reinforce" => (BypassLoss::Reinforce, TrustRegion::PolicyGradient),
                "ppo_clip" => (BypassLoss::PpoClip, TrustRegion::HardClip(hard_clip(cfg)?)),
                other => return Err(format!("unknown bypass_loss `{other}`")),
            };
            bypass = Some(Bypass {
                correction: rc,
                loss,
            });
            region
        }
        other => return Err(format!("unknown objective `{other}`")),
    };
    let ratio_level = match cfg.get("ratio_level").and_then(Value::as_str) {
        Some("token") | None => RatioLevel::Token,
        Some("sequence") => RatioLevel::Sequence,
        Some("sequence_token") => RatioLevel::SequenceToken,
        Some(other) => return Err(format!("unknown ratio_level `{other}`")),
    };
    // GMPO's ratio is the geometric mean over the row: the sequence level of its clipped log-ratio.
    let ratio_level = if objective == "gmpo" {
        RatioLevel::Sequence
    } else {
        ratio_level
    };
    // The log-ratio clamp: the case's value; absent, the peer's fixed one (verl's 20, none for
    // the objectives that take ℓ − ℓold unclamped).
    let log_ratio_clamp = match cfg.get("log_ratio_clamp") {
        None if matches!(objective, "dro" | "gpg" | "kl_cov" | "gmpo" | "topr") => None,
        None if cfg.get("bypass_loss").and_then(Value::as_str) == Some("reinforce") => None,
        None => Some(20.0),
        Some(_) => opt_f64(cfg, "log_ratio_clamp")?,
    };
    let kl = match cfg.get("kl") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let obj = v.as_object().ok_or("kl must be an object")?;
            check_keys(
                obj,
                &[
                    "coef",
                    "estimator",
                    "aggregation",
                    "clamp",
                    "importance_weighted",
                ],
                "kl",
            )?;
            let estimator = obj
                .get("estimator")
                .and_then(Value::as_str)
                .ok_or("kl.estimator")?;
            let mut penalty = KlPenalty::new(
                req_f64(obj, "coef")?,
                KlEstimator::from_name(estimator).map_err(err)?,
            );
            if let Some(a) = obj.get("aggregation") {
                penalty.aggregation = aggregation(a)?;
            }
            if let Some(c) = obj.get("clamp") {
                penalty.clamp = c.as_bool().ok_or("kl.clamp must be a bool")?;
            }
            if let Some(c) = obj.get("importance_weighted") {
                penalty.importance_weighted =
                    c.as_bool().ok_or("kl.importance_weighted must be a bool")?;
            }
            Some(penalty)
        }
    };
    let entropy = match cfg.get("entropy") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let obj = v.as_object().ok_or("entropy must be an object")?;
            check_keys(obj, &["coef", "aggregation"], "entropy")?;
            let mut bonus = EntropyBonus::new(req_f64(obj, "coef")?);
            if let Some(a) = obj.get("aggregation") {
                bonus.aggregation = aggregation(a)?;
            }
            Some(bonus)
        }
    };
    let agg = match cfg.get("aggregation") {
        Some(a) => aggregation(a)?,
        None => Aggregation::TokenMean,
    };
    let masks = PolicyMasks {
        off_policy_threshold: opt_f64(cfg, "off_policy_mask_threshold")?,
        top_entropy_quantile: opt_f64(cfg, "top_entropy_quantile")?,
        m2_threshold: opt_f64(cfg, "m2_threshold")?,
    };
    Ok(PolicyLossConfig::new(ratio_level, trust_region)
        .with_masks(masks)
        .with_log_ratio_clamp(log_ratio_clamp)
        .with_seq_log_ratio_max(opt_f64(cfg, "seq_log_ratio_max")?)
        .with_aggregation(agg)
        .with_kl(kl)
        .with_entropy(entropy)
        .with_bypass(bypass))
}

fn field_map<'a>(cfg: &'a Map<String, Value>, key: &str) -> Res<&'a Value> {
    cfg.get(key).ok_or_else(|| format!("missing `{key}`"))
}

fn run_policy_loss(
    case: &Value,
    check: &mut Check,
    (backend, device): (Backend, &Device),
) -> Res<()> {
    let tensor = |obj: &Value, key: &str| tensor_on(obj, key, device);
    let cfg = field(case, "config")?.as_object().ok_or("config")?;
    let loss_fn = policy_config(cfg)?
        .build()
        .map_err(err)?
        .with_backend(backend);
    let inputs = field(case, "inputs")?;
    check_keys(
        inputs.as_object().ok_or("inputs")?,
        &[
            "log_probs",
            "old_log_probs",
            "advantages",
            "mask",
            "ref_log_probs",
            "entropy",
            "is_weights",
            "rollout_log_probs",
            "scores",
        ],
        "inputs",
    )?;
    let log_probs = Var::from_tensor(&tensor(inputs, "log_probs")?).map_err(err)?;
    let old = tensor(inputs, "old_log_probs")?;
    let adv = tensor(inputs, "advantages")?;
    let mask = tensor(inputs, "mask")?;
    let optional = |key: &str| inputs.get(key).map(|_| tensor(inputs, key)).transpose();
    let reference = optional("ref_log_probs")?;
    let weights = optional("is_weights")?;
    let entropy = optional("entropy")?
        .map(|h| Var::from_tensor(&h).map_err(err))
        .transpose()?;
    let mut pi = PolicyInputs::new(log_probs.as_tensor(), &old, &adv, &mask);
    if let Some(r) = &reference {
        pi = pi.with_ref_log_probs(r);
    }
    if let Some(w) = &weights {
        pi = pi.with_is_weights(w);
    }
    if let Some(h) = &entropy {
        pi = pi.with_entropy(h.as_tensor());
    }
    let rollout = optional("rollout_log_probs")?;
    if let Some(r) = &rollout {
        pi = pi.with_rollout_log_probs(r);
    }
    let scores = optional("scores")?;
    if let Some(s) = &scores {
        pi = pi.with_scores(s);
    }
    let out = loss_fn.forward(&pi).map_err(err)?;
    let grads = out.loss.backward().map_err(err)?;
    let grad = grads
        .get(log_probs.as_tensor())
        .ok_or("no gradient reached log_probs")?;
    let expected = field(case, "expected")?;
    check_keys(
        expected.as_object().ok_or("expected")?,
        &["loss", "grad_log_probs", "grad_entropy", "metrics"],
        "expected",
    )?;
    check.values(
        "loss",
        &to_f64(&out.loss)?,
        &numbers(field(expected, "loss")?)?,
    );
    check.values(
        "grad_log_probs",
        &to_f64(grad)?,
        &numbers(field(expected, "grad_log_probs")?)?,
    );
    if let Some(want) = expected.get("grad_entropy") {
        let h = entropy
            .as_ref()
            .ok_or("grad_entropy without an entropy input")?;
        let g = grads
            .get(h.as_tensor())
            .ok_or("no gradient reached entropy")?;
        check.values("grad_entropy", &to_f64(g)?, &numbers(want)?);
    }
    let sums = out.metrics.read().map_err(err)?;
    if let Some(metrics) = expected.get("metrics").and_then(Value::as_object) {
        for (name, want) in metrics {
            let got = if let Some(rc) = name.strip_prefix("rollout_corr/") {
                let map = out
                    .rollout_correction
                    .as_ref()
                    .ok_or("rollout-correction metrics without bypass mode")?;
                map.get(rc).copied()
            } else {
                match name.as_str() {
                    "approx_kl" => sums.approx_kl(),
                    "clip_fraction" => sums.clip_fraction(),
                    "dual_clip_fraction" => sums.dual_clip_fraction(),
                    "clip_ratio" => sums.clip_ratio(),
                    "clip_ratio_low" => sums.clip_ratio_low(),
                    "clip_ratio_high" => sums.clip_ratio_high(),
                    "kl" => sums.kl_mean(),
                    "kl_loss" => sums.kl_loss,
                    "entropy_loss" => sums.entropy_loss,
                    "clip_fraction_pos" => sums.clip_fraction_pos(),
                    "clip_fraction_neg" => sums.clip_fraction_neg(),
                    "truncated_fraction" => sums.truncated_fraction(),
                    "mean_abs_log_ratio" => sums.mean_abs_log_ratio(),
                    "gate_weight_mean" => sums.gate_weight_mean(),
                    "gate_value_mean" => sums.gate_value_mean(),
                    other => return Err(format!("unknown metric `{other}`")),
                }
            };
            let got =
                got.ok_or_else(|| format!("metric `{name}` is not defined for this objective"))?;
            check.values(&format!("metrics.{name}"), &[got], &numbers(want)?);
        }
    }
    Ok(())
}

fn run_rollout_correction(case: &Value, check: &mut Check) -> Res<()> {
    let rc = correction(field(case, "config")?)?;
    let inputs = field(case, "inputs")?;
    check_keys(
        inputs.as_object().ok_or("inputs")?,
        &["old_log_probs", "rollout_log_probs", "mask"],
        "inputs",
    )?;
    let out = sapo::rollout_correction(
        &tensor(inputs, "old_log_probs")?,
        &tensor(inputs, "rollout_log_probs")?,
        &tensor(inputs, "mask")?,
        &rc,
    )
    .map_err(err)?;
    let expected = field(case, "expected")?;
    check_keys(
        expected.as_object().ok_or("expected")?,
        &["weights", "mask", "metrics"],
        "expected",
    )?;
    check.values(
        "mask",
        &to_f64(&out.mask)?,
        &numbers(field(expected, "mask")?)?,
    );
    match (expected.get("weights"), &out.weights) {
        (Some(want), Some(got)) => check.values("weights", &to_f64(got)?, &numbers(want)?),
        (None, None) => {}
        _ => return Err("weights expected and computed disagree on presence".into()),
    }
    let want = field(expected, "metrics")?
        .as_object()
        .ok_or("metrics must be an object")?;
    for (name, value) in want {
        let got = out
            .metrics
            .get(name)
            .ok_or_else(|| format!("metric `{name}` not computed"))?;
        check.values(&format!("metrics.{name}"), &[*got], &numbers(value)?);
    }
    if let Some(extra) = out.metrics.keys().find(|k| !want.contains_key(*k)) {
        return Err(format!("metric `{extra}` computed but not expected"));
    }
    Ok(())
}

fn run_token_logprobs(
    case: &Value,
    check: &mut Check,
    (backend, device): (Backend, &Device),
) -> Res<()> {
    let tensor = |obj: &Value, key: &str| tensor_on(obj, key, device);
    let cfg = field(case, "config")?.as_object().ok_or("config")?;
    check_keys(cfg, &["temperature"], "config")?;
    let temperature = req_f64(cfg, "temperature")?;
    let inputs = field(case, "inputs")?;
    let logits = Var::from_tensor(&tensor(inputs, "logits")?).map_err(err)?;
    let targets = tensor(inputs, "targets")?
        .to_dtype(DType::I64)
        .map_err(err)?;
    let w_lp = tensor(inputs, "weights_log_probs")?;
    let w_h = tensor(inputs, "weights_entropy")?;
    let (lp, h) =
        sapo::token_log_probs_and_entropy_with(logits.as_tensor(), &targets, temperature, backend)
            .map_err(err)?;
    let objective = (lp.mul(&w_lp).and_then(|x| x.sum_all()))
        .and_then(|a| h.mul(&w_h).and_then(|x| x.sum_all()).map(|b| (a, b)))
        .and_then(|(a, b)| a + b)
        .map_err(err)?;
    let grads = objective.backward().map_err(err)?;
    let grad = grads
        .get(logits.as_tensor())
        .ok_or("no gradient reached logits")?;
    let expected = field(case, "expected")?;
    check.values(
        "log_probs",
        &to_f64(&lp)?,
        &numbers(field(expected, "log_probs")?)?,
    );
    check.values(
        "entropy",
        &to_f64(&h)?,
        &numbers(field(expected, "entropy")?)?,
    );
    check.values(
        "grad_logits_of_weighted_sum",
        &to_f64(grad)?,
        &numbers(field(expected, "grad_logits_of_weighted_sum")?)?,
    );
    Ok(())
}

fn run_advantages(case: &Value, check: &mut Check) -> Res<()> {
    if field(case, "inputs")?.get("mask").is_some() {
        return run_token_advantages(case, check);
    }
    let cfg = field(case, "config")?.as_object().ok_or("config")?;
    check_keys(cfg, &["estimator", "epsilon"], "config")?;
    let epsilon = opt_f64(cfg, "epsilon")?.unwrap_or(1e-6);
    let estimator = match cfg.get("estimator").and_then(Value::as_str) {
        Some("grpo") => AdvantageEstimator::Grpo { epsilon },
        Some("dr_grpo") => AdvantageEstimator::DrGrpo,
        Some("rloo") => AdvantageEstimator::Rloo,
        Some("batch_std") => AdvantageEstimator::BatchStd { epsilon },
        other => return Err(format!("unknown estimator {other:?}")),
    };
    let inputs = field(case, "inputs")?;
    let rewards = numbers(field(inputs, "rewards")?)?;
    let ids: Vec<i64> = numbers(field(inputs, "group_ids")?)?
        .iter()
        .map(|&x| x as i64)
        .collect();
    let got = sapo::group_advantages_vec(&rewards, Groups::Ids(&ids), estimator).map_err(err)?;
    check.values(
        "advantages",
        &got,
        &numbers(field(field(case, "expected")?, "advantages")?)?,
    );
    Ok(())
}

/// verl's estimators with token-level inputs (kind `advantages` with a `mask`).
fn run_token_advantages(case: &Value, check: &mut Check) -> Res<()> {
    let cfg = field(case, "config")?.as_object().ok_or("config")?;
    let name = cfg.get("estimator").and_then(Value::as_str);
    let req = |key: &str| opt_f64(cfg, key)?.ok_or(format!("config.{key}: missing"));
    let (estimator, keys): (TokenEstimator, &[&str]) = match name {
        Some("reinforce_plus_plus") => (
            TokenEstimator::ReinforcePlusPlus {
                gamma: req("gamma")?,
            },
            &["gamma"],
        ),
        Some("reinforce_plus_plus_baseline") => (TokenEstimator::ReinforcePlusPlusBaseline, &[]),
        Some("grpo_passk") => (
            TokenEstimator::GrpoPassK {
                epsilon: req("epsilon")?,
                norm_by_std: cfg
                    .get("norm_by_std")
                    .and_then(Value::as_bool)
                    .ok_or("config.norm_by_std: missing or not a bool")?,
            },
            &["epsilon", "norm_by_std"],
        ),
        Some("opo") => (TokenEstimator::Opo, &[]),
        Some("gpg") => (TokenEstimator::Gpg, &[]),
        Some("gdpo") => (
            TokenEstimator::Gdpo {
                epsilon: req("epsilon")?,
                reward_weights: match cfg.get("reward_weights") {
                    None | Some(Value::Null) => None,
                    Some(w) => Some(numbers(w)?),
                },
            },
            &["epsilon", "reward_weights"],
        ),
        Some("gae") => (
            TokenEstimator::Gae {
                gamma: req("gamma")?,
                lambda: req("lambda")?,
            },
            &["gamma", "lambda"],
        ),
        Some("remax") => (TokenEstimator::Remax, &[]),
        other => return Err(format!("unknown token-level estimator {other:?}")),
    };
    let mut allowed = vec!["estimator"];
    allowed.extend_from_slice(keys);
    check_keys(cfg, &allowed, "config")?;
    let inputs = field(case, "inputs")?;
    check_keys(
        obj(inputs, "inputs")?,
        &[
            "mask",
            "token_level_rewards",
            "group_ids",
            "values",
            "reward_components",
            "reward_baselines",
        ],
        "inputs",
    )?;
    let mask = tensor(inputs, "mask")?;
    let optional = |key: &str| inputs.get(key).map(|_| tensor(inputs, key)).transpose();
    let (rewards, values, components, baselines) = (
        optional("token_level_rewards")?,
        optional("values")?,
        optional("reward_components")?,
        optional("reward_baselines")?,
    );
    let ids: Option<Vec<i64>> = inputs
        .get("group_ids")
        .map(|v| Ok::<_, String>(numbers(v)?.iter().map(|&x| x as i64).collect()))
        .transpose()?;
    let mut token_inputs = TokenAdvantageInputs::new(&mask);
    token_inputs.token_level_rewards = rewards.as_ref();
    token_inputs.values = values.as_ref();
    token_inputs.reward_components = components.as_ref();
    token_inputs.reward_baselines = baselines.as_ref();
    token_inputs.groups = ids.as_deref().map(Groups::Ids);
    let out = sapo::token_advantages(&estimator, &token_inputs).map_err(err)?;
    let expected = obj(field(case, "expected")?, "expected")?;
    check_keys(expected, &["advantages", "returns"], "expected")?;
    check.values(
        "advantages",
        &to_f64(&out.advantages)?,
        &numbers(field(field(case, "expected")?, "advantages")?)?,
    );
    match (expected.get("returns"), &out.returns) {
        (Some(want), Some(got)) => check.values("returns", &to_f64(got)?, &numbers(want)?),
        (Some(_), None) => check
            .failures
            .push("[fused] returns: expected, none computed".into()),
        (None, _) => {}
    }
    Ok(())
}

fn obj<'a>(v: &'a Value, what: &str) -> Res<&'a Map<String, Value>> {
    v.as_object().ok_or(format!("{what}: not an object"))
}

fn req_usize(cfg: &Map<String, Value>, key: &str) -> Res<usize> {
    cfg.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or(format!("config.{key}: missing or not a count"))
}

/// verl's critic loss (kind `value_loss`).
fn run_value_loss(case: &Value, check: &mut Check) -> Res<()> {
    let cfg = obj(field(case, "config")?, "config")?;
    check_keys(cfg, &["clip", "aggregation"], "config")?;
    let inputs = field(case, "inputs")?;
    check_keys(
        obj(inputs, "inputs")?,
        &["values_pred", "values", "returns", "mask"],
        "inputs",
    )?;
    let loss_fn = sapo::ValueLoss::new(req_f64(cfg, "clip")?)
        .with_aggregation(aggregation(field_map(cfg, "aggregation")?)?);
    let values_pred = Var::from_tensor(&tensor(inputs, "values_pred")?).map_err(err)?;
    let out = loss_fn
        .forward(
            values_pred.as_tensor(),
            &tensor(inputs, "values")?,
            &tensor(inputs, "returns")?,
            &tensor(inputs, "mask")?,
        )
        .map_err(err)?;
    let expected = field(case, "expected")?;
    check.values(
        "loss",
        &to_f64(&out.loss)?,
        &[field(expected, "loss")?.as_f64().ok_or("loss")?],
    );
    let grads = out.loss.backward().map_err(err)?;
    let grad = grads.get(values_pred.as_tensor()).ok_or("no gradient")?;
    check.values(
        "grad_values_pred",
        &to_f64(grad)?,
        &numbers(field(expected, "grad_values_pred")?)?,
    );
    let metrics = field(expected, "metrics")?;
    check_keys(
        obj(metrics, "expected.metrics")?,
        &["clip_fraction", "vpred_mean"],
        "expected.metrics",
    )?;
    for (name, got) in [
        ("clip_fraction", &out.clip_fraction),
        ("vpred_mean", &out.vpred_mean),
    ] {
        check.values(
            name,
            &to_f64(got)?,
            &[field(metrics, name)?.as_f64().ok_or(name)?],
        );
    }
    Ok(())
}

/// DAPO's overlong penalty (kind `overlong_penalty`).
fn run_overlong(case: &Value, check: &mut Check) -> Res<()> {
    use sapo::reward::{BeyondMax, OverlongPenalty};
    let cfg = obj(field(case, "config")?, "config")?;
    check_keys(
        cfg,
        &["max_length", "buffer", "penalty_factor", "beyond_max"],
        "config",
    )?;
    let inputs = obj(field(case, "inputs")?, "inputs")?;
    check_keys(inputs, &["lengths", "scores"], "inputs")?;
    let penalty = OverlongPenalty {
        max_length: req_usize(cfg, "max_length")?,
        buffer: req_usize(cfg, "buffer")?,
        penalty_factor: req_f64(cfg, "penalty_factor")?,
        beyond_max: match req_str(cfg, "beyond_max")? {
            "linear" => BeyondMax::Linear,
            "cap" => BeyondMax::Cap,
            other => return Err(format!("config.beyond_max: unknown {other:?}")),
        },
    };
    let lengths: Vec<u32> = numbers(
        field(case, "inputs")?
            .get("lengths")
            .ok_or("inputs.lengths")?,
    )?
    .iter()
    .map(|&l| l as u32)
    .collect();
    let lengths = Tensor::new(lengths.as_slice(), &Device::Cpu).map_err(err)?;
    let expected = field(case, "expected")?;
    let got = penalty.penalties(&lengths).map_err(err)?;
    check.values(
        "penalties",
        &to_f64(&got)?,
        &numbers(field(expected, "penalties")?)?,
    );
    if let Some(scores) = inputs.get("scores") {
        let scores = Tensor::new(numbers(scores)?.as_slice(), &Device::Cpu).map_err(err)?;
        let rewards = penalty.apply(&scores, &lengths).map_err(err)?;
        check.values(
            "rewards",
            &to_f64(&rewards)?,
            &numbers(field(expected, "rewards")?)?,
        );
    }
    Ok(())
}

/// verl's KL penalty in the reward and its controller over a sequence of steps (kind
/// `kl_controller`).
fn run_kl_controller(case: &Value, check: &mut Check) -> Res<()> {
    use sapo::reward::{kl_in_reward, KlController};
    let cfg = obj(field(case, "config")?, "config")?;
    check_keys(cfg, &["controller", "estimator", "clamp"], "config")?;
    let ctl = obj(
        cfg.get("controller").ok_or("config.controller")?,
        "config.controller",
    )?;
    let mut controller = match req_str(ctl, "type")? {
        "adaptive" => {
            check_keys(
                ctl,
                &["type", "init_coef", "target", "horizon"],
                "config.controller",
            )?;
            KlController::adaptive(
                req_f64(ctl, "init_coef")?,
                req_f64(ctl, "target")?,
                req_usize(ctl, "horizon")?,
            )
        }
        "fixed" => {
            check_keys(ctl, &["type", "init_coef"], "config.controller")?;
            KlController::fixed(req_f64(ctl, "init_coef")?)
        }
        other => return Err(format!("config.controller.type: unknown {other:?}")),
    }
    .map_err(err)?;
    let steps = field(field(case, "inputs")?, "steps")?
        .as_array()
        .ok_or("inputs.steps")?;
    let want = field(field(case, "expected")?, "steps")?
        .as_array()
        .ok_or("expected.steps")?;
    if steps.len() != want.len() {
        return Err("inputs.steps and expected.steps differ in length".into());
    }
    for (i, (step, want)) in steps.iter().zip(want).enumerate() {
        let step_map = obj(step, "a step")?;
        check.values(
            &format!("steps[{i}].coef"),
            &[controller.coef()],
            &[field(want, "coef")?.as_f64().ok_or("coef")?],
        );
        if step_map.contains_key("current_kl") {
            check_keys(step_map, &["current_kl", "n_steps"], "a plain update")?;
            let kl = field(step, "current_kl")?.as_f64().ok_or("current_kl")?;
            let n = field(step, "n_steps")?.as_u64().ok_or("n_steps")? as usize;
            controller.update(kl, n).map_err(err)?;
        } else {
            check_keys(
                step_map,
                &[
                    "token_level_scores",
                    "old_log_probs",
                    "ref_log_probs",
                    "mask",
                ],
                "a batch step",
            )?;
            let estimator = KlEstimator::from_name(req_str(cfg, "estimator")?).map_err(err)?;
            let clamp = cfg
                .get("clamp")
                .and_then(Value::as_bool)
                .ok_or("config.clamp")?;
            let t = |key: &str| tensor(step, key);
            let scores = t("token_level_scores")?.to_dtype(DType::F64).map_err(err)?;
            let old = t("old_log_probs")?.to_dtype(DType::F64).map_err(err)?;
            let reference = t("ref_log_probs")?.to_dtype(DType::F64).map_err(err)?;
            let mask = t("mask")?;
            let out = kl_in_reward(
                &scores,
                &old,
                &reference,
                &mask,
                estimator,
                clamp,
                &controller,
            )
            .map_err(err)?;
            check.values(
                &format!("steps[{i}].current_kl"),
                &[out.current_kl],
                &[field(want, "current_kl")?.as_f64().ok_or("current_kl")?],
            );
            check.values(
                &format!("steps[{i}].token_level_rewards"),
                &to_f64(&out.rewards)?,
                &numbers(field(want, "token_level_rewards")?)?,
            );
            controller
                .update(out.current_kl, scores.dim(0).map_err(err)?)
                .map_err(err)?;
        }
        check.values(
            &format!("steps[{i}].coef_after"),
            &[controller.coef()],
            &[field(want, "coef_after")?.as_f64().ok_or("coef_after")?],
        );
    }
    Ok(())
}

/// Every path a case runs on: `(name, backend, device, simulated GPU)`.
fn paths() -> Vec<(&'static str, Backend, Device, Sim)> {
    #[allow(unused_mut)]
    let mut paths = vec![
        ("fused", Backend::Auto, Device::Cpu, Sim::none()),
        ("composed", Backend::Composed, Device::Cpu, Sim::none()),
    ];
    // The CUDA and Metal kernel sources, run on the CPU by the GPU simulation (Metal's with SIMD
    // groups of 32 and of 8).
    #[cfg(feature = "gpu-sim")]
    {
        use sapo::simulation::Gpu;
        paths.extend([
            (
                "simulated-cuda",
                Backend::Fused,
                Device::Cpu,
                Sim::gpu(Gpu::Cuda),
            ),
            (
                "simulated-metal",
                Backend::Fused,
                Device::Cpu,
                Sim::gpu(Gpu::Metal),
            ),
            (
                "simulated-metal-simd8",
                Backend::Fused,
                Device::Cpu,
                Sim::gpu(Gpu::MetalSimd8),
            ),
        ]);
    }
    // The CUDA kernels and the composed ops on the device (scripts/gpu-check.sh).
    #[cfg(feature = "cuda")]
    if std::env::var("SAPO_TEST_DEVICE").is_ok_and(|d| d == "cuda") {
        // One device (its context and streams) for every case.
        static CUDA: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
        let cuda = CUDA
            .get_or_init(|| Device::new_cuda(0).expect("SAPO_TEST_DEVICE=cuda, but no CUDA device"))
            .clone();
        paths.extend([
            ("cuda-fused", Backend::Fused, cuda.clone(), Sim::none()),
            ("cuda-composed", Backend::Composed, cuda, Sim::none()),
        ]);
    }
    paths
}

fn run_case(case: &Value) -> Res<Vec<String>> {
    if case.get("schema").and_then(Value::as_u64) != Some(1) {
        return Err("unsupported schema".into());
    }
    let tol = field(case, "tolerance")?;
    let tol = Tolerance {
        abs: tol
            .get("abs")
            .and_then(Value::as_f64)
            .ok_or("tolerance.abs")?,
        rel: tol
            .get("rel")
            .and_then(Value::as_f64)
            .ok_or("tolerance.rel")?,
    };
    let mut failures = vec![];
    for (path, backend, device, sim) in paths() {
        let _gpu = sim.enter();
        let mut check = Check {
            tol: &tol,
            path,
            failures: vec![],
        };
        let tagged = |e: String| format!("[{path}] {e}");
        match field(case, "kind")?.as_str() {
            Some("policy_loss") => {
                run_policy_loss(case, &mut check, (backend, &device)).map_err(tagged)?
            }
            Some("token_logprobs") => {
                run_token_logprobs(case, &mut check, (backend, &device)).map_err(tagged)?
            }
            // One implementation: advantages are computed on the host.
            Some("advantages") if path == "fused" => run_advantages(case, &mut check)?,
            Some("advantages") => {}
            // One implementation: the correction is computed on the host.
            Some("rollout_correction") if path == "fused" => {
                run_rollout_correction(case, &mut check)?
            }
            Some("rollout_correction") => {}
            // One implementation each: host-side reward shaping.
            Some("overlong_penalty") if path == "fused" => run_overlong(case, &mut check)?,
            Some("kl_controller") if path == "fused" => run_kl_controller(case, &mut check)?,
            Some("value_loss") if path == "fused" => run_value_loss(case, &mut check)?,
            Some("overlong_penalty" | "kl_controller" | "value_loss") => {}
            other => return Err(format!("unknown kind {other:?}")),
        }
        failures.extend(check.failures);
    }
    Ok(failures)
}

/// Runs every `*.json` case of `dir`: `(passed, failed)`, failures printed.
fn run_dir(dir: &std::path::Path) -> (usize, usize) {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read golden directory {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let (mut passed, mut failed) = (0, 0);
    for path in &paths {
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let outcome = std::fs::read_to_string(path)
            .map_err(err)
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(err))
            .and_then(|case| run_case(&case));
        match outcome {
            Ok(failures) if failures.is_empty() => passed += 1,
            Ok(failures) => {
                failed += 1;
                for f in failures {
                    println!("FAIL {name}: {f}");
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    println!(
        "golden ({}): {passed} passed, {failed} failed",
        dir.display()
    );
    (passed, failed)
}

fn main() {
    // `SAPO_GOLDEN_DIR` may list several directories, separated by `:`; every one must pass.
    let dirs: Vec<PathBuf> = match std::env::var_os("SAPO_GOLDEN_DIR") {
        Some(d) => std::env::split_paths(&d).collect(),
        None => vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")],
    };
    let mut ok = true;
    for dir in &dirs {
        let (passed, failed) = run_dir(dir);
        ok &= failed == 0 && passed > 0;
    }
    if !ok {
        std::process::exit(1);
    }
}
