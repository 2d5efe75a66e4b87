//! The study's files: each run's curve under `runs/` (written once the run finishes, read back to
//! resume), and the tables made from them (`runs.csv`, `curves.csv`, `mechanism.csv`,
//! `summary.csv`, `summary.md`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::stats::{self, RunSummary};
use crate::train::{AnyResult, Objective, Row};
use crate::{Run, Setting};

/// The columns of a run's curve, after `step`.
pub const COLUMNS: [&str; 17] = [
    "reward_mean",
    "reward_std",
    "approx_kl",
    "clip_fraction",
    "gate_weight_mean",
    "entropy",
    "loss",
    "mean_weight",
    "active_token_share",
    "silenced_sequence_share",
    "off_policy_sequence_share",
    "bystander_active_share",
    "log_ratio_p01",
    "log_ratio_p05",
    "log_ratio_p50",
    "log_ratio_p95",
    "log_ratio_p99",
];

/// Index of a column in `COLUMNS`.
pub fn column(name: &str) -> usize {
    COLUMNS
        .iter()
        .position(|c| *c == name)
        .unwrap_or_else(|| panic!("no column {name}"))
}

fn curve_path(out: &Path, run: &Run) -> PathBuf {
    out.join("runs").join(format!("{}.csv", run.id()))
}

/// A row's values in `COLUMNS` order (NaN for a metric the objective does not have).
fn values(row: &Row) -> Vec<f64> {
    let m = row.mechanism;
    let mech = |f: fn(&crate::train::Mechanism) -> f64| m.as_ref().map_or(f64::NAN, f);
    let mut v = vec![
        row.reward_mean,
        row.reward_std,
        row.approx_kl,
        row.clip_fraction.unwrap_or(f64::NAN),
        row.gate_weight_mean.unwrap_or(f64::NAN),
        row.entropy,
        row.loss,
        mech(|m| m.mean_weight),
        mech(|m| m.active_token_share),
        mech(|m| m.silenced_sequence_share),
        mech(|m| m.off_policy_sequence_share),
        mech(|m| m.bystander_active_share),
    ];
    for q in 0..5 {
        v.push(m.as_ref().map_or(f64::NAN, |m| m.log_ratio_quantiles[q]));
    }
    v
}

/// Writes a finished run's curve: a temporary file renamed into place, so a file that exists is
/// a whole run. The first line holds the run's wall-clock seconds.
pub fn write_curve(out: &Path, run: &Run, rows: &[Row], seconds: f64) -> std::io::Result<()> {
    let mut text = format!("# seconds {seconds:.3}\nstep,{}\n", COLUMNS.join(","));
    for row in rows {
        let v: Vec<String> = values(row).iter().map(|x| format!("{x}")).collect();
        let _ = writeln!(text, "{},{}", row.step, v.join(","));
    }
    let path = curve_path(out, run);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// A finished run's curve (`[step][column]`) and seconds, or `None` when the run has not finished
/// (no file, or one of another length).
pub fn read_curve(out: &Path, run: &Run) -> Option<(Vec<Vec<f64>>, f64)> {
    let text = std::fs::read_to_string(curve_path(out, run)).ok()?;
    let mut lines = text.lines();
    let seconds = lines.next()?.strip_prefix("# seconds ")?.parse().ok()?;
    lines.next()?;
    let rows: Option<Vec<Vec<f64>>> = lines
        .map(|line| {
            let v: Option<Vec<f64>> = line.split(',').skip(1).map(|x| x.parse().ok()).collect();
            v.filter(|v| v.len() == COLUMNS.len())
        })
        .collect();
    rows.filter(|r| r.len() == run.steps)
        .map(|rows| (rows, seconds))
}

/// One finished run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub run: Run,
    /// `[step][column]`.
    pub curve: Vec<Vec<f64>>,
    pub seconds: f64,
    pub summary: RunSummary,
}

impl RunResult {
    pub fn series(&self, column_name: &str) -> Vec<f64> {
        let c = column(column_name);
        self.curve.iter().map(|row| row[c]).collect()
    }
}

/// Every run of the grid, finished.
pub struct Results {
    pub runs: Vec<RunResult>,
}

/// A group of runs compared in the summary: one objective (with its SAPO temperatures) in one
/// setting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub setting: Setting,
    /// A SAPO temperature pair other than the paper's (ordered after the objectives).
    pub variant: bool,
    pub objective: Objective,
    /// SAPO's temperatures ×100, as integers (ordered, hashable).
    pub taus: (i64, i64),
    pub label: String,
}

impl Key {
    fn of(run: &Run) -> Key {
        let taus = match run.objective {
            Objective::Sapo | Objective::SapoSeq => (
                (run.taus.0 * 100.0).round() as i64,
                (run.taus.1 * 100.0).round() as i64,
            ),
            _ => (0, 0),
        };
        let d = sapo::Sapo::default();
        Key {
            setting: run.setting,
            variant: run.taus != (d.tau_pos, d.tau_neg),
            objective: run.objective,
            taus,
            label: run.label(),
        }
    }
}

