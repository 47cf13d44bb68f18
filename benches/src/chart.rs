//! Grouped bar charts as SVG text, for `kxdp-compare`'s results.
//!
//! One panel per metric, side by side; in each, one group of bars per service count and one
//! bar per mode, with its value written above it, so the chart reads without the table.
//! Written by hand (a few dozen lines) rather than through a plotting crate: the output is a
//! handful of rectangles and labels. Missing values leave a gap, never a zero bar.

use std::fmt::Write as _;

/// Bar colours by series index (colour-blind-safe Dark2 palette).
const COLOURS: [&str; 6] = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#e6ab02"];
const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 380.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 92.0;
const BOTTOM: f64 = 48.0;

/// A panel: its title, whether its axis is logarithmic and in seconds (else linear, a rate),
/// and the value of (series index, size).
pub type Panel<'a> = (&'a str, bool, &'a dyn Fn(usize, u32) -> Option<f64>);

/// Formats a rate (`1.23 M`, `45 k`, `120`) or a time in seconds (`2.1 s`, `35 ms`, `410 µs`).
pub fn human(v: f64, time: bool) -> String {
    if time {
        if v >= 1.0 {
            format!("{v:.2} s")
        } else if v >= 1e-3 {
            format!("{:.1} ms", v * 1e3)
        } else {
            format!("{:.0} µs", v * 1e6)
        }
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) at or
/// above `v` (> 0).
fn nice_ceil(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|x| *x >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The whole chart.
pub fn compare_svg(title: &str, sizes: &[u32], series: &[&str], panels: &[Panel<'_>]) -> String {
    let width = PANEL_W * panels.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_H}" viewBox="0 0 {width} {PANEL_H}" font-family="sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    // Legend.
    let mut x = 10.0;
    for (i, name) in series.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{}"/><text x="{}" y="40" font-size="12">{}</text>"#,
            COLOURS[i % COLOURS.len()],
            x + 16.0,
            esc(name)
        );
        x += 24.0 + 7.5 * name.len() as f64;
    }
    for (pi, (ptitle, log, value)) in panels.iter().enumerate() {
        let x0 = pi as f64 * PANEL_W;
        panel(&mut s, x0, ptitle, *log, sizes, series, value);
    }
    s.push_str("</svg>\n");
    s
}

fn panel(
    s: &mut String,
    x0: f64,
    title: &str,
    log: bool,
    sizes: &[u32],
    series: &[&str],
    value: &dyn Fn(usize, u32) -> Option<f64>,
) {
    let (px, py) = (x0 + LEFT, TOP);
    let (pw, ph) = (PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="12" font-weight="bold">{}</text>"#,
        x0 + 10.0,
        TOP - 26.0,
        esc(title)
    );
    let shown: Vec<usize> = (0..series.len())
        .filter(|&i| sizes.iter().any(|&n| value(i, n).is_some_and(|v| v > 0.0)))
        .collect();
    let vals: Vec<f64> = shown
        .iter()
        .flat_map(|&i| sizes.iter().filter_map(move |&n| value(i, n)))
        .filter(|v| *v > 0.0)
        .collect();
    if vals.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="12">no data</text>"#,
            px + pw / 3.0,
            py + ph / 2.0
        );
        return;
    }
    let max = vals.iter().cloned().fold(f64::MIN, f64::max);
    let min = vals.iter().cloned().fold(f64::MAX, f64::min);
    // Axis: value -> y.
    let (lo, hi) = if log {
        (
            10f64.powf(min.log10().floor()),
            10f64.powf(max.log10().ceil().max(min.log10().floor() + 1.0)),
        )
    } else {
        (0.0, nice_ceil(max * 1.08))
    };
    let y_of = |v: f64| -> f64 {
        let f = if log { (v.log10() - lo.log10()) / (hi.log10() - lo.log10()) } else { v / hi };
        py + ph - f.clamp(0.0, 1.0) * ph
    };
    let ticks: Vec<f64> = if log {
        let (a, b) = (lo.log10().round() as i32, hi.log10().round() as i32);
        (a..=b).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=5).map(|k| hi * k as f64 / 5.0).collect()
    };
    for t in ticks {
        let y = y_of(t);
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            px + pw,
            px - 4.0,
            y + 3.0,
            human(t, log)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{px}" y1="{py}" x2="{px}" y2="{:.1}" stroke="#333"/><line x1="{px}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        py + ph,
        py + ph,
        px + pw,
        py + ph
    );
    let group_w = pw / sizes.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / shown.len().max(1) as f64).min(36.0);
    for (g, &n) in sizes.iter().enumerate() {
        let gx = px + g as f64 * group_w + (group_w - bar_w * shown.len() as f64) / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{} svc</text>"#,
            px + (g as f64 + 0.5) * group_w,
            py + ph + 16.0,
            n
        );
        for (k, &i) in shown.iter().enumerate() {
            let Some(v) = value(i, n).filter(|v| *v > 0.0) else { continue };
            let (x, y) = (gx + k as f64 * bar_w, y_of(v));
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                bar_w - 2.0,
                py + ph - y,
                COLOURS[i % COLOURS.len()],
                esc(series[i]),
                human(v, log)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="start" transform="rotate(-60 {:.1} {:.1})">{}</text>"#,
                x + bar_w / 2.0,
                y - 3.0,
                x + bar_w / 2.0,
                y - 3.0,
                human(v, log)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">services (10 endpoints each)</text>"#,
        px + pw / 2.0,
        py + ph + 34.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(1_234_567.0, false), "1.23 M");
        assert_eq!(human(45_400.0, false), "45 k");
        assert_eq!(human(120.0, false), "120");
        assert_eq!(human(2.5, true), "2.50 s");
        assert_eq!(human(0.035, true), "35.0 ms");
        assert_eq!(human(0.00041, true), "410 µs");
    }

    #[test]
    fn nice_ceiling() {
        assert_eq!(nice_ceil(0.9), 1.0);
        assert_eq!(nice_ceil(1.5), 1.5);
        assert_eq!(nice_ceil(1.6), 2.0);
        assert_eq!(nice_ceil(203_000.0), 250_000.0);
        assert_eq!(nice_ceil(340_000.0), 400_000.0);
        assert_eq!(nice_ceil(610.0), 800.0);
    }

    #[test]
    fn chart_has_a_bar_per_value_and_gaps_for_missing_ones() {
        let rate = |i: usize, n: u32| (i != 1 || n == 1).then(|| 1000.0 * (i + 1) as f64);
        let time = |i: usize, _n: u32| (i == 0).then_some(0.0004);
        let svg = compare_svg(
            "t <x>",
            &[1, 1000],
            &["a", "b", "c"],
            &[("rate", false, &rate), ("time", true, &time)],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;x&gt;"));
        // rate: a and c at both sizes, b at one; time: a at both.
        assert_eq!(svg.matches("<rect x=").count() - 3, 5 + 2);
        assert!(svg.contains("<title>c: 3 k</title>"));
        assert!(svg.contains("<title>a: 400 µs</title>"));
    }
}
