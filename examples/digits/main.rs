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
// Shared with the study runner and the smollm example.
#[allow(dead_code)]
mod objective;
mod plot;
mod series;
mod task;
// Shared with the study runner (examples/study), which uses what this example does not.
#[allow(dead_code)]
mod train;

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use train::{AnyResult, Objective, Row, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObjectiveArg {
    Sapo,
    /// SAPO's gate on the sequence ratio.
    SapoSeq,
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
            moe: self.moe,
            seed: self.seed,
            measure: false,
        }
    }
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
        ObjectiveArg::SapoSeq => vec![Objective::SapoSeq],
        ObjectiveArg::Gspo => vec![Objective::Gspo],
        ObjectiveArg::Grpo => vec![Objective::Grpo],
        ObjectiveArg::Cispo => vec![Objective::Cispo],
        ObjectiveArg::Gmpo => vec![Objective::Gmpo],
        ObjectiveArg::Dppo => vec![Objective::Dppo],
        ObjectiveArg::Vespo => vec![Objective::Vespo],
        ObjectiveArg::All => vec![Objective::Sapo, Objective::Gspo, Objective::Grpo],
    };
    let cfg = train::model_config(s.digits, s.moe);
    let init = train::initial_weights(&cfg, s.seed, &Device::Cpu)?;
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
        let loss_fn = objective.loss(sapo::Sapo::default(), s.kl_coef)?;
        let (rows, varmap) = train::train(objective, &loss_fn, &s, &init, &mut |row| {
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
        })?;
        bar.finish();
        varmap.save(args.out.join(format!("{}.safetensors", objective.name())))?;
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
