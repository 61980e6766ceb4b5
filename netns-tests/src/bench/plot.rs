//! The plots (plotters, SVG and PNG): latency and connection rate against the number of
//! Services per backend with the direct line, and sync time against the number of Services
//! with the loader's baseline.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{Report, ScaleResult};
use super::stats::Spread;

/// Where the PNG renderer finds its font (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| {
            format!("the plots need the font {FONT} (apt-get install fonts-dejavu-core): {e}")
        })?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
            .map_err(|_| format!("{FONT} is not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// One line: (number of Services, figure) points.
struct Line {
    label: String,
    color: usize,
    dashed: bool,
    points: Vec<(f64, Spread)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    lines: &[Line],
    log_y: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let xs: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().flat_map(|p| [p.1.min, p.1.max]))
        .collect();
    let x_max = xs.iter().copied().fold(1.0, f64::max) * 2.0;
    let y_max = ys.iter().copied().fold(0.0, f64::max).max(1e-9);
    let y_min = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    let x_range = (0.5f64..x_max).log_scale();
    if log_y {
        let lo = (y_min.max(1e-6)) / 2.0;
        let mut chart = builder
            .build_cartesian_2d(x_range, (lo..y_max * 4.0).log_scale())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fill(&mut chart, y_desc, lines)?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(x_range, 0.0..y_max * 1.15)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fill(&mut chart, y_desc, lines)?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Axes, every line and the legend, whatever the y axis's scale.
fn fill<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    y_desc: &str,
    lines: &[Line],
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    DB::ErrorType: 'static,
{
    let format_x = |x: &f64| {
        if *x >= 1.0 {
            super::report::count(x.round() as usize)
        } else {
            super::report::number(*x)
        }
    };
    chart
        .configure_mesh()
        .x_desc("Services")
        .y_desc(y_desc)
        .x_label_formatter(&format_x)
        .y_label_formatter(&|y| super::report::number(*y))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for line in lines {
        series(chart, line)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn series<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    line: &Line,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    DB::ErrorType: 'static,
{
    let color = COLORS[line.color % COLORS.len()];
    let style = color.stroke_width(2);
    let points: Vec<(f64, f64)> = line.points.iter().map(|(x, s)| (*x, s.median)).collect();
    let dashed = line.dashed;
    let anno = if line.dashed {
        chart
            .draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    anno.label(line.label.clone()).legend(move |(x, y)| {
        // The legend's sample is dashed like its line: three pieces, gapped when dashed.
        let gap = if dashed { 4 } else { 0 };
        let piece = |from: i32| {
            PathElement::new(
                vec![(from, 0), (from + 8 - gap / 2, 0)],
                color.stroke_width(2),
            )
        };
        EmptyElement::at((x, y)) + piece(0) + piece(8 + gap / 2) + piece(16 + gap)
    });
    // Medians as dots, the runs' range as error bars.
    chart
        .draw_series(line.points.iter().map(|(x, s)| {
            ErrorBar::new_vertical(*x, s.min, s.median, s.max, color.stroke_width(1), 8)
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

fn render(
    dir: &Path,
    stem: &str,
    title: &str,
    y_desc: &str,
    lines: &[Line],
    log_y: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    let size = (960, 560);
    let svg = dir.join(format!("{stem}.svg"));
    let png = dir.join(format!("{stem}.png"));
    draw(
        SVGBackend::new(&svg, size).into_drawing_area(),
        title,
        y_desc,
        lines,
        log_y,
    )
    .with_context(|| format!("drawing {}", svg.display()))?;
    draw(
        BitMapBackend::new(&png, size).into_drawing_area(),
        title,
        y_desc,
        lines,
        log_y,
    )
    .with_context(|| format!("drawing {}", png.display()))?;
    Ok(vec![svg, png])
}

/// The Service target a plot follows: the last one in the table (linear walks cost most
/// there), the only one at 1 Service.
fn deepest(sc: &ScaleResult) -> Option<&super::report::TargetResult> {
    sc.target("last")
        .or_else(|| sc.target("middle"))
        .or_else(|| sc.target("first"))
}

fn data_lines(report: &Report, key: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for (i, b) in report
        .backends
        .iter()
        .filter(|b| b.not_run.is_none())
        .enumerate()
    {
        let pick = |direct: bool| -> Vec<(f64, Spread)> {
            b.scales
                .iter()
                .filter_map(|sc| {
                    let t = if direct {
                        sc.target("direct")
                    } else {
                        deepest(sc)
                    }?;
                    Some((sc.services as f64, t.metrics.get(key)?.clone()))
                })
                .collect()
        };
        lines.push(Line {
            label: format!("{} (last Service)", b.backend),
            color: i,
            dashed: false,
            points: pick(false),
        });
        lines.push(Line {
            label: format!("{} direct to the pod", b.backend),
            color: i,
            dashed: true,
            points: pick(true),
        });
    }
    lines
}

fn sync_lines(report: &Report) -> Vec<Line> {
    let mut lines = Vec::new();
    for (i, b) in report
        .backends
        .iter()
        .filter(|b| b.not_run.is_none())
        .enumerate()
    {
        let pick = |key: &str| -> Vec<(f64, Spread)> {
            b.scales
                .iter()
                .filter_map(|sc| Some((sc.services as f64, sc.control.get(key)?.clone())))
                .collect()
        };
        lines.push(Line {
            label: format!("{} full sync", b.backend),
            color: i,
            dashed: false,
            points: pick("full_sync_ms"),
        });
        lines.push(Line {
            label: format!("{} loader alone", b.backend),
            color: i,
            dashed: true,
            points: pick("loader_ms"),
        });
    }
    lines
}

/// Writes latency, conn-rate and sync plots (SVG and PNG) into `dir`; returns their paths.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    register_font()?;
    let mut written = Vec::new();
    written.extend(render(
        dir,
        "latency",
        "New-connection latency p50 through a ClusterIP",
        "p50 (µs)",
        &data_lines(report, "newconn_p50_us"),
        false,
    )?);
    written.extend(render(
        dir,
        "conn-rate",
        "New connections per second through a ClusterIP",
        "connections/s",
        &data_lines(report, "conns_per_s"),
        false,
    )?);
    written.extend(render(
        dir,
        "sync",
        "Full sync time, and the loader alone with the same rules",
        "ms (log)",
        &sync_lines(report),
        true,
    )?);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written_as_svg_and_png() {
        if !Path::new(FONT).exists() {
            // The test suite installs the font (cargo xtask test); say so rather than pass.
            panic!("{FONT} is missing: run `cargo xtask deps` (fonts-dejavu-core)");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let written = write_all(&crate::bench::report::tests::sample(), dir.path()).expect("plots");
        assert_eq!(written.len(), 6);
        for path in written {
            let len = std::fs::metadata(&path).expect("written").len();
            assert!(len > 1000, "{} is only {len} bytes", path.display());
        }
        let svg = std::fs::read_to_string(dir.path().join("latency.svg")).expect("svg");
        assert!(
            svg.contains("ebpf (last Service)") || svg.contains("ebpf direct"),
            "legend missing"
        );
    }
}
