//! A latency CDF as SVG (log-scale x axis), drawn with `plotters`' SVG backend: one line per
//! series, a legend, and the quantiles 0.5 / 0.9 / 0.99 as grid lines.

use plotters::prelude::*;

use crate::measure::Samples;

const SIZE: (u32, u32) = (760, 420);
/// Points drawn per series at most (a CDF of a million samples needs no million points).
const POINTS: usize = 400;

/// Renders the CDFs of `series` (name, samples sorted, in ns) as SVG; a drawing error comes back
/// as its text.
pub fn cdf_svg(title: &str, series: &[(&str, &Samples)]) -> Result<String, String> {
    let (mut lo, mut hi) = (f64::MAX, 1.0f64);
    for v in series.iter().flat_map(|(_, s)| s.0.iter()) {
        let us = *v as f64 / 1e3;
        lo = lo.min(us.max(0.1));
        hi = hi.max(us);
    }
    if lo == f64::MAX {
        lo = 1.0;
    }
    // whole decades, at least one
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil().max(lo.log10() + 1.0));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency, µs (log scale)")
            .y_desc("fraction ≤ x")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(11)
            .draw()
            .map_err(|e| e.to_string())?;
        for q in [0.5, 0.9, 0.99] {
            chart
                .draw_series(LineSeries::new([(lo, q), (hi, q)], BLACK.mix(0.25)))
                .map_err(|e| e.to_string())?;
        }
        for (i, (name, s)) in series.iter().enumerate() {
            let n = s.0.len();
            if n == 0 {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            let step = (n / POINTS).max(1);
            let pts =
                s.0.iter()
                    .enumerate()
                    .step_by(step)
                    .chain(std::iter::once((n - 1, &s.0[n - 1])))
                    .map(|(k, v)| ((*v as f64 / 1e3).max(lo), (k + 1) as f64 / n as f64));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cdf_is_an_svg_with_each_series_named() {
        let a = Samples((1..=1000).map(|i| i * 1000).collect());
        let b = Samples((1..=10).map(|i| i * 50_000).collect());
        let empty = Samples(Vec::new());
        let svg = cdf_svg("t", &[("fast one", &a), ("slow one", &b), ("none", &empty)]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("fast one") && svg.contains("slow one"));
        assert!(svg.contains("polyline") || svg.contains("path"));
        // nothing to draw still gives a chart (axes, no series)
        assert!(cdf_svg("empty", &[("none", &empty)])
            .unwrap()
            .contains("<svg"));
    }
}
