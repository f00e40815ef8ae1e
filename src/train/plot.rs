//! `--plot FILE.svg`: the loss and accuracy curves of a run, per epoch, as a
//! small self-contained SVG (no plotting dependency).

use std::fmt::Write;

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

/// Draws the curves: loss on the left, accuracy on the right.
pub fn svg(title: &str, rows: &[EpochRow]) -> String {
    let (width, height) = (880.0, 360.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    let loss_train: Vec<f64> = rows.iter().map(|r| r.train_loss).collect();
    let loss_test: Vec<f64> = rows.iter().filter_map(|r| r.test_loss).collect();
    panel(
        &mut out,
        50.0,
        "loss",
        &[
            ("train", &loss_train, "#1f77b4"),
            ("test", &loss_test, "#d62728"),
        ],
        false,
    );
    let acc_train: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.train_accuracy.map(|a| a * 100.0))
        .collect();
    let acc_test: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.test_accuracy.map(|a| a * 100.0))
        .collect();
    if !acc_train.is_empty() || !acc_test.is_empty() {
        panel(
            &mut out,
            480.0,
            "accuracy (%)",
            &[
                ("train", &acc_train, "#1f77b4"),
                ("test", &acc_test, "#d62728"),
            ],
            true,
        );
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, left: f64, label: &str, series: &[(&str, &[f64], &str)], percent: bool) {
    let (top, w, h) = (40.0, 360.0, 270.0);
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if percent {
        hi = 100.0;
        lo = lo.min(hi - 1.0);
    }
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let n = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(2);
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
        left + w / 2.0,
        top + h + 35.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
        left - 4.0,
        top + 10.0,
        format_tick(hi)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
        left - 4.0,
        top + h,
        format_tick(lo)
    );
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="{}">epoch 1</text>"#,
        top + h + 16.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">epoch {}</text>"#,
        left + w,
        top + h + 16.0,
        n.max(1)
    );
    for (i, (name, data, color)) in series.iter().enumerate() {
        if data.is_empty() {
            continue;
        }
        let points: Vec<String> = data
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| {
                let x = left + w * k as f64 / (n - 1) as f64;
                let y = top + h - h * (v - lo) / (hi - lo);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{color}">{name}</text>"#,
            left + w - 60.0,
            // Loss falls and accuracy rises: keep the legend off the curves.
            if percent { top + h - 30.0 } else { top + 18.0 } + 16.0 * i as f64
        );
    }
}

fn format_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