/// A deterministic seed for the bootstrap of one group and metric.
fn seed_of(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A paired comparison with SAPO: `(pairs, mean difference, its interval, wins, losses, sign-test
/// p)`.
pub type Paired = (usize, f64, (f64, f64), usize, usize, f64);

/// Every group's statistics, per metric.
pub type Stats = Vec<(Key, &'static str, Stat)>;

/// What `summary.csv` says of one group and metric.
#[derive(Debug, Clone)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub ci: (f64, f64),
    pub collapsed: usize,
    /// Paired with SAPO (default temperatures) on the same seeds: `(pairs, mean difference, its
    /// interval, wins, losses, sign-test p)`; `None` for SAPO itself.
    pub paired: Option<Paired>,
}

pub const METRICS: [&str; 2] = ["final_reward", "area"];

fn metric(r: &RunResult, name: &str) -> f64 {
    match name {
        "final_reward" => r.summary.final_reward,
        _ => r.summary.area,
    }
}

/// The `tau_pos`, `tau_neg` columns: SAPO's temperatures for both SAPO forms, empty otherwise.
fn taus_columns(objective: Objective, taus: (f64, f64)) -> (String, String) {
    match objective {
        Objective::Sapo | Objective::SapoSeq => (taus.0.to_string(), taus.1.to_string()),
        _ => (String::new(), String::new()),
    }
}

fn opt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.6}")
    } else {
        String::new()
    }
}

impl Results {
    pub fn read(out: &Path, runs: &[Run]) -> AnyResult<Results> {
        let mut results = Vec::with_capacity(runs.len());
        for run in runs {
            let (curve, seconds) =
                read_curve(out, run).ok_or_else(|| format!("run {} has not finished", run.id()))?;
            let reward: Vec<f64> = curve.iter().map(|r| r[column("reward_mean")]).collect();
            let kl: Vec<f64> = curve.iter().map(|r| r[column("approx_kl")]).collect();
            results.push(RunResult {
                run: *run,
                summary: stats::summarize(&reward, &kl),
                curve,
                seconds,
            });
        }
        Ok(Results { runs: results })
    }

    /// The runs by group, in grid order within a group (seed order).
    pub fn groups(&self) -> BTreeMap<Key, Vec<&RunResult>> {
        let mut groups: BTreeMap<Key, Vec<&RunResult>> = BTreeMap::new();
        for r in &self.runs {
            groups.entry(Key::of(&r.run)).or_default().push(r);
        }
        groups
    }

    /// Per group and metric: the statistics of `summary.csv`, `summary.md` and the final-reward
    /// figure (computed once: the bootstrap is the study's costliest table).
    pub fn stats(&self) -> Stats {
        let groups = self.groups();
        let mut out = Vec::new();
        for (key, runs) in &groups {
            let reference = groups
                .iter()
                .find(|(k, r)| k.setting == key.setting && r[0].run.is_reference())
                .map(|(_, r)| r);
            for name in METRICS {
                let values: Vec<f64> = runs.iter().map(|r| metric(r, name)).collect();
                let tag = format!("{}/{}/{name}", key.setting.name(), key.label);
                let paired = reference
                    .filter(|_| !runs[0].run.is_reference())
                    .map(|reference| {
                        let diffs: Vec<f64> = runs
                            .iter()
                            .filter_map(|r| {
                                let other = reference.iter().find(|x| x.run.seed == r.run.seed)?;
                                Some(metric(r, name) - metric(other, name))
                            })
                            .collect();
                        let (wins, losses, p) = stats::sign_test(&diffs);
                        let ci = stats::bootstrap_ci(&diffs, seed_of(&format!("{tag}/paired")));
                        (diffs.len(), stats::mean(&diffs), ci, wins, losses, p)
                    });
                out.push((
                    key.clone(),
                    name,
                    Stat {
                        n: values.len(),
                        mean: stats::mean(&values),
                        std: stats::std(&values),
                        ci: stats::bootstrap_ci(&values, seed_of(&tag)),
                        collapsed: runs.iter().filter(|r| r.summary.collapsed).count(),
                        paired,
                    },
                ));
            }
        }
        out
    }

    /// Writes the tables; returns `summary.md`'s text.
    pub fn write(&self, out: &Path, stats: &Stats) -> std::io::Result<String> {
        std::fs::write(out.join("runs.csv"), self.runs_csv())?;
        std::fs::write(out.join("curves.csv"), self.curves_csv())?;
        std::fs::write(out.join("mechanism.csv"), self.mechanism_csv())?;
        std::fs::write(out.join("summary.csv"), summary_csv(stats))?;
        let markdown = summary_md(stats);
        std::fs::write(out.join("summary.md"), &markdown)?;
        Ok(markdown)
    }

    fn runs_csv(&self) -> String {
        let mut text = String::from(
            "objective,setting,seed,tau_pos,tau_neg,steps,final_reward,area,first_step_05,\
             peak_reward,collapsed,final_approx_kl,seconds\n",
        );
        for r in &self.runs {
            let (tp, tn) = taus_columns(r.run.objective, r.run.taus);
            let s = &r.summary;
            let _ = writeln!(
                text,
                "{},{},{},{tp},{tn},{},{:.6},{:.6},{},{:.6},{},{:.6},{:.1}",
                r.run.objective.name(),
                r.run.setting.name(),
                r.run.seed,
                r.run.steps,
                s.final_reward,
                s.area,
                s.first_step_05.map_or(String::new(), |x| x.to_string()),
                s.peak_reward,
                s.collapsed as u8,
                s.final_approx_kl,
                r.seconds
            );
        }
        text
    }

