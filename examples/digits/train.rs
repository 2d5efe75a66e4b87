//! One RL run on the digit task, shared by the `digits` example and the `study` runner: the model's
//! seeded initial weights, sampling, the old log-probs from the hidden states through the lm_head,
//! group advantages, and `updates_per_batch` AdamW minibatch steps per rollout with the loss from
//! `sapo`. Optionally measures, per update, how much of its on-policy gradient each token keeps
//! (`sapo::PolicyLoss::gradient_weights`) and the distribution of token log-ratios.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use sapo::{AdvantageEstimator, Groups, PolicyInputs, PolicyLoss};

use crate::model::{Decoder, ModelConfig};
pub use crate::objective::Objective;
use crate::series::quantile_sorted;
use crate::task::{self, Rng};

/// Any error, boxed: the examples' error plumbing.
pub type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One run's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub steps: usize,
    pub group_size: usize,
    pub prompts: usize,
    pub updates_per_batch: usize,
    pub lr: f64,
    pub digits: usize,
    pub temperature: f64,
    pub kl_coef: f64,
    /// Mixture-of-experts feed-forward (4 SwiGLU experts, top-2 routing).
    pub moe: bool,
    /// Seed of the initial weights, the prompts and the sampling.
    pub seed: u64,
    /// Measure the gradient weights and log-ratios of every update (`Row::mechanism`).
    pub measure: bool,
}

/// A token is "highly off-policy" when `|log ρ|` exceeds this (ρ outside [0.61, 1.65]), well past
/// GRPO's clip range.
pub const HIGH_LOG_RATIO: f64 = 0.5;

/// The quantiles of the token log-ratios kept per step.
pub const LOG_RATIO_QUANTILES: [f64; 5] = [0.01, 0.05, 0.5, 0.95, 0.99];

/// Per step, over every update of the step: how much of its on-policy gradient each token keeps
/// (tokens with a learning signal: unmasked, advantage ≠ 0), and the token log-ratios `ℓ − ℓold`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mechanism {
    /// Mean relative gradient weight.
    pub mean_weight: f64,
    /// Share of tokens keeping at least half their on-policy weight.
    pub active_token_share: f64,
    /// Share of sequences whose every token gets less than 1e-3 of its on-policy weight.
    pub silenced_sequence_share: f64,
    /// Share of sequences holding at least one highly off-policy token (`HIGH_LOG_RATIO`).
    pub off_policy_sequence_share: f64,
    /// In those sequences, the share of the *other* tokens that keep at least half their weight:
    /// the paper's claim is that SAPO keeps them and GSPO does not. NaN when there is none.
    pub bystander_active_share: f64,
    /// `LOG_RATIO_QUANTILES` of the token log-ratios (every unmasked token).
    pub log_ratio_quantiles: [f64; 5],
}

/// Counts over the updates of one step.
#[derive(Debug, Default)]
struct MechanismSums {
    tokens: usize,
    weight_sum: f64,
    active: usize,
    sequences: usize,
    silenced_sequences: usize,
    off_policy_sequences: usize,
    bystanders: usize,
    active_bystanders: usize,
    log_ratios: Vec<f64>,
}

impl MechanismSums {
    /// Adds one update: `relative`/`defined` from `gradient_weights`, `log_ratio` = `ℓ − ℓold`
    /// (every position is unmasked in this task).
    fn add(&mut self, relative: &[Vec<f32>], defined: &[Vec<f32>], log_ratio: &[Vec<f32>]) {
        let active = |w: f32| w as f64 >= sapo::losses::ACTIVE_WEIGHT;
        for ((weights, defined), ratios) in relative.iter().zip(defined).zip(log_ratio) {
            self.log_ratios.extend(ratios.iter().map(|&r| r as f64));
            let row: Vec<(f32, f32)> = weights
                .iter()
                .zip(ratios)
                .zip(defined)
                .filter(|(_, d)| **d > 0.0)
                .map(|((w, r), _)| (*w, *r))
                .collect();
            if row.is_empty() {
                continue;
            }
            self.sequences += 1;
            self.tokens += row.len();
            self.weight_sum += row.iter().map(|(w, _)| *w as f64).sum::<f64>();
            self.active += row.iter().filter(|(w, _)| active(*w)).count();
            if row
                .iter()
                .all(|(w, _)| (*w as f64) < sapo::losses::SILENCED_WEIGHT)
            {
                self.silenced_sequences += 1;
            }
            let high = |r: f32| (r as f64).abs() > HIGH_LOG_RATIO;
            if row.iter().any(|(_, r)| high(*r)) {
                self.off_policy_sequences += 1;
                for (w, _) in row.iter().filter(|(_, r)| !high(*r)) {
                    self.bystanders += 1;
                    self.active_bystanders += active(*w) as usize;
                }
            }
        }
    }

