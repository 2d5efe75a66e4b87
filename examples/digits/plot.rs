//! `curves.png`: mean reward per step (faint) with its 25-step moving average (bold), and the
//! moving average of approx KL, one color per objective.

use std::path::Path;

use plotters::prelude::*;

use crate::series::moving_average;
use crate::train::Row;

const COLORS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

type Series<'a> = (&'a str, &'a [Row]);

const WINDOW: usize = 25;

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    runs: &[Series],
    title: &str,
    value: fn(&Row) -> f64,
    raw: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let steps = runs.iter().map(|(_, r)| r.len()).max().unwrap_or(1).max(2);
    let smoothed: Vec<Vec<f64>> = runs
        .iter()
        .map(|(_, rows)| moving_average(&rows.iter().map(value).collect::<Vec<_>>(), WINDOW))
        .collect();
    let raw_values = runs
        .iter()
        .filter(|_| raw)
        .flat_map(|(_, r)| r.iter().map(value));
    let values = raw_values.chain(smoothed.iter().flatten().copied());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let pad = 0.05 * (hi - lo);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(steps - 1) as f64, (lo - pad)..(hi + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, ((name, rows), smooth)) in runs.iter().zip(&smoothed).enumerate() {
        let color = COLORS[i % COLORS.len()];
        if raw {
            let points = rows.iter().map(|r| (r.step as f64, value(r)));
            chart
                .draw_series(LineSeries::new(points, color.mix(0.25)))
                .map_err(|e| e.to_string())?;
        }
        let points = rows.iter().zip(smooth).map(|(r, v)| (r.step as f64, *v));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(3)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

pub fn curves(
    path: &Path,
    runs: &[Series],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = BitMapBackend::new(path, (1400, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(700);
    let reward_title = "mean reward (25-step average in bold)";
    panel(&left, runs, reward_title, |r| r.reward_mean, true)?;
    let kl_title = "approx KL, old → current policy (25-step average)";
    panel(&right, runs, kl_title, |r| r.approx_kl, false)?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