    fn curves_csv(&self) -> String {
        let mut text = format!(
            "objective,setting,seed,tau_pos,tau_neg,step,{}\n",
            COLUMNS.join(",")
        );
        for r in &self.runs {
            let (tp, tn) = taus_columns(r.run.objective, r.run.taus);
            for (step, row) in r.curve.iter().enumerate() {
                let v: Vec<String> = row.iter().map(|x| opt(*x)).collect();
                let _ = writeln!(
                    text,
                    "{},{},{},{tp},{tn},{step},{}",
                    r.run.objective.name(),
                    r.run.setting.name(),
                    r.run.seed,
                    v.join(",")
                );
            }
        }
        text
    }

    /// The mechanism columns averaged over every update of every seed, per group.
    pub fn mechanism(&self) -> Vec<(Key, Vec<f64>)> {
        const MECHANISM: [&str; 7] = [
            "mean_weight",
            "active_token_share",
            "silenced_sequence_share",
            "off_policy_sequence_share",
            "bystander_active_share",
            "log_ratio_p01",
            "log_ratio_p99",
        ];
        self.groups()
            .into_iter()
            .map(|(key, runs)| {
                let means = MECHANISM
                    .iter()
                    .map(|name| {
                        let v: Vec<f64> = runs
                            .iter()
                            .flat_map(|r| r.series(name))
                            .filter(|x| x.is_finite())
                            .collect();
                        if v.is_empty() {
                            f64::NAN
                        } else {
                            stats::mean(&v)
                        }
                    })
                    .collect();
                (key, means)
            })
            .collect()
    }

    fn mechanism_csv(&self) -> String {
        let mut text = String::from(
            "setting,objective,tau_pos,tau_neg,mean_weight,active_token_share,\
             silenced_sequence_share,off_policy_sequence_share,bystander_active_share,\
             log_ratio_p01,log_ratio_p99\n",
        );
        for (key, means) in self.mechanism() {
            let (tp, tn) = key_taus(&key);
            let v: Vec<String> = means.iter().map(|x| opt(*x)).collect();
            let _ = writeln!(
                text,
                "{},{},{tp},{tn},{}",
                key.setting.name(),
                key.objective.name(),
                v.join(",")
            );
        }
        text
    }
}

fn key_taus(key: &Key) -> (String, String) {
    let hundredths = |t: i64| t as f64 / 100.0;
    taus_columns(
        key.objective,
        (hundredths(key.taus.0), hundredths(key.taus.1)),
    )
}

fn summary_csv(stats: &Stats) -> String {
    let mut text = String::from(
        "setting,objective,tau_pos,tau_neg,metric,n,mean,std,ci_low,ci_high,collapsed,\
         pairs,diff_vs_sapo,diff_ci_low,diff_ci_high,wins,losses,sign_p\n",
    );
    for (key, metric, s) in stats {
        let (tp, tn) = key_taus(key);
        let paired = match s.paired {
            Some((pairs, diff, (lo, hi), wins, losses, p)) => {
                format!("{pairs},{diff:.6},{lo:.6},{hi:.6},{wins},{losses},{p:.4}")
            }
            None => ",,,,,,".to_string(),
        };
        let _ = writeln!(
            text,
            "{},{},{tp},{tn},{metric},{},{:.6},{:.6},{:.6},{:.6},{},{paired}",
            key.setting.name(),
            key.objective.name(),
            s.n,
            s.mean,
            s.std,
            s.ci.0,
            s.ci.1,
            s.collapsed,
        );
    }
    text
}

/// The final-reward table per setting, as Markdown (for the README).
fn summary_md(stats: &Stats) -> String {
    let mut text = String::new();
    for setting in Setting::ALL {
        let rows: Vec<_> = stats
            .iter()
            .filter(|(k, m, _)| k.setting == setting && *m == "final_reward")
            .collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            text,
            "\n**{}** — final reward (mean of the last 10 % of steps)\n\n\
             | objective | seeds | mean [95 % CI] | − SAPO, paired [95 % CI] | wins/losses | sign p | collapsed |\n\
             |---|---|---|---|---|---|---|",
            setting.name()
        );
        for (key, _, s) in rows {
            let paired = match s.paired {
                Some((_, d, (lo, hi), w, l, p)) => {
                    format!("{d:+.3} [{lo:+.3}, {hi:+.3}] | {w}/{l} | {p:.3}")
                }
                None => "— | — | —".to_string(),
            };
            let _ = writeln!(
                text,
                "| {} | {} | {:.3} [{:.3}, {:.3}] | {paired} | {} |",
                key.label, s.n, s.mean, s.ci.0, s.ci.1, s.collapsed
            );
        }
    }
    text
}
