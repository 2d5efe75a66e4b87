//! Which objective, when: a multi-seed study of SAPO, GSPO, GRPO and the later objectives on the
//! digit task of `examples/digits` (the same task, model and training loop, shared through its
//! modules), with the mechanism the SAPO paper names measured per update.
//!
//! ```text
//! cargo run --release --example study              # the default grid (about an hour on 2 cores)
//! cargo run --release --example study -- --quick   # 2 seeds, few steps: a smoke test
//! ```
//!
//! Each run (objective × setting × SAPO temperatures × seed) is seeded and deterministic: its
//! numbers do not depend on the thread count or on the order runs finish. Finished runs are kept
//! in `<out>/runs/` and not run again, so an interrupted study resumes where it stopped. At the
//! end the study writes `runs.csv`, `curves.csv`, `mechanism.csv`, `summary.csv` and the figures.

#[path = "../digits/model.rs"]
mod model;
#[path = "../digits/objective.rs"]
mod objective;
#[path = "../digits/series.rs"]
mod series;
#[path = "../digits/task.rs"]
mod task;
#[path = "../digits/train.rs"]
// The study uses what it needs of the shared training loop; the digits example the rest.
#[allow(dead_code)]
mod train;

mod figures;
mod output;
mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use train::{AnyResult, Objective, Settings};

/// A multi-seed study of the policy objectives on the digit task.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The smoke-test grid: 2 seeds, 4 steps (3 in the longer task), every objective, setting and
    /// SAPO temperature pair.
    #[arg(long)]
    quick: bool,
    /// Output directory (default `study`, or `study-quick` with `--quick`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs trained at once (default: the number of cores). Results do not depend on it.
    #[arg(long)]
    jobs: Option<usize>,
    /// Steps per run in the 3-digit settings (default 150); the longer task takes 3/4 of them.
    #[arg(long)]
    steps: Option<usize>,
    /// Seeds of SAPO, GSPO and GRPO per setting (default 8).
    #[arg(long)]
    seeds: Option<usize>,
    /// Seeds of the later objectives (sequence-level SAPO, CISPO, GMPO, VESPO) and of the SAPO
    /// temperature grid, per setting (default 4; the first seeds of the main objectives', so
    /// every comparison is paired).
    #[arg(long)]
    later_seeds: Option<usize>,
}

/// The task and training settings of the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Setting {
    /// 3 digits, 4 minibatch updates per rollout batch (3 of 4 off-policy).
    Default,
    /// Off-policy stress: 16 minibatch updates per rollout batch.
    Stress,
    /// The mixture-of-experts feed-forward (4 experts, top-2 routing).
    Moe,
    /// Mixture of experts and 16 updates per batch.
    MoeStress,
    /// 8 digits (completions of 8 tokens), 8 updates per batch: sequences with a few
    /// off-policy tokens among several on-policy ones.
    Long,
}

impl Setting {
    pub const ALL: [Setting; 5] = [
        Self::Default,
        Self::Stress,
        Self::Moe,
        Self::MoeStress,
        Self::Long,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Stress => "stress",
            Self::Moe => "moe",
            Self::MoeStress => "moe-stress",
            Self::Long => "long",
        }
    }
    pub fn from_name(name: &str) -> Option<Setting> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
    /// The run's settings at `steps` steps (the longer task: 3/4 of them).
    fn settings(self, steps: usize, seed: u64) -> Settings {
        let (digits, updates, moe) = match self {
            Self::Default => (3, 4, false),
            Self::Stress => (3, 16, false),
            Self::Moe => (3, 4, true),
            Self::MoeStress => (3, 16, true),
            Self::Long => (8, 8, false),
        };
        Settings {
            steps: if digits > 3 { steps * 3 / 4 } else { steps }.max(1),
            group_size: 8,
            prompts: 16,
            updates_per_batch: updates,
            lr: 1e-3,
            digits,
            temperature: 1.0,
            kl_coef: 0.0,
            moe,
            seed,
            measure: true,
        }
    }
}

