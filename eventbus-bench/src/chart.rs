//! A dependency-free SVG bar chart of publish throughput: one panel per storage class,
//! scenarios along x, one bar per (backend, mode). Plain SVG so it renders anywhere (GitHub,
//! browsers) without fonts installed on the machine that made it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::report::fmt_rate;

/// `(storage, scenario, series) -> median msg/s`.
pub(crate) type Series = BTreeMap<(String, String, String), f64>;

const SERIES: [(&str, &str); 9] = [
    ("kafka sdk", "#1f77b4"),
    ("kafka sdk-nodedup", "#17becf"),
    ("kafka raw", "#aec7e8"),
    ("nats sdk", "#d62728"),
    ("nats sdk-nodedup", "#ff7f0e"),
    ("nats sdk-async", "#e377c2"),
    ("nats sdk-atomic", "#8c564b"),
    ("nats raw", "#ff9896"),
    ("nats naive", "#7f7f7f"),
];

/// The bar chart's plot area per panel.
const PANEL_W: f64 = 760.0;
const PANEL_H: f64 = 300.0;
/// The bar chart's top and left margins.
const TOP: f64 = 60.0;
const LEFT: f64 = 70.0;

/// The bar chart of `data`: a panel per storage class, a group of bars per scenario.
pub(crate) fn svg(data: &Series, scenarios: &[&str], title: &str) -> String {
    let storages: Vec<&str> = ["durable", "memory", "replicated"]
        .into_iter()
        .filter(|st| data.keys().any(|(s, _, _)| s == st))
        .collect();
    let height = TOP + storages.len() as f64 * (PANEL_H + 70.0) + 40.0;
    let width = LEFT + PANEL_W + 200.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="24" font-size="16">{}</text>"#,
        escape(title)
    );
    for (pi, storage) in storages.iter().enumerate() {
        let y0 = TOP + pi as f64 * (PANEL_H + 70.0);
        panel(&mut out, data, storage, scenarios, y0);
    }
    for (i, (name, color)) in SERIES.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let x = LEFT + PANEL_W + 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/>"#,
            y - 10.0
        );
        let _ = writeln!(out, r#"<text x="{}" y="{y}">{name}</text>"#, x + 18.0);
    }
    out.push_str("</svg>\n");
    out
}

/// One storage class's panel, its top at `y0`: its title, the grid, and a group of bars per
/// scenario scaled to the panel's largest.
fn panel(out: &mut String, data: &Series, storage: &str, scenarios: &[&str], y0: f64) {
    let max = data
        .iter()
        .filter(|((s, _, _), _)| s == storage)
        .map(|(_, v)| *v)
        .fold(1.0f64, f64::max);
    let ymax = nice(max);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="{}" font-size="14">{storage} storage: publish msg/s (median)</text>"#,
        y0 - 8.0
    );
    for t in 0..=4 {
        let v = ymax * t as f64 / 4.0;
        let y = y0 + PANEL_H - PANEL_H * t as f64 / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/>"##,
            LEFT + PANEL_W
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_rate(v)
        );
    }
    let group_w = PANEL_W / scenarios.len() as f64;
    let bar_w = (group_w - 20.0) / SERIES.len() as f64;
    for (si, sc) in scenarios.iter().enumerate() {
        let gx = LEFT + si as f64 * group_w + 10.0;
        for (bi, (name, color)) in SERIES.iter().enumerate() {
            if let Some(v) = data.get(&(storage.to_string(), sc.to_string(), name.to_string())) {
                let h = PANEL_H * v / ymax;
                let x = gx + bi as f64 * bar_w;
                let _ = writeln!(
                    out,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{color}"><title>{name} {sc}: {}</title></rect>"#,
                    y0 + PANEL_H - h,
                    bar_w - 1.0,
                    fmt_rate(*v)
                );
            }
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{sc}</text>"#,
            gx + (group_w - 20.0) / 2.0,
            y0 + PANEL_H + 16.0
        );
    }
}

fn nice(max: f64) -> f64 {
    let mag = 10f64.powf(max.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= max {
            return m * mag;
        }
    }
    10.0 * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The latency chart's size.
const LAT_W: f64 = 900.0;
const LAT_H: f64 = 520.0;
/// The latency chart's left and top margins.
const LAT_LEFT: f64 = 80.0;
const LAT_TOP: f64 = 50.0;
/// The latency chart's plot area.
const LAT_PW: f64 = LAT_W - LAT_LEFT - 220.0;
const LAT_PH: f64 = LAT_H - LAT_TOP - 60.0;
/// The latency axis, log10 of milliseconds: 0.1 ms .. 10 s.
const LMIN: f64 = -1.0;
const LMAX: f64 = 4.0;

/// Latency versus throughput for a `--sweep`: x = publish msg/s (linear), y = ack p99 (log
/// scale, 0.1 ms .. 10 s), one colour per backend/storage, each point labelled `window/linger`.
pub(crate) fn latency_svg(records: &[crate::report::Record]) -> String {
    let xmax = nice(
        records
            .iter()
            .map(|r| r.publish_msgs_per_sec)
            .fold(1.0f64, f64::max),
    );
    let mut out = lat_svg_open(
        LAT_H,
        "ACK latency p99 vs publish throughput (sweep: window / linger ms)",
    );
    latency_axes(&mut out, xmax);
    latency_points(&mut out, records, xmax);
    out.push_str("</svg>\n");
    out
}

/// A latency chart's opening: the `<svg>` element `height` high, a white background, `title`.
fn lat_svg_open(height: f64, title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{LAT_W}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LAT_LEFT}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    out
}

