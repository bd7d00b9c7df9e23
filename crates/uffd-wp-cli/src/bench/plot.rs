//! `uffd-wp bench plot`: an SVG of the benchmark ratios against the goals, from the
//! `--json` outputs of `bench snapshot`, `bench track` and `bench protect` (plotters, SVG
//! backend only: text is left to the viewer's fonts).

use std::path::PathBuf;

use plotters::coord::ranged1d::SegmentedCoord;
use plotters::coord::types::RangedCoordi32;
use plotters::prelude::*;
use serde_json::Value;

use crate::CliError;

/// Arguments of `uffd-wp bench plot`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A `--json` output of `bench snapshot`, `bench track` or `bench protect` (repeatable).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(long)]
    out: PathBuf,
}

/// Which way a goal points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// The ratio must be at most the goal.
    AtMost,
    /// The ratio must be at least the goal.
    AtLeast,
}

/// One bar: a measured ratio and its goal.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    label: String,
    value: f64,
    goal: f64,
    dir: Dir,
}

impl Row {
    fn met(&self) -> bool {
        match self.dir {
            Dir::AtMost => self.value <= self.goal,
            Dir::AtLeast => self.value >= self.goal,
        }
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

/// The rows one benchmark output contributes.
fn rows_of(v: &Value) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut push = |label: String, value: Option<f64>, goal: Option<f64>, dir| {
        if let (Some(value), Some(goal)) = (value, goal) {
            rows.push(Row {
                label,
                value,
                goal,
                dir,
            });
        }
    };
    match v.get("bench").and_then(Value::as_str) {
        Some("snapshot") => {
            for k in ["4k", "thp"] {
                push(
                    format!("snapshot pause / fork() ({k})"),
                    num(v, &[k, "pause_ratio_vs_fork"]),
                    num(v, &["goals", "pause_ratio_vs_fork", k]),
                    Dir::AtMost,
                );
            }
            for k in ["4k", "thp"] {
                push(
                    format!("snapshot copy / memcpy ({k})"),
                    num(v, &[k, "copy_ratio_vs_memcpy"]),
                    num(v, &["goals", "copy_ratio_vs_memcpy"]),
                    Dir::AtLeast,
                );
            }
            for (key, what) in [
                ("ratio_same_cpu", "same CPU"),
                ("ratio_other_cpu", "other CPU"),
            ] {
                push(
                    format!("WP fault, engine / bare handler ({what})"),
                    num(v, &["faults", key]),
                    num(v, &["goals", "fault_ratio_vs_raw"]),
                    Dir::AtMost,
                );
            }
        }
        Some("track") => {
            for k in ["4k", "thp"] {
                push(
                    format!("dirty epoch, mprotect / uffd ({k})"),
                    num(v, &[k, "epoch_ratio_vs_mprotect"]),
                    num(v, &["goals", "epoch_ratio_vs_mprotect"]),
                    Dir::AtLeast,
                );
            }
        }
        Some("protect") => {
            for k in ["4k", "thp"] {
                push(
                    format!("exact / raw write-protect ({k})"),
                    num(v, &[k, "ratio"]),
                    num(v, &["goals", "ratio"]),
                    Dir::AtMost,
                );
                push(
                    format!("exact / raw, failing half-way ({k})"),
                    num(v, &[k, "partial_ratio"]),
                    num(v, &["goals", "partial_ratio"]),
                    Dir::AtMost,
                );
            }
        }
        other => return Err(format!("not a bench output (\"bench\": {other:?})")),
    }
    Ok(rows)
}

/// Powers of ten around every value and goal (and 1).
fn x_range(rows: &[Row]) -> (f64, f64) {
    let (mut lo, mut hi) = (1.0f64, 1.0f64);
    for r in rows {
        lo = lo.min(r.value).min(r.goal);
        hi = hi.max(r.value).max(r.goal);
    }
    (
        10f64.powf((lo.log10() - 0.15).floor()),
        10f64.powf((hi.log10() + 0.15).ceil()),
    )
}

fn fmt_ratio(x: f64) -> String {
    if x >= 10.0 {
        format!("{x:.1}x")
    } else if x >= 0.1 {
        format!("{x:.2}x")
    } else {
        format!("{x:.3}x")
    }
}

/// The chart the rows are drawn in: ratios on a log scale across, one segment per row down.
type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, SegmentedCoord<RangedCoordi32>>>;

/// What drawing into the SVG can fail with.
type DrawError = DrawingAreaErrorKind<std::io::Error>;

/// Draws the rows into an SVG file.
fn draw(rows: &[Row], out: &std::path::Path) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", out.display());
    let n = rows.len();
    let height = 90 + 34 * n as u32;
    let root = SVGBackend::new(out, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (lo, hi) = x_range(rows);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "uffd-wp: measured ratios against the issue's goals (log scale; | = goal)",
            ("sans-serif", 18),
        )
        .margin(12)
        .margin_right(250)
        .x_label_area_size(36)
        .y_label_area_size(300)
        .build_cartesian_2d((lo..hi).log_scale(), (0..n as i32 - 1).into_segmented())
        .map_err(|x| e(&x))?;
    draw_axes(&mut chart, rows).map_err(|x| e(&x))?;
    for (i, r) in rows.iter().rev().enumerate() {
        let i = i as i32;
        draw_bar(&mut chart, i, r).map_err(|x| e(&x))?;
        // In a column right of the plot, level with the bar.
        let (px, py) = chart.backend_coord(&(hi, SegmentValue::CenterOf(i)));
        root.draw(&Text::new(
            row_text(r),
            (px + 10, py - 7),
            ("sans-serif", 13).into_font().color(&BLACK),
        ))
        .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The grid, the rows' labels (first row at the top) and the parity line.
fn draw_axes(chart: &mut Chart<'_, '_>, rows: &[Row]) -> Result<(), DrawError> {
    let labels: Vec<String> = rows.iter().rev().map(|r| r.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("ratio (log scale)")
        .x_label_formatter(&|x| fmt_ratio(*x))
        .label_style(("sans-serif", 13))
        .draw()?;
    // Parity.
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
        BLACK.mix(0.3).stroke_width(1),
    )))?;
    Ok(())
}

