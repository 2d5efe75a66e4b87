//! The study's figures: reward curves with 95 % bands per setting (`curves.png`), final reward
//! per objective with intervals (`final_reward.png`), SAPO's temperature grid (`tau_heatmap.png`)
//! and the mechanism over training (`mechanism.png`).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::output::{Results, RunResult, Stats};
use crate::stats;
use crate::train::{AnyResult, Objective};
use crate::{Setting, TAUS};

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A series' mean and the low and high edges of its band, per step.
type Band = (Vec<f64>, Vec<f64>, Vec<f64>);

/// The objectives drawn, in order, each with its colour (SAPO at the paper's temperatures).
const DRAWN: [(Objective, RGBColor); 7] = [
    (Objective::Sapo, RGBColor(214, 39, 40)),
    (Objective::Gspo, RGBColor(31, 119, 180)),
    (Objective::Grpo, RGBColor(44, 160, 44)),
    (Objective::SapoSeq, RGBColor(255, 127, 14)),
    (Objective::Cispo, RGBColor(148, 103, 189)),
    (Objective::Gmpo, RGBColor(140, 86, 75)),
    (Objective::Vespo, RGBColor(127, 127, 127)),
];

/// Smoothing of the curves: a trailing mean over this many steps.
const SMOOTH: usize = 10;

fn err(e: impl std::fmt::Display) -> Box<dyn std::error::Error + Send + Sync> {
    e.to_string().into()
}

/// The runs of `objective` at its default temperatures in `setting`.
fn runs_of(results: &Results, setting: Setting, objective: Objective) -> Vec<&RunResult> {
    let d = sapo::Sapo::default();
    results
        .runs
        .iter()
        .filter(|r| {
            r.run.setting == setting
                && r.run.objective == objective
                && r.run.taus == (d.tau_pos, d.tau_neg)
        })
        .collect()
}

/// Mean over runs of a smoothed column, with its 95 % t-interval: `(mean, low, high)` per step.
fn band(runs: &[&RunResult], column: &str) -> Band {
    let curves: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| smooth_finite(&r.series(column)))
        .collect();
    let steps = curves.iter().map(Vec::len).min().unwrap_or(0);
    let (mut mean, mut lo, mut hi) = (vec![], vec![], vec![]);
    for t in 0..steps {
        let v: Vec<f64> = curves
            .iter()
            .map(|c| c[t])
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            mean.push(f64::NAN);
            lo.push(f64::NAN);
            hi.push(f64::NAN);
            continue;
        }
        let m = stats::mean(&v);
        let half = if v.len() > 1 {
            stats::t95(v.len() - 1) * stats::std(&v) / (v.len() as f64).sqrt()
        } else {
            0.0
        };
        mean.push(m);
        lo.push(m - half);
        hi.push(m + half);
    }
    (mean, lo, hi)
}

/// A trailing mean that skips non-finite values (NaN where a window has none).
fn smooth_finite(values: &[f64]) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let w: Vec<f64> = values[i.saturating_sub(SMOOTH - 1)..=i]
                .iter()
                .copied()
                .filter(|x| x.is_finite())
                .collect();
            if w.is_empty() {
                f64::NAN
            } else {
                stats::mean(&w)
            }
        })
        .collect()
}