    fn finish(mut self) -> Mechanism {
        let share = |n: usize, d: usize| {
            if d == 0 {
                f64::NAN
            } else {
                n as f64 / d as f64
            }
        };
        self.log_ratios.sort_by(f64::total_cmp);
        Mechanism {
            mean_weight: if self.tokens == 0 {
                f64::NAN
            } else {
                self.weight_sum / self.tokens as f64
            },
            active_token_share: share(self.active, self.tokens),
            silenced_sequence_share: share(self.silenced_sequences, self.sequences),
            off_policy_sequence_share: share(self.off_policy_sequences, self.sequences),
            bystander_active_share: share(self.active_bystanders, self.bystanders),
            log_ratio_quantiles: LOG_RATIO_QUANTILES.map(|q| quantile_sorted(&self.log_ratios, q)),
        }
    }
}

/// One step of a run.
#[derive(Debug, Clone)]
pub struct Row {
    pub step: usize,
    pub objective: &'static str,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub approx_kl: f64,
    pub clip_fraction: Option<f64>,
    pub gate_weight_mean: Option<f64>,
    pub entropy: f64,
    pub loss: f64,
    pub seconds: f64,
    /// With `Settings::measure`.
    pub mechanism: Option<Mechanism>,
}

pub fn model_config(digits: usize, moe: bool) -> ModelConfig {
    ModelConfig {
        moe: moe.then_some((4, 2)),
        vocab: task::VOCAB,
        hidden: 64,
        layers: 2,
        heads: 4,
        intermediate: if moe { 64 } else { 128 },
        max_len: 2 * digits + 2,
        rope_theta: 10_000.0,
    }
}
/// Seeded initial weights, by parameter name (candle's CPU RNG cannot be seeded).
pub fn initial_weights(
    cfg: &ModelConfig,
    seed: u64,
    dev: &Device,
) -> AnyResult<HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    Decoder::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let mut rng = Rng::new(seed);
    let data = varmap.data().lock().expect("var map lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut weights = HashMap::new();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let tensor = if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
            Tensor::ones(&shape, DType::F32, dev)?
        } else {
            // fan-in scaled normal; embeddings unit-scaled
            let fan_in = if name.contains("embed") {
                1
            } else {
                shape.dims()[shape.rank() - 1]
            };
            let std = (1.0 / fan_in as f64).sqrt();
            let values: Vec<f32> = (0..shape.elem_count())
                .map(|_| (rng.normal() * std) as f32)
                .collect();
            Tensor::from_vec(values, &shape, dev)?
        };
        weights.insert(name.clone(), tensor);
    }
    Ok(weights)
}

/// A model whose variables start at `weights`.
fn load_model(
    cfg: &ModelConfig,
    weights: &HashMap<String, Tensor>,
    dev: &Device,
) -> AnyResult<(Decoder, VarMap)> {
    let varmap = VarMap::new();
    let model = Decoder::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    for (name, var) in varmap.data().lock().expect("var map lock").iter() {
        var.set(&weights[name])?;
    }
    Ok((model, varmap))
}

/// A sampled rollout batch.
struct Rollout {
    /// `[N, 2k+1]`: prompt and completion without its last token (the model input).
    inputs: Tensor,
    /// `[N, k]`: the completion tokens.
    targets: Tensor,
    rewards: Vec<f64>,
}

fn sample(model: &Decoder, s: &Settings, rng: &mut Rng, dev: &Device) -> AnyResult<Rollout> {
    let k = s.digits;
    let mut digits = Vec::new();
    let mut seqs = Vec::new();
    for _ in 0..s.prompts {
        let d = task::random_digits(rng, k);
        for _ in 0..s.group_size {
            seqs.push(task::prompt(&d));
            digits.push(d.clone());
        }
    }
    let n = seqs.len();
    for _ in 0..k {
        let len = seqs[0].len();
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let logits = model.forward(&Tensor::from_vec(flat, (n, len), dev)?)?;
        let last = logits.i((.., len - 1, ..))?.to_vec2::<f32>()?;
        for (seq, row) in seqs.iter_mut().zip(&last) {
            seq.push(rng.categorical(row, s.temperature));
        }
    }
    let rewards = digits
        .iter()
        .zip(&seqs)
        .map(|(d, seq)| task::reward(d, &seq[k + 2..]))
        .collect();
    let total = 2 * k + 2;
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    let all = Tensor::from_vec(flat, (n, total), dev)?;
    Ok(Rollout {
        inputs: all.narrow(1, 0, total - 1)?.contiguous()?,
        targets: all.narrow(1, k + 2, k)?.contiguous()?,
        rewards,
    })
}

