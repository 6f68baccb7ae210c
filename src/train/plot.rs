//! Dependency-free SVG line charts (loss curves, learning rates, throughput).
//!
//! [`line_chart_svg`] turns a few `(x, y)` series into a standalone SVG document:
//! title, axis labels, "nice" tick values (1, 2 or 5 times a power of ten) with
//! labels and grid lines, one colored polyline per series and a legend. It never
//! panics on awkward data: empty series, single points, NaN/inf points (skipped),
//! constant values (the range is padded) and, on a log scale, non-positive values
//! (skipped). This module does no I/O; the caller writes the string to a file.

use std::fmt::Write as _;

/// One named line of a chart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series { name: name.into(), points }
    }
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0; // room for the legend
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// Line colors (cycled).
const PALETTE: [&str; 10] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Escapes text for use in XML character data and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The smallest step of the form {1, 2, 5} x 10^k with at most `max_ticks`
/// intervals over `range` (> 0).
fn nice_step(range: f64, max_ticks: usize) -> f64 {
    let raw = range / max_ticks.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw * (1.0 - 1e-9) {
            return m * mag;
        }
    }
    10.0 * mag
}

/// "Nice" tick values inside `[lo, hi]`: multiples of a 1/2/5 x 10^k step, at most
/// `max_ticks + 1` of them. E.g. `[0, 1.2]` gives `0, 0.5, 1.0`.
pub fn nice_ticks(lo: f64, hi: f64, max_ticks: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() {
        return Vec::new();
    }
    if hi <= lo {
        return vec![lo];
    }
    let step = nice_step(hi - lo, max_ticks);
    let eps = step * 1e-9;
    let first = ((lo - eps) / step).ceil() as i64;
    let last = ((hi + eps) / step).floor() as i64;
    // Round away float noise (2.4000000000000004 -> 2.4) where the step allows it.
    let scale = 10f64.powi(decimals_for(step) as i32);
    (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            let r = (v * scale).round() / scale;
            let v = if r.is_finite() && (r - v).abs() <= step * 1e-6 { r } else { v };
            if v == 0.0 {
                0.0 // no "-0"
            } else {
                v
            }
        })
        .collect()
}

/// Tick values (not logarithms) for a log axis spanning `10^lo .. 10^hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let in_range = |v: f64| {
        let l = v.log10();
        l >= lo - 1e-9 && l <= hi + 1e-9
    };
    let (k0, k1) = (lo.floor() as i32, hi.ceil() as i32);
    let mut ticks: Vec<f64> = (k0..=k1).map(|k| 10f64.powi(k)).filter(|&v| in_range(v)).collect();
    if ticks.len() > 8 {
        let every = ticks.len().div_ceil(8);
        ticks = ticks.into_iter().step_by(every).collect();
    }
    for mantissas in [&[1.0, 2.0, 5.0][..], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0][..]] {
        if ticks.len() < 4 {
            ticks = (k0..=k1)
                .flat_map(|k| mantissas.iter().map(move |m| m * 10f64.powi(k)))
                .filter(|&v| in_range(v))
                .collect();
        }
    }
    if ticks.len() < 3 {
        ticks = nice_ticks(10f64.powf(lo), 10f64.powf(hi), 5).into_iter().filter(|&v| v > 0.0 && in_range(v)).collect();
    }
    ticks
}

/// Formats a tick value with `decimals` digits after the point (exponent form for
/// very large or very small magnitudes).
fn format_tick(v: f64, decimals: usize) -> String {
    let a = v.abs();
    if v == 0.0 {
        return "0".to_string();
    }
    if !(1e-4..1e7).contains(&a) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    format!("{v:.decimals$}")
}

/// Digits after the point needed to show multiples of `step` exactly.
fn decimals_for(step: f64) -> usize {
    if step <= 0.0 || !step.is_finite() {
        return 0;
    }
    (-step.log10() - 1e-9).ceil().clamp(0.0, 10.0) as usize
}

/// Digits after the point needed to show `v` (up to 6).
fn decimals_of(v: f64) -> usize {
    (0..=6)
        .find(|&d| {
            let scale = 10f64.powi(d as i32);
            ((v * scale).round() / scale - v).abs() <= 1e-9 * v.abs().max(1e-300)
        })
        .unwrap_or(6)
}

