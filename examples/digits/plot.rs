//! `curves.png`: mean reward per step, and approx KL per step, one line per objective.

use std::path::Path;

use plotters::prelude::*;

use crate::Row;

const COLORS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

type Series<'a> = (&'a str, &'a [Row]);

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    runs: &[Series],
    title: &str,
    value: fn(&Row) -> f64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let steps = runs.iter().map(|(_, r)| r.len()).max().unwrap_or(1).max(2);
    let values = runs.iter().flat_map(|(_, r)| r.iter().map(value));
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
    for (i, (name, rows)) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.step as f64, value(r))),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
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
    panel(&left, runs, "mean reward", |r| r.reward_mean)?;
    panel(&right, runs, "approx KL (old → current policy)", |r| {
        r.approx_kl
    })?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
