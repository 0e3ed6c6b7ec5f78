//! A latency CDF as a small self-contained SVG (log-scale x axis), no plotting dependency.

use std::fmt::Write;

use crate::measure::Samples;

const W: f64 = 760.0;
const H: f64 = 420.0;
const L: f64 = 60.0;
const R: f64 = 200.0;
const T: f64 = 20.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Renders the CDFs of `series` (name, samples sorted in ns) as SVG.
pub fn cdf_svg(title: &str, series: &[(&str, &Samples)]) -> String {
    let all = series.iter().flat_map(|(_, s)| s.0.iter().copied());
    let (mut lo, mut hi) = (u64::MAX, 1u64);
    for v in all {
        lo = lo.min(v.max(100));
        hi = hi.max(v);
    }
    if lo == u64::MAX {
        lo = 1000;
    }
    let (lx, hx) = (
        (lo as f64 / 1000.0).log10().floor(),
        (hi as f64 / 1000.0).log10().ceil().max(1.0),
    );
    let hx = if hx <= lx { lx + 1.0 } else { hx };
    let x = |us: f64| L + (us.max(1e-3).log10() - lx) / (hx - lx) * (W - L - R);
    let y = |f: f64| T + (1.0 - f) * (H - T - B);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="14" text-anchor="middle">{title}</text>
"#,
        (W - R + L) / 2.0
    );
    let mut d = lx;
    while d <= hx {
        let us = 10f64.powf(d);
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="{3}" text-anchor="middle">{us} µs</text>"##,
            x(us),
            T,
            H - B,
            H - B + 16.0
        );
        d += 1.0;
    }
    for f in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{0}" x2="{1}" y2="{0}" stroke="#eee"/><text x="{2}" y="{3}" text-anchor="end">{f}</text>"##,
            y(f),
            W - R,
            L - 6.0,
            y(f) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">fraction ≤ x</text>"#,
        (W - R + L) / 2.0,
        H - 12.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (name, sm)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let n = sm.0.len();
        if n == 0 {
            continue;
        }
        let step = (n / 400).max(1);
        let mut pts = String::new();
        for (k, v) in
            sm.0.iter()
                .enumerate()
                .step_by(step)
                .chain(std::iter::once((n - 1, &sm.0[n - 1])))
        {
            let _ = write!(
                pts,
                "{:.1},{:.1} ",
                x(*v as f64 / 1000.0),
                y((k + 1) as f64 / n as f64)
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{pts}"/>"#
        );
        let ly = T + 20.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{2}" y="{3}">{name}</text>"#,
            W - R + 10.0,
            W - R + 30.0,
            W - R + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