/// SAPO's temperatures in the grid: `τ_pos × τ_neg` over these.
pub const TAUS: [f64; 3] = [0.5, 1.0, 2.0];

/// One run of the grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    pub setting: Setting,
    pub objective: Objective,
    /// SAPO's `(τ_pos, τ_neg)` (both SAPO forms); the preset's for the other objectives.
    pub taus: (f64, f64),
    pub seed: u64,
    pub steps: usize,
}

impl Run {
    /// SAPO's default temperatures, the reference of the paired comparisons.
    pub fn is_reference(&self) -> bool {
        let d = sapo::Sapo::default();
        self.objective == Objective::Sapo && self.taus == (d.tau_pos, d.tau_neg)
    }
    /// The run's name in the results: the objective, with SAPO's temperatures when they are not
    /// the paper's.
    pub fn label(&self) -> String {
        let d = sapo::Sapo::default();
        match self.objective {
            Objective::Sapo | Objective::SapoSeq if self.taus != (d.tau_pos, d.tau_neg) => {
                format!("{} τ{}/{}", self.objective.name(), self.taus.0, self.taus.1)
            }
            o => o.name().to_string(),
        }
    }
    /// The file name of its curve under `runs/`.
    pub fn id(&self) -> String {
        format!(
            "{}_{}_tau{}-{}_seed{}_steps{}",
            self.setting.name(),
            self.objective.name(),
            self.taus.0,
            self.taus.1,
            self.seed,
            self.steps
        )
    }
    fn settings(&self) -> Settings {
        let mut s = self.setting.settings(self.steps, self.seed);
        s.steps = self.steps;
        s
    }
}

/// The grid's size.
#[derive(Debug, Clone, Copy)]
struct Grid {
    steps: usize,
    seeds: usize,
    later_seeds: usize,
}

impl Grid {
    fn runs(&self) -> Vec<Run> {
        let sapo = sapo::Sapo::default();
        let reference = (sapo.tau_pos, sapo.tau_neg);
        let mut runs = Vec::new();
        for setting in Setting::ALL {
            let steps = setting.settings(self.steps, 0).steps;
            let run = |objective, taus, seed| Run {
                setting,
                objective,
                taus,
                seed,
                steps,
            };
            for seed in 0..self.seeds as u64 {
                for objective in [Objective::Sapo, Objective::Gspo, Objective::Grpo] {
                    runs.push(run(objective, reference, seed));
                }
            }
            for seed in 0..self.later_seeds.min(self.seeds) as u64 {
                for objective in [
                    Objective::SapoSeq,
                    Objective::Cispo,
                    Objective::Gmpo,
                    Objective::Vespo,
                ] {
                    runs.push(run(objective, reference, seed));
                }
                for tau_pos in TAUS {
                    for tau_neg in TAUS {
                        runs.push(run(Objective::Sapo, (tau_pos, tau_neg), seed));
                    }
                }
            }
        }
        runs
    }
}

