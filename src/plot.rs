//! SVG charts (plotters' SVG backend, no fonts or JavaScript needed): line charts for training
//! curves and spectra, heatmaps for subspace similarity.

use plotters::prelude::*;

/// One named series of (x, y) points.
pub struct Series<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
}

fn bounds(series: &[Series<'_>], log_y: bool) -> (f64, f64, f64, f64) {
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0));
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return (0.0, 1.0, if log_y { 1e-3 } else { 0.0 }, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + y0.abs().max(1e-3);
    }
    (x0, x1, y0, y1)
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A line chart as an SVG string; `log_y` plots y on a log scale (spectra, gradient norms).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_y: bool,
) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (x0, x1, y0, y1) = bounds(series, log_y);
        let result = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut builder = ChartBuilder::on(&root);
            builder
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(60);
            if log_y {
                let mut chart =
                    builder.build_cartesian_2d(x0..x1, (y0 * 0.9..y1 * 1.1).log_scale())?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()?;
                for (i, s) in series.iter().enumerate() {
                    let color = PALETTE[i % PALETTE.len()];
                    let pts = s.points.iter().copied().filter(|(_, y)| *y > 0.0);
                    chart
                        .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                        .label(s.label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            } else {
                let pad = (y1 - y0) * 0.05;
                let mut chart = builder.build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
                chart
                    .configure_mesh()
                    .x_desc(x_label)
                    .y_desc(y_label)
                    .draw()?;
                for (i, s) in series.iter().enumerate() {
                    let color = PALETTE[i % PALETTE.len()];
                    chart
                        .draw_series(LineSeries::new(
                            s.points.iter().copied(),
                            color.stroke_width(2),
                        ))?
                        .label(s.label)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                        });
                    if s.points.len() <= 20 {
                        // Few points (a final evaluation): mark them, a lone point draws no line.
                        chart.draw_series(
                            s.points.iter().map(|&p| Circle::new(p, 4, color.filled())),
                        )?;
                    }
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }
            root.present()?;
            Ok(())
        })();
        if let Err(e) = result {
            drop(root);
            return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"640\" height=\"40\"><text x=\"10\" y=\"25\">chart unavailable: {}</text></svg>", escape(&e.to_string()));
        }
    }
    svg
}

/// A heatmap of `values[i][j]` in [0, 1] (row i from the top, white = 0, dark blue = 1),
/// labelled 1-based, as SVG.
pub fn heatmap(
    title: &str,
    row_label: &str,
    col_label: &str,
    values: &ndarray::Array2<f64>,
) -> String {
    let (rows, cols) = values.dim();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 460)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let result = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(44)
                .build_cartesian_2d(0.5f64..cols as f64 + 0.5, (rows as f64 + 0.5)..0.5f64)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc(col_label)
                .y_desc(row_label)
                .draw()?;
            chart.draw_series(values.indexed_iter().map(|((i, j), &v)| {
                let t = v.clamp(0.0, 1.0);
                // white (0) → dark blue (1)
                let color = RGBColor(
                    (255.0 * (1.0 - 0.85 * t)) as u8,
                    (255.0 * (1.0 - 0.7 * t)) as u8,
                    (255.0 * (1.0 - 0.3 * t)) as u8,
                );
                Rectangle::new(
                    [
                        (j as f64 + 0.5, i as f64 + 0.5),
                        (j as f64 + 1.5, i as f64 + 1.5),
                    ],
                    color.filled(),
                )
            }))?;
            root.present()?;
            Ok(())
        })();
        if let Err(e) = result {
            drop(root);
            return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"520\" height=\"40\"><text x=\"10\" y=\"25\">heatmap unavailable: {}</text></svg>", escape(&e.to_string()));
        }
    }
    svg
}

/// Escapes text for HTML/SVG.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg() {
        let s = line_chart(
            "loss",
            "step",
            "loss",
            &[Series {
                label: "train",
                points: vec![(0.0, 3.0), (1.0, 2.0), (2.0, 1.5)],
            }],
            false,
        );
        assert!(
            s.starts_with("<svg") && s.contains("polyline") || s.contains("path"),
            "{}",
            &s[..200]
        );
        let log = line_chart(
            "σ",
            "i",
            "σ",
            &[Series {
                label: "ΔW",
                points: vec![(1.0, 1.0), (2.0, 0.01)],
            }],
            true,
        );
        assert!(log.starts_with("<svg"));
        let h = heatmap(
            "φ",
            "i",
            "j",
            &ndarray::Array2::from_shape_fn((3, 4), |(i, j)| (i + j) as f64 / 6.0),
        );
        assert!(h.starts_with("<svg") && h.matches("<rect").count() >= 12);
        assert!(line_chart("empty", "x", "y", &[], false).starts_with("<svg"));
    }
}