/// Row `i` (counted from the bottom): a bar from parity to the value, green when the goal is
/// met and red otherwise, and a mark at the goal.
fn draw_bar(chart: &mut Chart<'_, '_>, i: i32, r: &Row) -> Result<(), DrawError> {
    let green = RGBColor(46, 160, 67);
    let red = RGBColor(207, 34, 46);
    let color = if r.met() { green } else { red };
    let (a, b) = if r.value < 1.0 {
        (r.value, 1.0)
    } else {
        (1.0, r.value)
    };
    let mut bar = Rectangle::new(
        [(a, SegmentValue::Exact(i)), (b, SegmentValue::Exact(i + 1))],
        color.mix(0.75).filled(),
    );
    bar.set_margin(7, 7, 0, 0);
    chart.draw_series(std::iter::once(bar))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![
            (r.goal, SegmentValue::Exact(i)),
            (r.goal, SegmentValue::Exact(i + 1)),
        ],
        BLACK.stroke_width(3),
    )))?;
    Ok(())
}

/// The figures printed beside a row's bar: its value, its goal, and whether it missed.
fn row_text(r: &Row) -> String {
    format!(
        "{}  (goal {} {}){}",
        fmt_ratio(r.value),
        if r.dir == Dir::AtMost { "<=" } else { ">=" },
        fmt_ratio(r.goal),
        if r.met() { "" } else { "  MISSED" }
    )
}

/// Runs it.
pub fn run(a: &Args) -> Result<(), CliError> {
    let mut rows = Vec::new();
    for p in &a.input {
        let text = std::fs::read_to_string(p).map_err(|source| CliError::Io {
            operation: "reading",
            path: p.display().to_string(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| CliError::Usage(format!("{}: not JSON: {e}", p.display())))?;
        rows.extend(rows_of(&v).map_err(|e| CliError::Usage(format!("{}: {e}", p.display())))?);
    }
    if rows.is_empty() {
        return Err(CliError::Usage("no ratio found in the inputs".into()));
    }
    draw(&rows, &a.out).map_err(CliError::Usage)?;
    println!("wrote {} ({} ratios)", a.out.display(), rows.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_from_each_bench() {
        let snap: Value = serde_json::json!({
            "bench": "snapshot",
            "goals": {"pause_ratio_vs_fork": {"4k": 0.5, "thp": 0.1},
                      "copy_ratio_vs_memcpy": 0.7, "fault_ratio_vs_raw": 1.25},
            "4k": {"pause_ratio_vs_fork": 0.3, "copy_ratio_vs_memcpy": 0.9},
            "thp": {"pause_ratio_vs_fork": 0.2, "copy_ratio_vs_memcpy": 0.5},
            "faults": {"ratio_same_cpu": 1.1, "ratio_other_cpu": 1.4}
        });
        let rows = rows_of(&snap).unwrap();
        assert_eq!(rows.len(), 6);
        let met: Vec<bool> = rows.iter().map(Row::met).collect();
        assert_eq!(met, [true, false, true, false, true, false]);
        let track = serde_json::json!({"bench": "track", "goals": {"epoch_ratio_vs_mprotect": 20.0},
            "4k": {"epoch_ratio_vs_mprotect": 10.8}});
        let rows = rows_of(&track).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].met());
        let protect = serde_json::json!({"bench": "protect", "goals": {"ratio": 1.05, "partial_ratio": 1.5},
            "4k": {"ratio": 1.01, "partial_ratio": 1.2}, "thp": {"ratio": 1.2, "partial_ratio": 1.3}});
        assert_eq!(rows_of(&protect).unwrap().len(), 4);
        assert!(rows_of(&serde_json::json!({"bench": "nope"})).is_err());
    }

    #[test]
    fn writes_an_svg_with_every_label() {
        let rows = vec![
            Row {
                label: "snapshot pause / fork() (4k)".into(),
                value: 0.3,
                goal: 0.5,
                dir: Dir::AtMost,
            },
            Row {
                label: "dirty epoch, mprotect / uffd (4k)".into(),
                value: 10.8,
                goal: 20.0,
                dir: Dir::AtLeast,
            },
        ];
        let dir = std::env::temp_dir().join(format!("uffd-wp-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("t.svg");
        draw(&rows, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("snapshot pause / fork() (4k)"));
        assert!(svg.contains("MISSED"));
        assert_eq!(x_range(&rows), (0.1, 100.0));
    }
}
