//! `curves.png`: per RL step and objective, the rollouts' mean reward and mean completion length
//! (faint) with their 10-step moving averages (bold).

use std::path::Path;

use plotters::prelude::*;

use crate::train::Row;
use crate::AnyResult;

const WINDOW: usize = 10;

fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    (0..values.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            values[from..=i].iter().sum::<f64>() / (i + 1 - from) as f64
        })
        .collect()
}

const COLORS: [RGBColor; 3] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    runs: &[(&str, &[Row])],
    title: &str,
    value: fn(&Row) -> f64,
) -> AnyResult<()> {
    let hi = runs
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(value))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.05;
    let steps = runs.iter().map(|(_, r)| r.len()).max().unwrap_or(0).max(2) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..steps, 0.0..hi)?;
    chart.configure_mesh().x_desc("RL step").draw()?;
    for (k, (name, rows)) in runs.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let values: Vec<f64> = rows.iter().map(value).collect();
        let smoothed = moving_average(&values, WINDOW);
        chart.draw_series(LineSeries::new(
            values.iter().enumerate().map(|(i, v)| (i as f64, *v)),
            color.mix(0.3),
        ))?;
        chart
            .draw_series(LineSeries::new(
                smoothed.iter().enumerate().map(|(i, v)| (i as f64, *v)),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// One line per run (`(objective, rows)`).
pub fn curves(path: &Path, runs: &[(&str, &[Row])]) -> AnyResult<()> {
    let root = BitMapBackend::new(path, (1000, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, 2));
    panel(&areas[0], runs, "mean reward of the rollouts", |r| {
        r.reward_mean
    })?;
    panel(&areas[1], runs, "mean completion length (tokens)", |r| {
        r.completion_length
    })?;
    root.present()?;
    Ok(())
}