/// The latency chart's x position of `v` msg/s, the axis ending at `xmax`.
fn lat_x(v: f64, xmax: f64) -> f64 {
    LAT_LEFT + LAT_PW * v / xmax
}

/// The latency chart's y position of `us` microseconds (clamped to the axis).
fn lat_y(us: u64) -> f64 {
    log_y(LAT_TOP, LAT_PH, us)
}

/// The y position of `us` microseconds on the latency axis of a plot area `ph` high at `top`
/// (clamped to the axis).
fn log_y(top: f64, ph: f64, us: u64) -> f64 {
    let ms = (us.max(1) as f64 / 1000.0).log10().clamp(LMIN, LMAX);
    top + ph - ph * (ms - LMIN) / (LMAX - LMIN)
}

/// The latency chart's grid and axis labels.
fn latency_axes(out: &mut String, xmax: f64) {
    let (left, top, pw, ph) = (LAT_LEFT, LAT_TOP, LAT_PW, LAT_PH);
    for t in 0..=4 {
        let v = xmax * t as f64 / 4.0;
        let x = lat_x(v, xmax);
        let _ = writeln!(
            out,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 16.0,
            crate::report::fmt_rate(v)
        );
    }
    log_grid(out, left, top, pw, ph);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">publish msg/s</text>"#,
        left + pw / 2.0,
        LAT_H - 12.0
    );
}

/// The latency axis's grid lines and labels (0.1 ms .. 10 s, log scale) over a plot area of
/// `pw` x `ph` at (`left`, `top`).
fn log_grid(out: &mut String, left: f64, top: f64, pw: f64, ph: f64) {
    for (i, label) in ["0.1 ms", "1 ms", "10 ms", "100 ms", "1 s", "10 s"]
        .iter()
        .enumerate()
    {
        let y = top + ph - ph * i as f64 / (LMAX - LMIN);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0
        );
    }
}

/// A point per run, labelled `window/linger`, one colour (and legend entry) per backend and
/// storage class.
fn latency_points(out: &mut String, records: &[crate::report::Record], xmax: f64) {
    const COLOURS: [&str; 6] = [
        "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let mut groups: BTreeMap<(String, String), Vec<&crate::report::Record>> = BTreeMap::new();
    for r in records {
        groups
            .entry((r.backend.clone(), r.storage.clone()))
            .or_default()
            .push(r);
    }
    for (gi, ((backend, storage), rs)) in groups.iter().enumerate() {
        let colour = COLOURS[gi % COLOURS.len()];
        for r in rs {
            let (x, y) = (lat_x(r.publish_msgs_per_sec, xmax), lat_y(r.ack_p99_us));
            let _ = writeln!(
                out,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{colour}"/><text x="{:.1}" y="{:.1}" font-size="9" fill="{colour}">{}/{}</text>"#,
                x + 5.0,
                y - 4.0,
                r.window,
                r.linger_ms
            );
        }
        let ly = LAT_TOP + 20.0 * gi as f64;
        let _ = writeln!(
            out,
            r#"<circle cx="{}" cy="{ly}" r="5" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            LAT_LEFT + LAT_PW + 20.0,
            LAT_LEFT + LAT_PW + 30.0,
            ly + 4.0,
            escape(&format!("{backend} {storage}"))
        );
    }
}

/// Rasterize one of our SVG charts to PNG (2x scale), with the system's fonts for the text.
pub(crate) fn png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // The charts ask for "sans-serif"; map it to a sans face this machine has.
    let family = ["DejaVu Sans", "Liberation Sans", "Noto Sans", "Arial"]
        .into_iter()
        .find(|f| {
            db.faces()
                .any(|face| face.families.iter().any(|(name, _)| name == f))
        })
        .map(str::to_owned)
        .or_else(|| {
            db.faces()
                .next()
                .and_then(|face| face.families.first().map(|(n, _)| n.clone()))
        });
    if let Some(f) = family {
        db.set_sans_serif_family(f);
    }
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| format!("chart SVG: {e}"))?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(2.0)
        .ok_or("chart too large")?;
    let mut pixmap =
        tiny_skia::Pixmap::new(size.width(), size.height()).ok_or("chart has no size")?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| format!("encode PNG: {e}"))
}

/// One latency series of the rates chart: its name, the offered rate, and in microseconds
/// `[ack p99, ack p99.9, handler p99, handler p99.9]`.
pub(crate) type RatePoint = (String, u64, [u64; 4]);

