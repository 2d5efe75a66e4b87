//! RL on a real pretrained model with `sapo`: SmolLM2-135M-Instruct, read from its GGUF, learns
//! two-number addition.
//!
//! ```text
//! scripts/fetch-smollm2.sh                                             # the model, once
//! cargo run --release --example smollm -- --score "What is 7 + 5?" --chat
//! cargo run --release --example smollm                               # SAPO, 60 steps
//! cargo run --release --example smollm -- --objective all             # SAPO, GSPO, GRPO
//! ```
//!
//! The GGUF is dequantized to f32 and built into a differentiable Llama (`model.rs`); its own
//! vocabulary and merges make the tokenizer (`tokenizer.rs`). Each RL step samples `group_size`
//! completions of `prompts` questions with a KV cache, rewards the stated answer (`task.rs`),
//! computes group advantages and the old log-probs from the hidden states through the tied
//! lm_head, then takes `updates_per_batch` AdamW minibatch steps with
//! `PolicyLoss::forward_from_hidden` (`train.rs`). The held-out questions are evaluated before and
//! after, greedily and sampled at the training temperature.

#[path = "../digits/task.rs"]
#[allow(dead_code)]
mod digits_task;
mod gguf;
mod model;
#[path = "../digits/objective.rs"]
#[allow(dead_code)]
mod objective;
mod plot;
mod task;
#[cfg(test)]
mod tests;
mod tokenizer;
mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use digits_task::Rng;
use objective::Objective;
use train::{Evaluation, Row, Settings, Trainer};

/// Any error, boxed: the examples' error plumbing.
pub type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Where `scripts/fetch-smollm2.sh` puts the model.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Metal,
}

/// Train SmolLM2-135M-Instruct (from its GGUF) on addition with SAPO, GSPO, GRPO or a later
/// objective; or score a text.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The GGUF (get it with scripts/fetch-smollm2.sh).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Print `{"ids": [...], "log_probs": [...]}` for TEXT (each token's log-prob after the first,
    /// given the ones before it) and exit.
    #[arg(long, value_name = "TEXT")]
    score: Option<String>,
    /// With --score: wrap TEXT as one user turn of the chat template, assistant turn opened.
    #[arg(long)]
    chat: bool,
    /// sapo, sapo-seq, gspo, grpo, cispo, gmpo, dppo or vespo (the presets' defaults), a
    /// comma-separated list of them, or `all` (sapo,gspo,grpo): each from the same start, prompts
    /// and sampling seed.
    #[arg(long, default_value = "sapo")]
    objective: String,
    /// Seed of the training prompts and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// RL steps (rollouts).
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Questions per rollout.
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Completions sampled per question.
    #[arg(long, default_value_t = 16)]
    group_size: usize,
    /// Minibatch updates per rollout (all but the first are off-policy).
    #[arg(long, default_value_t = 4)]
    updates_per_batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 3e-5)]
    lr: f64,
    /// Sampling temperature of the rollouts and of the sampled evaluation.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Token budget of a completion.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// Only the top K blocks and the final norm train (the blocks below run once per rollout,
    /// without a graph); the model's depth (30) trains everything, the tied embedding included.
    #[arg(long, default_value_t = 6)]
    train_layers: usize,
    /// KL coefficient to the frozen start model (k3); 0 disables it.
    #[arg(long, default_value_t = 0.0)]
    kl_coef: f64,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Operands are drawn from [lo, hi) (same number of digits).
    #[arg(long, default_value_t = 10)]
    lo: u32,
    #[arg(long, default_value_t = 50)]
    hi: u32,
    /// Held-out questions (never trained on), evaluated before and after training.
    #[arg(long, default_value_t = 200)]
    held_out: usize,
    /// Rows per evaluation batch.
    #[arg(long, default_value_t = 50)]
    eval_batch: usize,
    /// Draw `--out`/curves.png from these metrics.csv files (several runs' rows together, one
    /// line per objective and file) and exit; no model is read.
    #[arg(long, value_name = "CSV", num_args = 1..)]
    plot: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Output directory: metrics.csv, curves.png, summary.json, <objective>.safetensors.
    #[arg(long, default_value = "runs/smollm")]
    out: PathBuf,
}

/// Reads the model, or says how to get it.
fn load(path: &Path, device: &Device) -> AnyResult<(model::Llama, tokenizer::ChatTokenizer)> {
    if !path.exists() {
        return Err(format!(
            "no model at {}: run scripts/fetch-smollm2.sh (fetches SmolLM2-135M-Instruct.Q4_1.gguf \
             into models/, checks its SHA-256), or pass --model PATH",
            path.display()
        )
        .into());
    }
    let mut gguf = gguf::Gguf::read(path, device)?;
    let tokenizer = tokenizer::ChatTokenizer::from_metadata(&gguf.metadata)?;
    let model = model::Llama::from_gguf(&mut gguf, device)?;
    Ok((model, tokenizer))
}

