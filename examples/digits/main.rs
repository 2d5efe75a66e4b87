//! RL on a tiny trainable policy: SAPO, GSPO and GRPO side by side on a verifiable digit task.
//!
//! ```text
//! cargo run --release --example digits                      # all three, default settings
//! cargo run --release --example digits -- --preset stress   # heavily off-policy updates
//! ```
//!
//! Each step samples `group_size` completions for each of `prompts` prompts from the current
//! policy, scores them, computes GRPO group advantages and the old log-probs, then takes
//! `updates_per_batch` AdamW steps on disjoint minibatches of that rollout (so all but the first
//! are off-policy), with the loss from `sapo`.

mod model;
mod plot;
mod task;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sapo::{AdvantageEstimator, Groups, KlEstimator, KlPenalty, PolicyInputs, PolicyLoss};

use model::{Decoder, ModelConfig};
use task::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    Sapo,
    Gspo,
    Grpo,
    /// CISPO, TRL's convention (`min(ρ, 5)`).
    Cispo,
    /// GMPO (verl `geo_mean`).
    Gmpo,
    /// DPPO with the binary-TV trust region (verl `dppo_tv`).
    Dppo,
    /// VESPO (TRL `vespo`).
    Vespo,
    /// SAPO, GSPO and GRPO from the same seed and initial weights.
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Preset {
    /// 800 steps, 4 minibatch updates per rollout batch, learning rate 1e-3.
    Default,
    /// Off-policy stress: 16 minibatch updates per rollout batch (so 15 of every 16 are
    /// off-policy), learning rate 1e-3.
    Stress,
}

/// Train a tiny decoder with SAPO, GSPO and GRPO on digit reversal.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Which objective to train; `all` trains SAPO, GSPO and GRPO from the same seed and initial
    /// weights (the later objectives one at a time).
    #[arg(long, value_enum, default_value = "all")]
    objective: ObjectiveArg,
    /// Settings preset; explicit flags override it.
    #[arg(long, value_enum, default_value = "default")]
    preset: Preset,
    /// RL steps (rollout batches) per objective.
    #[arg(long)]
    steps: Option<usize>,
    /// Completions sampled per prompt.
    #[arg(long)]
    group_size: Option<usize>,
    /// Prompts per rollout batch.
    #[arg(long)]
    prompts: Option<usize>,
    /// Minibatch updates per rollout batch (≥ 2 makes all but the first off-policy).
    #[arg(long)]
    updates_per_batch: Option<usize>,
    /// AdamW learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Number of digits to reverse.
    #[arg(long, default_value_t = 3)]
    digits: usize,
    /// Sampling temperature of the rollouts.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// KL coefficient β to the frozen initial policy (k3); 0 disables it.
    #[arg(long, default_value_t = 0.0)]
    kl_coef: f64,
    /// Mixture-of-experts feed-forward (4 SwiGLU experts, top-2 routing) instead of the dense one:
    /// routing shifts between the sampling and the training policy, the instability the SAPO
    /// paper targets.
    #[arg(long)]
    moe: bool,
    /// Seed of the initial weights, the prompts and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (metrics.csv, curves.png, <objective>.safetensors).
    #[arg(long, default_value = "runs")]
    out: PathBuf,
}

/// Resolved settings.
#[derive(Debug, Clone, Copy)]
struct Settings {
    steps: usize,
    group_size: usize,
    prompts: usize,
    updates_per_batch: usize,
    lr: f64,
    digits: usize,
    temperature: f64,
    kl_coef: f64,
    seed: u64,
}

impl Args {
    fn settings(&self) -> Settings {
        let (updates, lr) = match self.preset {
            Preset::Default => (4, 1e-3),
            Preset::Stress => (16, 1e-3),
        };
        Settings {
            steps: self.steps.unwrap_or(800),
            group_size: self.group_size.unwrap_or(8),
            prompts: self.prompts.unwrap_or(16),
            updates_per_batch: self.updates_per_batch.unwrap_or(updates),
            lr: self.lr.unwrap_or(lr),
            digits: self.digits,
            temperature: self.temperature,
            kl_coef: self.kl_coef,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    Sapo,
    Gspo,
    Grpo,
    Cispo,
    Gmpo,
    Dppo,
    Vespo,
}

impl Objective {
    fn name(self) -> &'static str {
        match self {
            Self::Sapo => "sapo",
            Self::Gspo => "gspo",
            Self::Grpo => "grpo",
            Self::Cispo => "cispo",
            Self::Gmpo => "gmpo",
            Self::Dppo => "dppo",
            Self::Vespo => "vespo",
        }
    }
    /// The papers' defaults, from the crate's presets.
    fn loss(self, kl_coef: f64) -> sapo::error::Result<PolicyLoss> {
        let config = match self {
            Self::Sapo => sapo::Sapo::default().config(),
            Self::Gspo => sapo::Gspo::default().config(),
            Self::Grpo => sapo::Grpo::default().config(),
            Self::Cispo => sapo::Cispo::default().config(),
            Self::Gmpo => sapo::Gmpo::default().config(),
            Self::Dppo => sapo::Dppo::new(sapo::Divergence::BinaryTv, 0.15, 0.15, 3.0).config(),
            Self::Vespo => sapo::Vespo::default().config(),
        };
        let kl = (kl_coef > 0.0).then(|| KlPenalty::new(kl_coef, KlEstimator::K3));
        config.with_kl(kl).build()
    }
}

/// One CSV row.
#[derive(Debug, Clone)]
struct Row {
    step: usize,
    objective: &'static str,
    reward_mean: f64,
    reward_std: f64,
    approx_kl: f64,
    clip_fraction: Option<f64>,
    gate_weight_mean: Option<f64>,
    entropy: f64,
    loss: f64,
    seconds: f64,
}

const CSV_HEADER: &str =
    "step,objective,reward_mean,reward_std,approx_kl,clip_fraction,gate_weight_mean,entropy,loss,seconds";

fn write_csv(path: &Path, rows: &[Row]) -> std::io::Result<()> {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for r in rows {
        text.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{},{},{:.6},{:.6},{:.3}\n",
            r.step,
            r.objective,
            r.reward_mean,
            r.reward_std,
            r.approx_kl,
            opt(r.clip_fraction),
            opt(r.gate_weight_mean),
            r.entropy,
            r.loss,
            r.seconds
        ));
    }
    std::fs::write(path, text)
}