/// Pads a (possibly degenerate) range: a constant value gets a unit-ish window,
/// otherwise `frac` of the span on both sides.
fn pad_range(lo: f64, hi: f64, frac: f64, degenerate_pad: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= 1e-12 * lo.abs().max(hi.abs()).max(1e-300) {
        let p = if degenerate_pad > 0.0 { degenerate_pad } else { (lo.abs() * 0.1).max(1.0) };
        (lo - p, hi + p)
    } else {
        (lo - span * frac, hi + span * frac)
    }
}

/// Writes a line chart as a standalone SVG string: title, x/y axis labels, nice tick
/// values with labels, grid lines, one colored polyline per series, a legend.
/// Handles empty series, a single point, NaN/inf points (skipped), and constant y
/// (the range is padded). With `log_y`, y is drawn on a log10 scale and points with
/// y <= 0 are skipped.
pub fn line_chart_svg(title: &str, x_label: &str, y_label: &str, series: &[Series], log_y: bool) -> String {
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let usable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0);

    // Data ranges (y in transformed space).
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for p in series.iter().flat_map(|s| s.points.iter()).filter(|p| usable(p)) {
        let y = ty(p.1);
        if !y.is_finite() {
            continue;
        }
        xmin = xmin.min(p.0);
        xmax = xmax.max(p.0);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    let has_data = xmin <= xmax;
    if !has_data {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    let (xmin, xmax) = if xmax - xmin <= 1e-12 * xmin.abs().max(xmax.abs()).max(1e-300) {
        pad_range(xmin, xmax, 0.0, (xmin.abs() * 0.1).max(0.5))
    } else {
        (xmin, xmax)
    };
    let (ymin, ymax) = if log_y { pad_range(ymin, ymax, 0.05, 0.5) } else { pad_range(ymin, ymax, 0.05, 0.0) };

    let (px0, px1) = (LEFT, WIDTH - RIGHT);
    let (py0, py1) = (TOP, HEIGHT - BOTTOM); // py0 = top edge
    let sx = |x: f64| px0 + (x - xmin) / (xmax - xmin) * (px1 - px0);
    let sy = |y: f64| py1 - (y - ymin) / (ymax - ymin) * (py1 - py0);

    let mut svg = String::with_capacity(4096);
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="30" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        (px0 + px1) / 2.0,
        xml_escape(title)
    );

    // Grid lines and tick labels.
    let xt = nice_ticks(xmin, xmax, 6);
    let xdec =
        if xt.len() >= 2 { decimals_for(xt[1] - xt[0]) } else { decimals_of(xt.first().copied().unwrap_or(0.0)) };
    let (yt, ylabels): (Vec<f64>, Vec<String>) = if log_y {
        let v = log_ticks(ymin, ymax);
        let labels = v.iter().map(|&t| format_tick(t, decimals_of(t))).collect();
        (v.iter().map(|t| t.log10()).collect(), labels)
    } else {
        let v = nice_ticks(ymin, ymax, 5);
        let dec = if v.len() >= 2 { decimals_for(v[1] - v[0]) } else { decimals_of(v.first().copied().unwrap_or(0.0)) };
        let labels = v.iter().map(|&t| format_tick(t, dec)).collect();
        (v, labels)
    };
    svg.push_str("<g stroke=\"#e3e3e3\" stroke-width=\"1\">\n");
    for &x in &xt {
        let _ = writeln!(svg, r#"<line x1="{0:.1}" y1="{py0:.1}" x2="{0:.1}" y2="{py1:.1}"/>"#, sx(x));
    }
    for &y in &yt {
        let _ = writeln!(svg, r#"<line x1="{px0:.1}" y1="{0:.1}" x2="{px1:.1}" y2="{0:.1}"/>"#, sy(y));
    }
    svg.push_str("</g>\n");
    let _ = writeln!(
        svg,
        r##"<rect x="{px0:.1}" y="{py0:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444" stroke-width="1"/>"##,
        px1 - px0,
        py1 - py0
    );
    svg.push_str("<g fill=\"#333\">\n");
    for &x in &xt {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(x),
            py1 + 18.0,
            xml_escape(&format_tick(x, xdec))
        );
    }
    for (&y, label) in yt.iter().zip(&ylabels) {
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            px0 - 6.0,
            sy(y) + 4.0,
            xml_escape(label)
        );
    }
    svg.push_str("</g>\n");

    // Axis labels.
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
        (px0 + px1) / 2.0,
        HEIGHT - 16.0,
        xml_escape(x_label)
    );
    let y_text = if log_y { format!("{y_label} (log scale)") } else { y_label.to_string() };
    let _ = writeln!(
        svg,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle" font-size="13">{}</text>"#,
        (py0 + py1) / 2.0,
        xml_escape(&y_text)
    );

    // Series.
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| usable(p))
            .map(|&(x, y)| (sx(x), sy(ty(y))))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        match pts.len() {
            0 => {}
            1 => {
                let _ = writeln!(svg, r#"<circle cx="{:.2}" cy="{:.2}" r="3" fill="{color}"/>"#, pts[0].0, pts[0].1);
            }
            _ => {
                let mut p = String::with_capacity(pts.len() * 14);
                for (j, (x, y)) in pts.iter().enumerate() {
                    if j > 0 {
                        p.push(' ');
                    }
                    let _ = write!(p, "{x:.2},{y:.2}");
                }
                let _ = writeln!(
                    svg,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" stroke-linejoin="round" points="{p}"/>"#
                );
            }
        }
    }
    if !has_data {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">no data</text>"##,
            (px0 + px1) / 2.0,
            (py0 + py1) / 2.0
        );
    }

    // Legend.
    let lx = px1 + 16.0;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = py0 + 12.0 + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.5"/>"#,
            lx + 22.0
        );
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 28.0, y + 4.0, xml_escape(&s.name));
    }
    svg.push_str("</svg>\n");
    svg
}