fn main() -> AnyResult<()> {
    let args = Args::parse();
    let grid = Grid {
        steps: args.steps.unwrap_or(if args.quick { 4 } else { 150 }),
        seeds: args.seeds.unwrap_or(if args.quick { 2 } else { 8 }),
        later_seeds: args.later_seeds.unwrap_or(if args.quick { 2 } else { 4 }),
    };
    if grid.steps < 2 || grid.seeds == 0 {
        return Err("--steps must be ≥ 2 and --seeds ≥ 1".into());
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if args.quick { "study-quick" } else { "study" }));
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // One thread a run, runs side by side: the runs are small and spend most of their time in
    // candle's per-op overhead, which threads do not shorten (measured: the quick grid takes 35 s
    // this way on 2 cores, 48 s with two threads a run). Set before candle or the crate starts
    // its thread pool; the results do not depend on it.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    std::fs::create_dir_all(out.join("runs"))?;
    let runs = grid.runs();
    let pending: Vec<&Run> = runs
        .iter()
        .filter(|r| output::read_curve(&out, r).is_none())
        .collect();
    println!(
        "{} runs ({} finished earlier, {} to train) with {jobs} at a time into {}",
        runs.len(),
        runs.len() - pending.len(),
        pending.len(),
        out.display()
    );
    let bar = ProgressBar::new(pending.iter().map(|r| r.steps as u64).sum());
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:40}] {percent:>3}% {elapsed_precise} (eta {eta}) {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(pending.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= pending.len() || failure.lock().expect("lock").is_some() {
                    break;
                }
                if let Err(e) = train_one(pending[i], &out, &bar) {
                    *failure.lock().expect("lock") = Some(format!("{}: {e}", pending[i].id()));
                    break;
                }
                let done = finished.fetch_add(1, Ordering::SeqCst) + 1;
                bar.set_message(format!("{done}/{} runs", pending.len()));
            });
        }
    });
    bar.finish();
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e.into());
    }
    println!(
        "trained {} runs in {:.0} s",
        pending.len(),
        started.elapsed().as_secs_f64()
    );
    let results = output::Results::read(&out, &runs)?;
    let stats = results.stats();
    let markdown = results.write(&out, &stats)?;
    figures::draw(&out, &results, &stats)?;
    println!("{markdown}");
    println!(
        "wrote {0}/runs.csv, curves.csv, mechanism.csv, summary.csv and {0}/*.png",
        out.display()
    );
    Ok(())
}

/// Trains one run and writes its curve (atomically: a run is finished once its file exists).
fn train_one(run: &Run, out: &std::path::Path, bar: &ProgressBar) -> AnyResult<()> {
    let s = run.settings();
    let cfg = train::model_config(s.digits, s.moe);
    let init = train::initial_weights(&cfg, s.seed, &Device::Cpu)?;
    let sapo = sapo::Sapo {
        tau_pos: run.taus.0,
        tau_neg: run.taus.1,
        ..sapo::Sapo::default()
    };
    let loss_fn = run.objective.loss(sapo, s.kl_coef)?;
    let started = Instant::now();
    let (rows, _) = train::train(run.objective, &loss_fn, &s, &init, &mut |_| bar.inc(1))?;
    output::write_curve(out, run, &rows, started.elapsed().as_secs_f64())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_paired_and_complete() {
        let grid = Grid {
            steps: 150,
            seeds: 8,
            later_seeds: 4,
        };
        let runs = grid.runs();
        // Per setting: 3 objectives × 8 seeds, 4 later objectives × 4 seeds, 9 τ pairs × 4 seeds.
        assert_eq!(runs.len(), 5 * (3 * 8 + 4 * 4 + 9 * 4));
        for setting in Setting::ALL {
            let of = |o: Objective| -> Vec<u64> {
                runs.iter()
                    .filter(|r| {
                        r.setting == setting && r.objective == o && !r.label().contains('τ')
                    })
                    .map(|r| r.seed)
                    .collect()
            };
            assert_eq!(of(Objective::Sapo), (0..8).collect::<Vec<_>>());
            assert_eq!(of(Objective::Gspo), of(Objective::Sapo));
            assert_eq!(of(Objective::Vespo), (0..4).collect::<Vec<_>>());
            assert!(runs
                .iter()
                .any(|r| r.setting == setting && r.taus == (2.0, 0.5)));
        }
        // Every run has its own file name, and the longer task runs 3/4 of the steps.
        let mut ids: Vec<String> = runs.iter().map(Run::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), runs.len());
        assert!(runs
            .iter()
            .all(|r| r.steps == if r.setting == Setting::Long { 112 } else { 150 }));
        assert_eq!(runs.iter().filter(|r| r.is_reference()).count(), 5 * 8);
    }
}