/// One panel of lines over steps: each series a mean and an optional band.
fn line_panel(
    area: &Area,
    title: &str,
    series: &[(&str, RGBColor, Band)],
    y_range: Option<(f64, f64)>,
    bands: bool,
) -> AnyResult<()> {
    let steps = series
        .iter()
        .map(|s| s.2 .0.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let finite = series
        .iter()
        .flat_map(|s| s.2 .0.iter().chain(&s.2 .1).chain(&s.2 .2))
        .copied()
        .filter(|x| x.is_finite());
    let (lo, hi) = y_range.unwrap_or_else(|| {
        let (a, b) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
        if a < b {
            let pad = 0.05 * (b - a);
            (a - pad, b + pad)
        } else if a.is_finite() {
            (a - 1.0, a + 1.0)
        } else {
            (0.0, 1.0)
        }
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(steps - 1) as f64, lo..hi)
        .map_err(err)?;
    chart.configure_mesh().x_desc("step").draw().map_err(err)?;
    for (name, color, (mean, low, high)) in series {
        let color = *color;
        if bands {
            let upper = high.iter().enumerate().map(|(t, v)| (t as f64, *v));
            let lower = low.iter().enumerate().rev().map(|(t, v)| (t as f64, *v));
            let polygon: Vec<(f64, f64)> = upper.chain(lower).filter(|p| p.1.is_finite()).collect();
            chart
                .draw_series(std::iter::once(Polygon::new(polygon, color.mix(0.15))))
                .map_err(err)?;
        }
        let points: Vec<(f64, f64)> = mean
            .iter()
            .enumerate()
            .map(|(t, v)| (t as f64, *v))
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn curves(path: &Path, results: &Results) -> AnyResult<()> {
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 3));
    for (setting, area) in Setting::ALL.iter().zip(&panels) {
        let series: Vec<_> = DRAWN
            .iter()
            .filter_map(|(o, c)| {
                let runs = runs_of(results, *setting, *o);
                (!runs.is_empty()).then(|| (o.name(), *c, band(&runs, "reward_mean")))
            })
            .collect();
        let title = format!("{}: mean reward, 95 % band over seeds", setting.name());
        line_panel(area, &title, &series, Some((0.0, 1.0)), true)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn final_reward(path: &Path, results: &Results, stats: &Stats) -> AnyResult<()> {
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 3));
    for (setting, area) in Setting::ALL.iter().zip(&panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{}: final reward, mean and 95 % CI", setting.name()),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..(DRAWN.len() as f64 - 0.5), 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(DRAWN.len())
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                DRAWN
                    .get(i)
                    .map_or(String::new(), |(o, _)| o.name().to_string())
            })
            .draw()
            .map_err(err)?;
        for (i, (objective, color)) in DRAWN.iter().enumerate() {
            let runs = runs_of(results, *setting, *objective);
            if runs.is_empty() {
                continue;
            }
            let x = i as f64;
            let values: Vec<f64> = runs.iter().map(|r| r.summary.final_reward).collect();
            // The interval of summary.csv, not a second bootstrap.
            let Some((_, _, stat)) = stats.iter().find(|(k, metric, _)| {
                k.setting == *setting
                    && k.objective == *objective
                    && !k.variant
                    && *metric == "final_reward"
            }) else {
                continue;
            };
            let ((lo, hi), m) = (stat.ci, stat.mean);
            chart
                .draw_series(values.iter().enumerate().map(|(k, v)| {
                    let jitter = (k as f64 / values.len() as f64 - 0.5) * 0.3;
                    Circle::new((x + jitter, *v), 3, color.mix(0.5).filled())
                }))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, lo), (x, hi)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Circle::new((x, m), 5, color.filled())))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

fn tau_heatmap(path: &Path, results: &Results) -> AnyResult<()> {
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 3));
    for (setting, area) in Setting::ALL.iter().zip(&panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: SAPO final reward by τ_pos (x), τ_neg (y)",
                    setting.name()
                ),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..3f64, 0f64..3f64)
            .map_err(err)?;
        let label = |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-9 {
                TAUS.get(i).map_or(String::new(), |t| t.to_string())
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(7)
            .y_labels(7)
            .x_label_formatter(&label)
            .y_label_formatter(&label)
            .draw()
            .map_err(err)?;
        for (i, tau_pos) in TAUS.iter().enumerate() {
            for (j, tau_neg) in TAUS.iter().enumerate() {
                let values: Vec<f64> = results
                    .runs
                    .iter()
                    .filter(|r| {
                        r.run.setting == *setting
                            && r.run.objective == Objective::Sapo
                            && r.run.taus == (*tau_pos, *tau_neg)
                    })
                    .map(|r| r.summary.final_reward)
                    .collect();
                if values.is_empty() {
                    continue;
                }
                let m = stats::mean(&values);
                let shade = (255.0 * (1.0 - m.clamp(0.0, 1.0))) as u8;
                let (x, y) = (i as f64, j as f64);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        RGBColor(shade, shade, 255).filled(),
                    )))
                    .map_err(err)?;
                let text_color = if m > 0.5 { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("{m:.3} (n={})", values.len()),
                        (x + 0.2, y + 0.55),
                        ("sans-serif", 16).into_font().color(&text_color),
                    )))
                    .map_err(err)?;
            }
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

fn mechanism(path: &Path, results: &Results) -> AnyResult<()> {
    const ROWS: [(&str, &str); 4] = [
        ("active_token_share", "tokens keeping ≥ 0.5 of their weight"),
        ("silenced_sequence_share", "sequences with no gradient"),
        (
            "bystander_active_share",
            "other tokens of off-policy sequences kept",
        ),
        ("log_ratio_p99", "99th percentile of log ρ"),
    ];
    let root = BitMapBackend::new(path, (2200, 1600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((ROWS.len(), Setting::ALL.len()));
    for (r, (column, title)) in ROWS.iter().enumerate() {
        for (c, setting) in Setting::ALL.iter().enumerate() {
            let series: Vec<_> = DRAWN
                .iter()
                .filter_map(|(o, color)| {
                    let runs = runs_of(results, *setting, *o);
                    (!runs.is_empty()).then(|| (o.name(), *color, band(&runs, column)))
                })
                .collect();
            let range = (!column.starts_with("log")).then_some((0.0, 1.0));
            let area = &panels[r * Setting::ALL.len() + c];
            line_panel(
                area,
                &format!("{}: {title}", setting.name()),
                &series,
                range,
                false,
            )?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Draws the four figures into `out`.
pub fn draw(out: &Path, results: &Results, stats: &Stats) -> AnyResult<()> {
    curves(&out.join("curves.png"), results)?;
    final_reward(&out.join("final_reward.png"), results, stats)?;
    tau_heatmap(&out.join("tau_heatmap.png"), results)?;
    mechanism(&out.join("mechanism.png"), results)?;
    Ok(())
}