/// Completion log-probs (and entropies) of `targets` under `model`: from the completion's hidden
/// states through the lm_head, without the logits (`sapo::linear_log_probs_and_entropy`).
fn completion_log_probs(
    model: &Decoder,
    inputs: &Tensor,
    targets: &Tensor,
    k: usize,
    temperature: f64,
) -> sapo::error::Result<(Tensor, Tensor)> {
    let hidden = model.hidden_states(inputs)?.narrow(1, k + 1, k)?;
    let weight = model.lm_head_weight();
    sapo::linear_log_probs_and_entropy(&hidden, weight, None, targets, temperature)
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Trains `model` (started from `init`) with `loss_fn` for `s.steps` steps; `on_step` sees each
/// row as it is made. Returns the rows and the trained variables.
pub fn train(
    objective: Objective,
    loss_fn: &PolicyLoss,
    s: &Settings,
    init: &HashMap<String, Tensor>,
    on_step: &mut dyn FnMut(&Row),
) -> AnyResult<(Vec<Row>, VarMap)> {
    let dev = Device::Cpu;
    let cfg = model_config(s.digits, s.moe);
    let (model, varmap) = load_model(&cfg, init, &dev)?;
    let reference = if s.kl_coef > 0.0 {
        Some(load_model(&cfg, init, &dev)?.0)
    } else {
        None
    };
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: s.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(s.seed.wrapping_add(1));
    let k = s.digits;
    let start = Instant::now();
    let mut rows = Vec::with_capacity(s.steps);
    for step in 0..s.steps {
        let rollout = sample(&model, s, &mut rng, &dev)?;
        let n = rollout.rewards.len();
        let rewards = Tensor::new(rollout.rewards.as_slice(), &dev)?.to_dtype(DType::F32)?;
        let advantages = sapo::group_advantages(
            &rewards,
            Groups::Size(s.group_size),
            AdvantageEstimator::Grpo { epsilon: 1e-6 },
        )?;
        let (old_log_probs, entropy) =
            completion_log_probs(&model, &rollout.inputs, &rollout.targets, k, s.temperature)?;
        let (old_log_probs, entropy) = (old_log_probs.detach(), entropy.detach());
        let ref_log_probs = match &reference {
            Some(r) => Some(
                completion_log_probs(r, &rollout.inputs, &rollout.targets, k, s.temperature)?
                    .0
                    .detach(),
            ),
            None => None,
        };
        let mask = Tensor::ones((n, k), DType::F32, &dev)?;

        // Disjoint minibatches in a random order: every update after the first is off-policy.
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let per_update = n.div_ceil(s.updates_per_batch);
        let mut metrics: Option<sapo::PolicyMetrics> = None;
        let mut mechanism = s.measure.then(MechanismSums::default);
        let mut loss_sum = 0.0;
        let mut updates = 0;
        for chunk in order.chunks(per_update) {
            let idx = Tensor::new(chunk, &dev)?;
            let pick = |t: &Tensor| t.index_select(&idx, 0);
            let (log_probs, _) = completion_log_probs(
                &model,
                &pick(&rollout.inputs)?,
                &pick(&rollout.targets)?,
                k,
                s.temperature,
            )?;
            let (old, adv, m) = (pick(&old_log_probs)?, pick(&advantages)?, pick(&mask)?);
            let reference = ref_log_probs.as_ref().map(pick).transpose()?;
            let mut inputs = PolicyInputs::new(&log_probs, &old, &adv, &m);
            if let Some(r) = &reference {
                inputs = inputs.with_ref_log_probs(r);
            }
            if let Some(sums) = &mut mechanism {
                let weights = loss_fn.gradient_weights(&inputs)?;
                let log_ratio = (log_probs.detach() - &old)?;
                sums.add(
                    &weights.relative.to_vec2()?,
                    &weights.defined.to_vec2()?,
                    &log_ratio.to_vec2()?,
                );
            }
            let output = loss_fn.forward(&inputs)?;
            opt.backward_step(&output.loss)?;
            loss_sum += output.loss.to_scalar::<f32>()? as f64;
            updates += 1;
            metrics = Some(match metrics {
                None => output.metrics,
                Some(prev) => prev.merge(&output.metrics)?,
            });
        }
        let m = metrics.expect("at least one update").read()?;
        let (reward_mean, reward_std) = mean_std(&rollout.rewards);
        let row = Row {
            step,
            objective: objective.name(),
            reward_mean,
            reward_std,
            approx_kl: m.approx_kl().unwrap_or(0.0),
            clip_fraction: m.clip_fraction(),
            gate_weight_mean: m.gate_weight_mean(),
            entropy: entropy.mean_all()?.to_scalar::<f32>()? as f64,
            loss: loss_sum / updates as f64,
            seconds: start.elapsed().as_secs_f64(),
            mechanism: mechanism.map(MechanismSums::finish),
        };
        on_step(&row);
        rows.push(row);
    }
    Ok((rows, varmap))
}