/// The latency rows' chart (main run and `--latency-study`): two panels (publish -> ack, publish -> handler), a group of
/// bars per offered rate, one bar per series at its p99 with a black tick at its p99.9, on the
/// latency chart's log axis (0.1 ms .. 10 s).
pub(crate) fn rates_svg(points: &[RatePoint]) -> String {
    const COLOURS: [&str; 4] = ["#d62728", "#ff9896", "#1f77b4", "#aec7e8"];
    let mut series: Vec<&str> = Vec::new();
    let mut rates: Vec<u64> = Vec::new();
    for (s, r, _) in points {
        if !series.contains(&s.as_str()) {
            series.push(s);
        }
        if !rates.contains(r) {
            rates.push(*r);
        }
    }
    let (ph, gap) = (LAT_PH * 0.6, 70.0);
    let height = LAT_TOP + 2.0 * (ph + gap) + 20.0;
    let mut out = lat_svg_open(
        height,
        "Latency at fixed offered rates: p99 (bar) and p99.9 (tick)",
    );
    let group_w = LAT_PW / rates.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series.len().max(1) as f64;
    for (pi, title) in ["publish -> ack", "publish -> handler"].iter().enumerate() {
        let top = LAT_TOP + pi as f64 * (ph + gap);
        let _ = writeln!(
            out,
            r#"<text x="{LAT_LEFT}" y="{}" font-size="13">{}</text>"#,
            top - 8.0,
            escape(title)
        );
        log_grid(&mut out, LAT_LEFT, top, LAT_PW, ph);
        for (ri, rate) in rates.iter().enumerate() {
            let gx = LAT_LEFT + ri as f64 * group_w + group_w * 0.1;
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{} msg/s</text>"#,
                gx + group_w * 0.4,
                top + ph + 16.0,
                crate::report::fmt_rate(*rate as f64)
            );
            for (si, name) in series.iter().enumerate() {
                let Some((_, _, v)) = points.iter().find(|(s, r, _)| s == name && r == rate) else {
                    continue;
                };
                let x = gx + si as f64 * bar_w;
                let (y99, y999) = (log_y(top, ph, v[2 * pi]), log_y(top, ph, v[2 * pi + 1]));
                let _ = writeln!(
                    out,
                    r##"<rect x="{x:.1}" y="{y99:.1}" width="{:.1}" height="{:.1}" fill="{}"/><line x1="{x:.1}" y1="{y999:.1}" x2="{:.1}" y2="{y999:.1}" stroke="#000" stroke-width="2"/>"##,
                    bar_w * 0.9,
                    (top + ph - y99).max(0.0),
                    COLOURS[si % COLOURS.len()],
                    x + bar_w * 0.9
                );
            }
        }
    }
    for (si, name) in series.iter().enumerate() {
        let y = LAT_TOP + 10.0 + si as f64 * 20.0;
        let x = LAT_LEFT + LAT_PW + 20.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="{y}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            COLOURS[si % COLOURS.len()],
            x + 18.0,
            y + 10.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_panel_and_missing_series_are_skipped() {
        let mut d = Series::new();
        d.insert(("durable".into(), "low".into(), "nats sdk".into()), 100.0);
        d.insert(("durable".into(), "low".into(), "kafka sdk".into()), 50.0);
        let s = svg(&d, &["low"], "t");
        assert!(s.starts_with("<svg"));
        assert_eq!(
            s.matches("<title>").count(),
            2,
            "one bar per present series"
        );
        assert!(
            s.contains("height=\"300.0\""),
            "the largest bar fills the panel (ymax = 100)"
        );
        assert!(!s.contains("memory storage"), "no panel without data");
        assert_eq!(nice(730.0), 1000.0);
        assert_eq!(nice(210_000.0), 250_000.0);
    }

    #[test]
    fn latency_chart_has_a_point_per_run_and_a_legend_per_backend() {
        use crate::mode::{Backend, Measure, Mode, Storage};
        let run = |backend: Backend, window: usize, rate: f64, p99_us: u64| {
            let mut r = crate::report::Record::new(&crate::drive::Run {
                s: crate::SCENARIOS[0],
                backend,
                mode: Mode::SDK,
                measure: Measure::Publish,
                storage: Storage::Durable,
                rep: 0,
                setting: None,
            });
            r.window = window;
            r.publish_msgs_per_sec = rate;
            r.ack_p99_us = p99_us;
            r
        };
        let s = latency_svg(&[
            run(Backend::Nats, 1, 10_000.0, 1_000),
            run(Backend::Nats, 4096, 150_000.0, 40_000),
            run(Backend::Kafka, 4096, 50_000.0, 80_000),
        ]);
        // 3 points (r=4) + 2 legend dots (r=5).
        assert_eq!(s.matches(r#"r="4""#).count(), 3);
        assert_eq!(s.matches(r#"r="5""#).count(), 2);
        assert!(s.contains(">4096/0<"), "points are labelled window/linger");
    }
}