/// The ids of `text` and each token's log-prob after the first, given the ones before it.
pub fn score(
    model: &model::Llama,
    tokenizer: &tokenizer::ChatTokenizer,
    text: &str,
) -> AnyResult<(Vec<u32>, Vec<f32>)> {
    let ids = tokenizer.encode(text)?;
    if ids.len() < 2 {
        return Ok((ids, Vec::new()));
    }
    let device = model.embed.device();
    let model = model.detached();
    let t = ids.len();
    let input = Tensor::new(&ids[..t - 1], device)?.unsqueeze(0)?;
    let targets = Tensor::new(&ids[1..], device)?.unsqueeze(0)?;
    let hidden = model.hidden_states(&input)?;
    let (log_probs, _) =
        sapo::linear_log_probs_and_entropy(&hidden, model.lm_head(), None, &targets, 1.0)?;
    Ok((ids, log_probs.squeeze(0)?.to_vec1()?))
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn digits(n: u32) -> usize {
    n.to_string().len()
}

/// The rows of a metrics.csv, grouped by objective in their order of appearance.
fn read_metrics(path: &Path) -> AnyResult<Vec<(&'static str, Vec<Row>)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--plot {}: {e}", path.display()))?;
    let mut runs: Vec<(&'static str, Vec<Row>)> = Vec::new();
    for (number, line) in text.lines().enumerate().skip(1) {
        let row = Row::parse(line).ok_or_else(|| {
            format!(
                "--plot {}: line {} is not a metrics row: {line:?}",
                path.display(),
                number + 1
            )
        })?;
        match runs.last_mut() {
            Some((objective, rows)) if *objective == row.objective => rows.push(row),
            _ => runs.push((row.objective, vec![row])),
        }
    }
    Ok(runs)
}

fn main() -> AnyResult<()> {
    let args = Args::parse();
    if !args.plot.is_empty() {
        let mut runs = Vec::new();
        for path in &args.plot {
            runs.extend(read_metrics(path)?);
        }
        std::fs::create_dir_all(&args.out)?;
        let path = args.out.join("curves.png");
        plot::curves(
            &path,
            &runs
                .iter()
                .map(|(objective, rows)| (*objective, rows.as_slice()))
                .collect::<Vec<_>>(),
        )?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0)?,
        DeviceArg::Metal => Device::new_metal(0)?,
    };
    let loaded = Instant::now();
    let (model, tokenizer) = load(&args.model, &device)?;
    if let Some(text) = &args.score {
        let text = if args.chat {
            tokenizer::chat_prompt(text)
        } else {
            text.clone()
        };
        let (ids, log_probs) = score(&model, &tokenizer, &text)?;
        println!(
            "{}",
            serde_json::json!({ "ids": ids, "log_probs": log_probs })
        );
        return Ok(());
    }

    let objectives = args
        .objective
        .split(',')
        .map(|name| match name.trim() {
            "all" => Ok(vec![Objective::Sapo, Objective::Gspo, Objective::Grpo]),
            name => Objective::from_name(name).map(|o| vec![o]).ok_or_else(|| {
                format!(
                    "--objective {name}: one of sapo, sapo-seq, gspo, grpo, cispo, gmpo, dppo, \
                     vespo, all (sapo,gspo,grpo), or a comma-separated list"
                )
            }),
        })
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    if args.lo >= args.hi || digits(args.lo) != digits(args.hi - 1) {
        return Err(format!(
            "--lo {} --hi {}: want lo < hi with every operand of the same number of digits \
             (one prompt length per rollout)",
            args.lo, args.hi
        )
        .into());
    }
    if args.steps == 0
        || args.prompts == 0
        || args.group_size < 2
        || args.updates_per_batch == 0
        || args.max_new_tokens == 0
        || args.held_out == 0
    {
        return Err(
            "--steps, --prompts, --updates-per-batch, --max-new-tokens, --held-out ≥ 1 and \
             --group-size ≥ 2"
                .into(),
        );
    }
    let (held_out, train_set) = task::split(args.lo, args.hi, args.held_out);
    if train_set.is_empty() {
        return Err("no training questions left after the held-out set".into());
    }
    std::fs::create_dir_all(&args.out)?;
    println!(
        "SmolLM2-135M-Instruct loaded in {:.1} s; {} on a + b with a, b in [{}, {}): {} questions × \
         {} completions per step, {} updates per rollout, lr {}, temperature {}, top {} of {} \
         blocks train, {} steps; {} held-out questions",
        loaded.elapsed().as_secs_f64(),
        objectives
            .iter()
            .map(|o| o.name())
            .collect::<Vec<_>>()
            .join(", "),
        args.lo,
        args.hi,
        args.prompts,
        args.group_size,
        args.updates_per_batch,
        args.lr,
        args.temperature,
        args.train_layers,
        model.blocks.len(),
        args.steps,
        held_out.len()
    );
    let eval = |m: &model::Llama, label: &str| -> AnyResult<(Evaluation, Evaluation)> {
        let t = Instant::now();
        let mut rng = Rng::new(args.seed ^ 0xE7A1);
        let greedy = train::evaluate(
            m,
            &tokenizer,
            &held_out,
            0.0,
            args.max_new_tokens,
            args.eval_batch,
            &mut rng,
        )?;
        let sampled = train::evaluate(
            m,
            &tokenizer,
            &held_out,
            args.temperature,
            args.max_new_tokens,
            args.eval_batch,
            &mut rng,
        )?;
        println!(
            "{label}: held-out accuracy greedy {:.3} (mean length {:.1}), sampled {:.3} (mean \
             length {:.1}) [{:.0} s]",
            greedy.accuracy,
            greedy.mean_length,
            sampled.accuracy,
            sampled.mean_length,
            t.elapsed().as_secs_f64()
        );
        Ok((greedy, sampled))
    };
    let before = eval(&model, "before")?;

    let settings = Settings {
        group_size: args.group_size,
        updates_per_batch: args.updates_per_batch,
        lr: args.lr,
        temperature: args.temperature,
        max_new_tokens: args.max_new_tokens,
        train_blocks: args.train_layers,
        kl_coef: args.kl_coef,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
    };
    let style =
        ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos:>3}/{len} {elapsed:>4} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    let mut runs: Vec<(Objective, Vec<Row>)> = Vec::new();
    let mut summaries = Vec::new();
    for &objective in &objectives {
        // Every objective from the same start, prompts and sampling seed.
        let mut trainer = Trainer::new(model.clone(), &tokenizer, objective, settings.clone())?;
        let bar = ProgressBar::new(args.steps as u64)
            .with_style(style.clone())
            .with_prefix(objective.name());
        let mut rng = Rng::new(args.seed);
        let mut rows: Vec<Row> = Vec::with_capacity(args.steps);
        for _ in 0..args.steps {
            let problems: Vec<task::Problem> = (0..args.prompts)
                .map(|_| train_set[rng.below(train_set.len())])
                .collect();
            let row = trainer.step(&problems)?;
            bar.set_message(format!(
                "reward {:.3}  length {:.1}  approx_kl {:+.4}",
                row.reward_mean, row.completion_length, row.approx_kl
            ));
            bar.inc(1);
            rows.push(row);
            let mut csv = String::from(train::CSV_HEADER);
            for r in runs.iter().flat_map(|(_, r)| r).chain(&rows) {
                csv.push('\n');
                csv.push_str(&r.csv());
            }
            csv.push('\n');
            std::fs::write(args.out.join("metrics.csv"), csv)?;
        }
        bar.finish();
        let trained: HashMap<String, Tensor> = trainer
            .policy
            .vars
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        candle_core::safetensors::save(
            &trained,
            args.out.join(format!("{}.safetensors", objective.name())),
        )?;
        let after = eval(
            &trainer.policy.model,
            &format!("after {}", objective.name()),
        )?;
        let n = rows.len() as f64;
        let mean = |f: fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
        let summary = serde_json::json!({
            "objective": objective.name(),
            "seed": args.seed,
            "steps": args.steps,
            "held_out": held_out.len(),
            "greedy_accuracy": [before.0.accuracy, after.0.accuracy],
            "sampled_accuracy": [before.1.accuracy, after.1.accuracy],
            "greedy_mean_length": [before.0.mean_length, after.0.mean_length],
            "sampled_mean_length": [before.1.mean_length, after.1.mean_length],
            "seconds_per_step": {
                "sampling": mean(|r| r.seconds_sampling),
                "old_log_probs": mean(|r| r.seconds_old_log_probs),
                "updates": mean(|r| r.seconds_updates),
            },
            "training_seconds": rows.last().map_or(0.0, |r| r.seconds),
            "peak_memory_mib": peak_memory_mib(),
        });
        println!("{summary}");
        summaries.push(summary);
        std::fs::write(
            args.out.join("summary.json"),
            serde_json::to_string_pretty(&summaries)?,
        )?;
        runs.push((objective, rows));
        plot::curves(
            &args.out.join("curves.png"),
            &runs
                .iter()
                .map(|(o, r)| (o.name(), r.as_slice()))
                .collect::<Vec<_>>(),
        )?;
    }
    println!(
        "wrote {}/metrics.csv, curves.png, summary.json and the trained weights \
         (<objective>.safetensors)",
        args.out.display()
    );
    Ok(())
}
