//! The training curve as a self-contained SVG: training loss and the evaluation metric against
//! the step, read back from `metrics.jsonl`.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};

const WIDTH: f64 = 720.0;
const PANEL: f64 = 220.0;
const MARGIN: f64 = 50.0;

/// Draws `training_curve.svg` from a metrics log.
pub fn write_curve(metrics: &Path, svg: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut loss = Vec::new();
    let mut eval = Vec::new();
    let mut eval_name = "metric";
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            loss.push((step, l));
        }
        if let Some(m) = v["eval"].as_object() {
            if let Some(p) = m.get("primary").and_then(|p| p.as_f64()) {
                eval_name = if m.get("average_precision").is_some_and(|a| !a.is_null()) {
                    "average precision"
                } else {
                    "Spearman"
                };
                eval.push((step, p));
            }
        }
    }
    let mut out = String::new();
    let height = 2.0 * PANEL + 3.0 * MARGIN;
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
    );
    panel(&mut out, &loss, "training loss", MARGIN, "steelblue");
    panel(
        &mut out,
        &eval,
        &format!("evaluation {eval_name}"),
        2.0 * MARGIN + PANEL,
        "firebrick",
    );
    out.push_str("</svg>\n");
    std::fs::write(svg, out).map_err(|e| Error::io(svg, e))
}

fn panel(out: &mut String, points: &[(f64, f64)], title: &str, top: f64, color: &str) {
    let (left, right) = (MARGIN + 20.0, WIDTH - MARGIN);
    let bottom = top + PANEL;
    let _ = write!(
        out,
        r#"<text x="{left}" y="{}" font-weight="bold">{title}</text>"#,
        top - 8.0
    );
    let _ = write!(
        out,
        r#"<rect x="{left}" y="{top}" width="{}" height="{PANEL}" fill="none" stroke="gray"/>"#,
        right - left
    );
    if points.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" fill="gray">no data</text>"#,
            left + 10.0,
            top + 20.0
        );
        return;
    }
    let (x_min, x_max) = bounds(points.iter().map(|p| p.0));
    let (y_min, y_max) = bounds(points.iter().map(|p| p.1));
    let x = |v: f64| left + (v - x_min) / (x_max - x_min) * (right - left);
    let y = |v: f64| bottom - (v - y_min) / (y_max - y_min) * PANEL;
    let path: Vec<String> = points
        .iter()
        .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
        .collect();
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
        path.join(" ")
    );
    for (a, b) in points.iter().filter(|_| points.len() <= 50) {
        let _ = write!(
            out,
            r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{color}"/>"#,
            x(*a),
            y(*b)
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="end">{y_max:.4}</text>"#,
        left - 4.0,
        top + 10.0
    );
    let _ = write!(
        out,
        r#"<text x="{}" y="{bottom}" text-anchor="end">{y_min:.4}</text>"#,
        left - 4.0
    );
    let _ = write!(
        out,
        r#"<text x="{left}" y="{}">step {x_min:.0}</text>"#,
        bottom + 14.0
    );
    let _ = write!(
        out,
        r#"<text x="{right}" y="{}" text-anchor="end">step {x_max:.0}</text>"#,
        bottom + 14.0
    );
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}