fn model_config(digits: usize, moe: bool) -> ModelConfig {
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
fn initial_weights(
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

/// Any error, boxed: the example's error plumbing.
type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

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

fn train(
    objective: Objective,
    s: &Settings,
    cfg: &ModelConfig,
    init: &HashMap<String, Tensor>,
    out: &Path,
    bar: &ProgressBar,
) -> AnyResult<Vec<Row>> {
    let dev = Device::Cpu;
    let (model, varmap) = load_model(cfg, init, &dev)?;
    let reference = if s.kl_coef > 0.0 {
        Some(load_model(cfg, init, &dev)?.0)
    } else {
        None
    };
    let loss_fn = objective.loss(s.kl_coef)?;
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
        };
        let trust = match (row.clip_fraction, row.gate_weight_mean) {
            (Some(c), _) => format!("clip {c:.3}"),
            (_, Some(g)) => format!("gate {g:.3}"),
            _ => String::new(),
        };
        bar.set_message(format!(
            "reward {:.3}  approx_kl {:+.4}  {trust}",
            row.reward_mean, row.approx_kl
        ));
        bar.inc(1);
        rows.push(row);
    }
    varmap.save(out.join(format!("{}.safetensors", objective.name())))?;
    bar.finish();
    Ok(rows)
}

/// Mean of `reward_mean` over rows `[from, to)` of a run.
fn window_mean(rows: &[Row], from: usize, to: usize) -> f64 {
    let w = &rows[from..to.max(from + 1).min(rows.len())];
    w.iter().map(|r| r.reward_mean).sum::<f64>() / w.len() as f64
}

fn main() -> AnyResult<()> {
    let args = Args::parse();
    let s = args.settings();
    if s.steps == 0
        || s.group_size < 2
        || s.prompts == 0
        || s.updates_per_batch == 0
        || s.digits == 0
    {
        return Err(
            "--steps, --prompts, --updates-per-batch and --digits must be ≥ 1, --group-size ≥ 2"
                .into(),
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let objectives = match args.objective {
        ObjectiveArg::Sapo => vec![Objective::Sapo],
        ObjectiveArg::Gspo => vec![Objective::Gspo],
        ObjectiveArg::Grpo => vec![Objective::Grpo],
        ObjectiveArg::Cispo => vec![Objective::Cispo],
        ObjectiveArg::Gmpo => vec![Objective::Gmpo],
        ObjectiveArg::Dppo => vec![Objective::Dppo],
        ObjectiveArg::Vespo => vec![Objective::Vespo],
        ObjectiveArg::All => vec![Objective::Sapo, Objective::Gspo, Objective::Grpo],
    };
    let cfg = model_config(s.digits, args.moe);
    let dev = Device::Cpu;
    let init = initial_weights(&cfg, s.seed, &dev)?;
    println!(
        "digit reversal, {} digits: {} prompts × {} completions per step, {} updates per batch, lr {}, {} steps (chance ≈ 0.083)",
        s.digits, s.prompts, s.group_size, s.updates_per_batch, s.lr, s.steps
    );
    let style =
        ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos:>4}/{len} {elapsed:>4} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    let mut runs: Vec<(Objective, Vec<Row>)> = Vec::new();
    let mut all_rows = Vec::new();
    for objective in objectives {
        let bar = ProgressBar::new(s.steps as u64)
            .with_style(style.clone())
            .with_prefix(objective.name());
        let rows = train(objective, &s, &cfg, &init, &args.out, &bar)?;
        all_rows.extend(rows.iter().cloned());
        write_csv(&args.out.join("metrics.csv"), &all_rows)?;
        runs.push((objective, rows));
    }
    plot::curves(
        &args.out.join("curves.png"),
        &runs
            .iter()
            .map(|(o, r)| (o.name(), r.as_slice()))
            .collect::<Vec<_>>(),
    )?;

    let tenth = (s.steps / 10).max(1);
    println!();
    println!(
        "| objective | reward, first 10% | reward, last 10% | approx_kl, last 10% | seconds |"
    );
    println!("|---|---|---|---|---|");
    for (objective, rows) in &runs {
        let last = &rows[rows.len() - tenth..];
        let kl = last.iter().map(|r| r.approx_kl).sum::<f64>() / last.len() as f64;
        println!(
            "| {} | {:.3} | {:.3} | {:+.5} | {:.0} |",
            objective.name(),
            window_mean(rows, 0, tenth),
            window_mean(rows, rows.len() - tenth, rows.len()),
            kl,
            rows.last().map_or(0.0, |r| r.seconds),
        );
    }
    println!(
        "\nwrote {}/metrics.csv, curves.png and the weights",
        args.out.display()
    );
    Ok(())
}