/// A horizontal bar chart (one bar per label, value printed at the bar's end) as a standalone SVG.
pub fn bar_chart_svg(title: &str, value_label: &str, bars: &[(String, f64)]) -> String {
    let label_w = 200.0;
    let row_h = 26.0;
    let height = TOP + BOTTOM + row_h * bars.len().max(1) as f64;
    let plot_w = WIDTH - label_w - 120.0;
    let max = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        xml_escape(title)
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        let w = if v.is_finite() { (v / max) * plot_w } else { 0.0 };
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect x=\"{label_w}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            label_w - 8.0,
            y + row_h * 0.65,
            xml_escape(label),
            y + 3.0,
            row_h - 6.0,
            PALETTE[i % PALETTE.len()],
            label_w + w + 6.0,
            y + row_h * 0.65,
            xml_escape(&format!("{v:.1}"))
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n</svg>\n",
        label_w + plot_w / 2.0,
        height - 20.0,
        xml_escape(value_label)
    );
    s
}

/// Expert load over training as heat maps, one panel per MoE layer: a row per expert, a column
/// per logged step (at most 240, evenly sampled), colored by load / mean load on a log₂ scale
/// (blue under-used, white balanced, red over-used; clamped at ¼× and 4×).
pub fn moe_heatmap_svg(layers: &[super::metrics::LoadHistory]) -> String {
    let (left, plot_w) = (90.0, WIDTH - 90.0 - 40.0);
    let color = |r: f64| {
        let x = if r > 0.0 { (r.log2() / 2.0).clamp(-1.0, 1.0) } else { -1.0 };
        let fade = |v: f64| (255.0 * (1.0 - v.abs())).round() as u8;
        if x >= 0.0 {
            format!("rgb(255,{},{})", fade(x), fade(x))
        } else {
            format!("rgb({},{},255)", fade(x), fade(x))
        }
    };
    let mut body = String::new();
    let mut y = TOP;
    for (layer, steps) in layers {
        let n_exp = steps.iter().map(|s| s.1.len()).max().unwrap_or(0);
        if n_exp == 0 || steps.is_empty() {
            continue;
        }
        let cols: Vec<usize> = (0..steps.len().min(240)).map(|i| i * steps.len() / steps.len().min(240)).collect();
        let (cw, rh) = (plot_w / cols.len() as f64, (160.0 / n_exp as f64).clamp(2.0, 14.0));
        let _ =
            writeln!(body, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">layer {layer}</text>"#, left - 8.0, y + 12.0);
        for (ci, &si) in cols.iter().enumerate() {
            for (e, &r) in steps[si].1.iter().enumerate() {
                let (cx, cy) = (left + ci as f64 * cw, y + e as f64 * rh);
                let _ = writeln!(
                    body,
                    r#"<rect x="{cx:.1}" y="{cy:.1}" width="{:.2}" height="{rh:.2}" fill="{}"/>"#,
                    cw + 0.3,
                    color(r)
                );
            }
        }
        let (first, last) = (steps[0].0, steps[steps.len() - 1].0);
        let h = rh * n_exp as f64;
        let _ = writeln!(body, r#"<text x="{left:.1}" y="{:.1}">step {first}</text>"#, y + h + 14.0);
        let _ = writeln!(
            body,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">step {last} · {n_exp} experts</text>"#,
            left + plot_w,
            y + h + 14.0
        );
        y += h + 34.0;
    }
    let height = y + 30.0;
    let title = "MoE expert load over training (load / mean: blue ¼×, white 1×, red 4×)";
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{:.1}\" y=\"28\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n{body}</svg>\n",
        WIDTH / 2.0,
        xml_escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small well-formedness check: one root `<svg>` element, every tag closed in
    /// order, no stray `<`/`&` in text or attributes. Returns the number of elements.
    fn check_xml(svg: &str) -> usize {
        let s = svg.trim_end();
        assert!(s.starts_with("<svg"), "must start with <svg");
        assert!(s.ends_with("</svg>"), "must end with </svg>");
        let mut stack: Vec<&str> = Vec::new();
        let mut elements = 0;
        let mut rest = s;
        let mut closed_root = false;
        while let Some(i) = rest.find('<') {
            check_text(&rest[..i]);
            assert!(!closed_root || rest[..i].trim().is_empty(), "content after the root");
            let end = rest[i..].find('>').expect("unterminated tag") + i;
            let tag = &rest[i + 1..end];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "mismatched closing tag");
                closed_root = stack.is_empty();
            } else {
                assert!(!closed_root, "second root element");
                let self_closing = tag.ends_with('/');
                let name = tag.trim_end_matches('/').split_whitespace().next().expect("empty tag");
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "bad tag name {name}");
                assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes in {tag}");
                check_text(tag);
                elements += 1;
                if !self_closing {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed tags {stack:?}");
        assert!(closed_root);
        elements
    }

    /// Every '&' must start one of the five predefined entities.
    fn check_text(t: &str) {
        for (i, _) in t.match_indices('&') {
            let ok = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| t[i..].starts_with(e));
            assert!(ok, "bare '&' in {t:?}");
        }
        assert!(!t.contains('>') || !t.contains('<'));
    }

    fn loss_curve(n: usize) -> Vec<(f64, f64)> {
        (0..n).map(|i| (i as f64, 8.3 * (-(i as f64) / 50.0).exp() + 2.0)).collect()
    }

    #[test]
    fn nice_ticks_are_nice() {
        assert_eq!(nice_ticks(0.0, 1.2, 5), vec![0.0, 0.5, 1.0]);
        assert_eq!(nice_ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(nice_ticks(-3.0, 7.0, 5), vec![-2.0, 0.0, 2.0, 4.0, 6.0]);
        assert_eq!(nice_ticks(0.0, 2000.0, 6), vec![0.0, 500.0, 1000.0, 1500.0, 2000.0]);
        assert_eq!(nice_ticks(2.06, 2.71, 5), vec![2.2, 2.4, 2.6]);
        assert_eq!(nice_ticks(0.0, 0.3, 3), vec![0.0, 0.1, 0.2, 0.3]);
        assert_eq!(nice_ticks(3.0, 3.0, 5), vec![3.0]);
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
        assert_eq!(format_tick(0.5, decimals_for(0.5)), "0.5");
        assert_eq!(format_tick(1.0, decimals_for(0.5)), "1.0");
        assert_eq!(format_tick(1500.0, decimals_for(500.0)), "1500");
        assert_eq!(format_tick(-0.25, decimals_for(0.05)), "-0.25");
        assert_eq!(format_tick(3e-6, 6), "3e-6");
        assert_eq!(format_tick(2.5e9, 0), "2.5e9");
        assert_eq!(log_ticks(-3.0, 2.0), vec![1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]);
        let lt = log_ticks(2f64.log10(), 9f64.log10());
        assert!(lt.len() >= 3 && lt.iter().all(|&v| (2.0..=9.0).contains(&v)), "{lt:?}");
        assert_eq!(log_ticks(-1.0, 1.0), vec![0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]);
    }

    #[test]
    fn chart_is_well_formed_and_escaped() {
        let series = vec![
            Series::new("train <loss> & \"more\"", loss_curve(300)),
            Series::new("val 'loss'", loss_curve(300).into_iter().step_by(50).collect()),
        ];
        let svg = line_chart_svg("Loss: a < b & c > d", "step", "loss (nats)", &series, false);
        let n = check_xml(&svg);
        assert!(n > 20);
        assert!(svg.contains("Loss: a &lt; b &amp; c &gt; d"));
        assert!(svg.contains("train &lt;loss&gt; &amp; &quot;more&quot;"));
        assert!(svg.contains("val &apos;loss&apos;"));
        assert!(svg.contains(">step<") && svg.contains(">loss (nats)<"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">100<") && svg.contains(">200<"));
        let log = line_chart_svg("log", "step", "loss", &series, true);
        check_xml(&log);
        assert!(log.contains("(log scale)"));
        assert_eq!(log.matches("<polyline").count(), 2);
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![Series::new("empty", vec![])],
            vec![Series::new("one point", vec![(3.0, 4.0)])],
            vec![Series::new("origin", vec![(0.0, 0.0)])],
            vec![Series::new(
                "nan",
                vec![(f64::NAN, 1.0), (1.0, f64::NAN), (f64::INFINITY, 2.0), (2.0, f64::NEG_INFINITY)],
            )],
            vec![Series::new("mixed", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, f64::INFINITY)])],
            vec![Series::new("constant", (0..10).map(|i| (i as f64, 2.5)).collect())],
            vec![Series::new("constant zero", (0..10).map(|i| (i as f64, 0.0)).collect())],
            vec![Series::new("same x", vec![(5.0, 1.0), (5.0, 2.0)])],
            vec![Series::new("negative", vec![(-10.0, -1e-3), (10.0, -2e-3)])],
            vec![Series::new("huge", vec![(0.0, 1e300), (1e12, -1e300)])],
            vec![Series::new("tiny", vec![(0.0, 1e-12), (1.0, 3e-12)])],
            (0..15).map(|i| Series::new(format!("s{i}"), vec![(0.0, i as f64), (1.0, 2.0 * i as f64)])).collect(),
        ];
        for log_y in [false, true] {
            for series in &cases {
                let svg = line_chart_svg("t", "x", "y", series, log_y);
                check_xml(&svg);
                assert!(!svg.contains("NaN") && !svg.contains("inf"), "non-finite coordinate in {svg}");
                for s in series {
                    assert!(svg.contains(&xml_escape(&s.name)));
                }
            }
        }
        let empty = line_chart_svg("t", "x", "y", &[], false);
        assert!(empty.contains("no data"));
        let single = line_chart_svg("t", "x", "y", &cases[2], false);
        assert!(single.contains("<circle"));
        // Log scale with only non-positive values: nothing drawable, still valid.
        let neg = line_chart_svg("t", "x", "y", &cases[9], true);
        assert!(neg.contains("no data"));
        // Constant y is padded: a tick label at the value itself.
        let c = line_chart_svg("t", "x", "y", &cases[6], false);
        assert!(c.contains(">2.5<"), "{c}");
    }

    #[test]
    fn bar_chart_is_well_formed() {
        let svg = bar_chart_svg("t<1>", "ms", &[("linear".into(), 3.0), ("a&b".into(), f64::NAN)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t&lt;1&gt;") && svg.contains("a&amp;b"));
    }

    #[test]
    fn moe_heatmap_is_well_formed() {
        let steps: Vec<(f64, Vec<f64>)> = (1..=300).map(|s| (s as f64, vec![0.0, 0.5, 1.0, 2.0, 9.0])).collect();
        let svg = moe_heatmap_svg(&[(1, steps.clone()), (2, steps)]);
        assert!(check_xml(&svg) > 2 * 240 * 5);
        assert!(svg.contains("layer 2") && svg.contains("rgb(255,255,255)"));
    }
}
