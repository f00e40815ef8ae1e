//! `--plot FILE.svg`: the training dashboard of a run, drawn with
//! `plotters` (its SVG backend), one point per epoch: the loss (log scale)
//! and the accuracy, the learning rate, and from the gradient-health
//! monitor, per param, the gradient norm and the update/weight ratio (log
//! scales, with the healthy 1e-3 marked) and, per ReLU, the fraction of
//! dead units. The four debugging cases show at a glance: a gradient norm
//! at the floor is a param no gradient reaches; an update ratio at the
//! floor while its gradient is not is a param that is not updated.

use std::collections::BTreeMap;

use plotters::prelude::*;

/// One epoch's numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochRow {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: Option<f64>,
    /// Held-out loss.
    pub test_loss: Option<f64>,
    /// Held-out accuracy.
    pub test_accuracy: Option<f64>,
    /// The learning rate of the epoch's last step.
    pub lr: f64,
    /// The mean global gradient norm (before clipping).
    pub grad_norm: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
}

/// The smallest value a log-scale panel shows: zeros (no gradient, no
/// update) are drawn on this floor.
const FLOOR: f64 = 1e-12;

/// The update/weight ratio a healthy run keeps, drawn as a reference line.
const HEALTHY_UPDATE: f64 = 1e-3;

/// A series: its name and one point per epoch.
type Series = (String, Vec<(f64, f64)>);

/// Draws the dashboard. `stats` holds, per epoch, the monitor's means by
/// statistic name (`grad_norm.w1`, `update_ratio.w1`, `dead.h`); `layers`
/// names the params drawn per param (the weight matrices: biases start at
/// zero and would crowd the panels), all of them when it is empty.
pub fn svg(
    title: &str,
    rows: &[EpochRow],
    stats: &[BTreeMap<String, f64>],
    layers: &[String],
) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (1200, 1050)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, ("sans-serif", 22))
            .map_err(|e| e.to_string())?;
        let panels = root.split_evenly((3, 2));
        let epoch = |r: &EpochRow| r.epoch as f64;
        let pick = |f: &dyn Fn(&EpochRow) -> Option<f64>| -> Vec<(f64, f64)> {
            rows.iter()
                .filter_map(|r| Some((epoch(r), f(r)?)))
                .collect()
        };
        let loss = vec![
            ("train".to_string(), pick(&|r| Some(r.train_loss))),
            ("test".to_string(), pick(&|r| r.test_loss)),
        ];
        panel(&panels[0], "loss", &loss, Scale::Log, rows.len())?;
        let accuracy = vec![
            (
                "train".to_string(),
                pick(&|r| r.train_accuracy.map(|a| a * 100.0)),
            ),
            (
                "test".to_string(),
                pick(&|r| r.test_accuracy.map(|a| a * 100.0)),
            ),
        ];
        panel(
            &panels[1],
            "accuracy (%)",
            &accuracy,
            Scale::Percent,
            rows.len(),
        )?;
        let lr = vec![("learning rate".to_string(), pick(&|r| Some(r.lr)))];
        panel(&panels[2], "learning rate", &lr, Scale::Linear, rows.len())?;
        let per = |prefix: &str, scale: f64| -> Vec<Series> {
            let mut names: Vec<String> = stats
                .iter()
                .flat_map(|epoch| epoch.keys())
                .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            if prefix != "dead." && !layers.is_empty() {
                names.retain(|n| layers.contains(n));
            }
            names
                .into_iter()
                .map(|name| {
                    let points = stats
                        .iter()
                        .zip(rows)
                        .filter_map(|(epoch, row)| {
                            let value = epoch.get(&format!("{prefix}{name}"))?;
                            Some((row.epoch as f64, value * scale))
                        })
                        .collect();
                    (name, points)
                })
                .collect()
        };
        panel(
            &panels[3],
            "gradient norm per weight matrix (floor: no gradient)",
            &per("grad_norm.", 1.0),
            Scale::Log,
            rows.len(),
        )?;
        let mut updates = per("update_ratio.", 1.0);
        if !updates.is_empty() {
            let healthy = rows.iter().map(|r| (epoch(r), HEALTHY_UPDATE)).collect();
            updates.push(("healthy 1e-3".to_string(), healthy));
        }
        panel(
            &panels[4],
            "update / weight per step (floor: not updated)",
            &updates,
            Scale::Log,
            rows.len(),
        )?;
        panel(
            &panels[5],
            "dead ReLU units (%)",
            &per("dead.", 100.0),
            Scale::Percent,
            rows.len(),
        )?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// How a panel's vertical axis runs.
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
    Percent,
}

/// One panel: a line per series, with a legend, a grid and ticks.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    series: &[Series],
    scale: Scale,
    epochs: usize,
) -> Result<(), String> {
    let error = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let shown = |v: f64| match scale {
        Scale::Log => v.max(FLOOR),
        _ => v,
    };
    let values: Vec<f64> = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(_, v)| shown(v)))
        .filter(|v| v.is_finite())
        .collect();
    let x_range = 1.0..(epochs.max(2) as f64);
    let x_labels = epochs.clamp(2, 10);
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64);
    if values.is_empty() {
        let mut chart = chart.build_cartesian_2d(x_range, 0.0..1.0).map_err(error)?;
        chart
            .configure_mesh()
            .x_labels(x_labels)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("epoch")
            .y_desc("(nothing recorded)")
            .draw()
            .map_err(error)?;
        return Ok(());
    }
    let lowest = values.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // (The reference line is black; the series take the palette.)
    let colors = |i: usize| {
        if series[i].0.starts_with("healthy") {
            BLACK.to_rgba()
        } else {
            Palette99::pick(i).to_rgba()
        }
    };
    match scale {
        Scale::Log => {
            // Whole decades, so that every panel has labelled ticks.
            let lo = 10f64.powf(lowest.log10().floor()) * 0.999;
            let hi = 10f64.powf(highest.log10().ceil()).max(lo * 10.0);
            let mut chart = chart
                .build_cartesian_2d(x_range, (lo..hi).log_scale())
                .map_err(error)?;
            chart
                .configure_mesh()
                .x_labels(x_labels)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .x_desc("epoch")
                .y_labels(8)
                .y_label_formatter(&|v| readable(*v))
                .draw()
                .map_err(error)?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = colors(i);
                let points: Vec<(f64, f64)> = points.iter().map(|&(x, v)| (x, shown(v))).collect();
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(error)?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
            legend(&mut chart).map_err(error)?;
        }
        Scale::Linear | Scale::Percent => {
            let (lo, hi) = if scale == Scale::Percent {
                (0.0, 100.0)
            } else if highest - lowest <= 1e-9 * highest.abs() {
                // A flat series (a constant learning rate): centred.
                let half = highest.abs().max(1e-12) * 0.5;
                (lowest - half, highest + half)
            } else {
                let pad = (highest - lowest) * 0.05;
                (lowest - pad, highest + pad)
            };
            let mut chart = chart.build_cartesian_2d(x_range, lo..hi).map_err(error)?;
            chart
                .configure_mesh()
                .x_labels(x_labels)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .x_desc("epoch")
                .y_label_formatter(&|v| readable(*v))
                .draw()
                .map_err(error)?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = colors(i);
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(error)?
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
            legend(&mut chart).map_err(error)?;
        }
    }
    Ok(())
}

/// A tick label: plain for ordinary magnitudes, scientific otherwise.
fn readable(v: f64) -> String {
    let magnitude = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-2..1e4).contains(&magnitude) {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.1e}")
    }
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
}
