//! The chart of a `bench-compare` report (`chart.svg`), drawn with plotters.
//!
//! Three panels, one above the other, under a legend of their own:
//!
//! - msg/s per workload, keyed next to actor, on a log scale;
//! - p99 latency per workload, the same columns; the workloads' names are
//!   written once, under this panel's axis (handler on one line, keys on the
//!   next), so that a column of both panels reads as one workload;
//! - the verdict: a row per bar of the report, its name, a bar from the goal to
//!   the measured figure (measured ÷ goal, turned so that right of the goal is
//!   better, on a log scale), and the measured figure, the goal and pass or
//!   MISSED, green or red.
//!
//! The legend sits above the panels, outside every plot, so it never hides a
//! bar.

use crate::report::{Bar, Means, Report, WorkloadSummary};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// The keyed pool's colour.
const KEYED: RGBColor = RGBColor(31, 119, 180);
/// The actor pool's colour.
const ACTOR: RGBColor = RGBColor(255, 127, 14);
/// A bar met.
const PASS: RGBColor = RGBColor(44, 160, 44);
/// A bar missed.
const MISSED: RGBColor = RGBColor(214, 39, 40);

/// Width of the picture, px.
const WIDTH: u32 = 1400;
/// Height of the title and of the legend strip, px.
const HEADER: u32 = 80;
/// Height of one metric panel, px.
const PANEL: u32 = 270;
/// Height of the workloads' names under the second panel, px.
const NAMES: u32 = 50;
/// Height of one verdict row, px.
const ROW: u32 = 24;
/// The verdict panel's caption and axis, px.
const VERDICT_FRAME: u32 = 100;
/// Left of a panel: the value axis's labels, px.
const Y_LABELS: u32 = 80;
/// The verdict's scale: measured ÷ goal from `1 / SPAN` to `SPAN`; most bars
/// sit within a few tens of percent of their goal, so wider would flatten
/// them. A figure beyond ends in an arrow at the edge.
const SPAN: f64 = 2.0;
/// Where the verdict's scale is marked.
const VERDICT_TICKS: [f64; 5] = [0.5, 0.75, 1.0, 1.5, 2.0];

/// A figure of a pool's means.
type Metric = fn(&Means) -> f64;

/// Draw `report`'s chart into the SVG file `path`.
pub fn chart(report: &Report, path: &Path) -> Result<(), String> {
    let svg = chart_svg(report)?;
    std::fs::write(path, svg).map_err(|e| format!("{}: {e}", path.display()))
}

/// `report`'s chart, as SVG text.
pub fn chart_svg(report: &Report) -> Result<String, String> {
    let ws = &report.workloads;
    if ws.is_empty() {
        return Err("no workload to chart (a --members run has no chart)".to_owned());
    }
    let height = HEADER + 2 * PANEL + NAMES + VERDICT_FRAME + ROW * report.bars.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let title = format!(
            "bench-compare, {} backend{}, {} round(s): keyed pool against actor pool",
            report.backend,
            if report.quick { ", quick" } else { "" },
            report.rounds
        );
        let root = root.titled(&title, ("sans-serif", 22)).map_err(err)?;
        let (legend, rest) = root.split_vertically(HEADER - 40);
        draw_legend(&legend)?;
        let (throughput, rest) = rest.split_vertically(PANEL);
        let (latency, verdict) = rest.split_vertically(PANEL + NAMES);
        draw_metric(
            &throughput,
            ws,
            "throughput, msg/s (log scale)",
            |m| m.throughput,
            false,
        )?;
        draw_metric(
            &latency,
            ws,
            "p99 latency, µs (log scale)",
            |m| m.p99_us,
            true,
        )?;
        draw_verdict(&verdict, &report.bars)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The pools' colours, in a strip of their own above the panels.
fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    let y = h as i32 / 2;
    let x0 = w as i32 / 2 - 150;
    for (i, (name, color)) in [("keyed pool", KEYED), ("actor pool", ACTOR)]
        .into_iter()
        .enumerate()
    {
        let x = x0 + i as i32 * 170;
        area.draw(&Rectangle::new(
            [(x, y - 7), (x + 14, y + 7)],
            color.filled(),
        ))
        .map_err(err)?;
        area.draw(&Text::new(
            name,
            (x + 22, y),
            ("sans-serif", 15)
                .into_font()
                .into_text_style(area)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// `100`, `10k`, `1.5M`: an axis label.
fn compact(v: f64) -> String {
    let (v, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = if v.fract().abs() < 1e-9 || v.abs() >= 10.0 {
        0
    } else {
        1
    };
    format!("{v:.digits$}{suffix}")
}

/// One metric per workload, keyed and actor side by side; with `names`, the
/// workloads' names under the axis.
fn draw_metric(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    ws: &[WorkloadSummary],
    caption: &str,
    value: Metric,
    names: bool,
) -> Result<(), String> {
    let values: Vec<f64> = ws
        .iter()
        .flat_map(|w| [value(&w.keyed), value(&w.actor)])
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    // Whole decades, so the log axis is marked at both ends however close the
    // figures are; room below the lowest bar, so that it shows.
    let (lo, hi) = if values.is_empty() {
        (1.0, 10.0)
    } else {
        (
            10f64.powf((lo / 1.5).max(1e-3).log10().floor()),
            10f64.powf((hi * 1.2).log10().ceil()),
        )
    };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin_left(10)
        .margin_right(20)
        .margin_top(5)
        .x_label_area_size(if names { NAMES } else { 4 })
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(-0.5f64..(ws.len() as f64 - 0.5), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // The names are drawn below, two lines each; no number on this axis.
        .x_labels(0)
        .y_label_formatter(&|y| compact(*y))
        .y_label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    for (side, color, offset) in [("keyed", KEYED, -0.2f64), ("actor", ACTOR, 0.2)] {
        let bars: Vec<Rectangle<(f64, f64)>> = ws
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let m = if side == "keyed" { &w.keyed } else { &w.actor };
                let v = value(m);
                (m.runs > 0 && v.is_finite() && v > 0.0).then(|| {
                    let x = i as f64 + offset;
                    Rectangle::new([(x - 0.18, lo), (x + 0.18, v)], color.filled())
                })
            })
            .collect();
        chart.draw_series(bars).map_err(err)?;
    }
    if names {
        let style = ("sans-serif", 12)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, w) in ws.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64, lo));
            // Back from the picture's coordinates to the panel's.
            let (ax, ay) = area.get_base_pixel();
            let (x, y) = (x - ax, y - ay);
            area.draw(&Text::new(w.handler.name(), (x, y + 8), style.clone()))
                .map_err(err)?;
            area.draw(&Text::new(w.keys.clone(), (x, y + 24), style.clone()))
                .map_err(err)?;
        }
    }
    Ok(())
}

/// `text`, cut to `max` characters with an ellipsis.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// A row per bar: its name, measured ÷ goal against the goal line, and the
/// figures with pass or MISSED.
fn draw_verdict(area: &DrawingArea<SVGBackend<'_>, Shift>, bars: &[Bar]) -> Result<(), String> {
    let missed = bars.iter().filter(|b| !b.pass).count();
    let caption = if missed == 0 {
        format!("verdict: all {} bars met", bars.len())
    } else {
        format!("verdict: {missed} of {} bars MISSED", bars.len())
    };
    let area = area.margin(20, 0, 0, 0);
    let (width, _) = area.dim_in_pixel();
    // Names on the left, the figures on the right, the scale between them.
    let (names_w, figures_w) = (560u32, 380u32);
    let (left, rest) = area.split_horizontally(names_w);
    let (plot, right) = rest.split_horizontally(width - names_w - figures_w);
    let rows = bars.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            &caption,
            ("sans-serif", 16)
                .into_font()
                .color(if missed == 0 { &PASS } else { &MISSED }),
        )
        .margin_right(10)
        .x_label_area_size(40)
        .build_cartesian_2d((1.0 / SPAN..SPAN).log_scale(), -0.5..rows - 0.5)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        // Marked below at round ratios (a log axis would mark 1 alone).
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .disable_x_mesh()
        .x_desc("measured ÷ goal (log scale; for a ceiling, goal ÷ measured): right of 1× is met")
        .axis_desc_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    // Row i from the top.
    let y_of = |i: usize| rows - 1.0 - i as f64;
    chart
        .draw_series(
            bars.iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(i, _)| {
                    let y = y_of(i);
                    Rectangle::new(
                        [(1.0 / SPAN, y - 0.5), (SPAN, y + 0.5)],
                        RGBColor(240, 240, 240).filled(),
                    )
                }),
        )
        .map_err(err)?;
    let tick_style = ("sans-serif", 12)
        .into_font()
        .into_text_style(&plot)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let (base_x, base_y) = plot.get_base_pixel();
    for tick in VERDICT_TICKS {
        let line = if tick == 1.0 {
            BLACK.stroke_width(2)
        } else {
            RGBColor(190, 190, 190).stroke_width(1)
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(tick, -0.5), (tick, rows - 0.5)],
                line,
            )))
            .map_err(err)?;
        let (x, y) = chart.backend_coord(&(tick, -0.5));
        plot.draw(&Text::new(
            format!("{tick}×"),
            (x - base_x, y - base_y + 6),
            tick_style.clone(),
        ))
        .map_err(err)?;
    }
    for (i, bar) in bars.iter().enumerate() {
        let y = y_of(i);
        let color = if bar.pass { PASS } else { MISSED };
        match bar.goal_ratio() {
            Some(r) => {
                let beyond = !(1.0 / SPAN..=SPAN).contains(&r);
                let r = r.clamp(1.0 / SPAN, SPAN);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(r.min(1.0), y - 0.3), (r.max(1.0), y + 0.3)],
                        color.filled(),
                    )))
                    .map_err(err)?;
                // A tick at the figure, seen even where it sits on the goal.
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(r, y - 0.4), (r, y + 0.4)],
                        color.stroke_width(3),
                    )))
                    .map_err(err)?;
                if beyond {
                    // An arrow out of the scale.
                    let (x, py) = chart.backend_coord(&(r, y));
                    let (x, py) = (x - base_x, py - base_y);
                    let dx = if r > 1.0 { 9 } else { -9 };
                    plot.draw(&Polygon::new(
                        vec![(x, py - 7), (x + dx, py), (x, py + 7)],
                        color.filled(),
                    ))
                    .map_err(err)?;
                }
            }
            // A count that must be zero: a dot on the goal when it is.
            None => {
                chart
                    .draw_series(std::iter::once(Circle::new((1.0, y), 6, color.filled())))
                    .map_err(err)?;
            }
        }
    }
    // The names and the figures, on the rows' heights.
    let name_style = ("sans-serif", 12)
        .into_font()
        .into_text_style(&left)
        .pos(Pos::new(HPos::Right, VPos::Center));
    for (i, bar) in bars.iter().enumerate() {
        let (_, y) = chart.backend_coord(&(1.0, y_of(i)));
        let y = y - base_y;
        let (_, ly) = left.get_base_pixel();
        let y_left = y + base_y - ly;
        left.draw(&Text::new(
            cut(&bar.name, 88),
            (names_w as i32 - 8, y_left),
            name_style.clone(),
        ))
        .map_err(err)?;
        let (_, ry) = right.get_base_pixel();
        let y_right = y + base_y - ry;
        let color = if bar.pass { PASS } else { MISSED };
        let verdict = if bar.pass { "pass" } else { "MISSED" };
        right
            .draw(&Text::new(
                verdict,
                (16, y_right),
                ("sans-serif", 12)
                    .into_font()
                    .style(FontStyle::Bold)
                    .color(&color)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(err)?;
        right
            .draw(&Text::new(
                format!("{}  (goal {})", cut(&bar.measured, 34), bar.target),
                (74, y_right),
                ("sans-serif", 12)
                    .into_font()
                    .into_text_style(&right)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report of a quick memory run (its runs left out: the chart does
    /// not draw them).
    fn fixture() -> Report {
        serde_json::from_str(include_str!("../tests/fixtures/report-memory-quick.json"))
            .expect("the fixture is a report")
    }

    /// An attribute of an SVG element's opening tag.
    fn attr(tag: &str, name: &str) -> Option<f64> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = tag[start..].find('"')?;
        tag[start..start + len].parse().ok()
    }

    /// Every `<text>` of `svg`: its y and its text (unescaped).
    fn texts(svg: &str) -> Vec<(f64, String)> {
        svg.split("<text ")
            .skip(1)
            .map(|t| {
                let (tag, rest) = t.split_once('>').expect("a whole tag");
                let body = rest.split("</text>").next().expect("closed");
                let body = body
                    .trim()
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&quot;", "\"")
                    .replace("&apos;", "'")
                    .replace("&amp;", "&");
                (attr(tag, "y").expect("y"), body)
            })
            .collect()
    }

    /// Every `<rect>` of `svg` filled with `color`: its y and height.
    fn rects(svg: &str, color: RGBColor) -> Vec<(f64, f64)> {
        let fill = format!("fill=\"#{:02X}{:02X}{:02X}\"", color.0, color.1, color.2);
        svg.split("<rect ")
            .skip(1)
            .filter_map(|r| {
                let tag = r.split('>').next()?;
                tag.contains(&fill)
                    .then(|| (attr(tag, "y").expect("y"), attr(tag, "height").expect("h")))
            })
            .collect()
    }

    #[test]
    fn each_workload_is_named_once_under_the_axis() {
        let report = fixture();
        let svg = chart_svg(&report).expect("drawn");
        let texts = texts(&svg);
        let words: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
        for w in &report.workloads {
            let (handler, keys) = (w.handler.name(), w.keys.as_str());
            let named = words
                .windows(2)
                .filter(|pair| pair[0] == handler && pair[1] == keys)
                .count();
            assert_eq!(named, 1, "{handler} / {keys} named {named} times");
            assert!(!svg.contains(&w.label()), "{} drawn whole", w.label());
            // Every name of a handler belongs to one of its workloads.
            let of_handler = report
                .workloads
                .iter()
                .filter(|o| o.handler == w.handler)
                .count();
            assert_eq!(words.iter().filter(|t| **t == handler).count(), of_handler);
        }
        // Under the axis: below every bar of both pools.
        let lowest_bar = [KEYED, ACTOR]
            .into_iter()
            .flat_map(|c| rects(&svg, c))
            .map(|(y, h)| y + h)
            .fold(0.0, f64::max);
        for (y, t) in &texts {
            if report.workloads.iter().any(|w| w.handler.name() == t) {
                assert!(
                    *y >= lowest_bar,
                    "{t} at {y}, above the axis at {lowest_bar}"
                );
            }
        }
    }

    #[test]
    fn the_legend_sits_above_every_bar() {
        let svg = chart_svg(&fixture()).expect("drawn");
        let texts = texts(&svg);
        for (name, color) in [("keyed pool", KEYED), ("actor pool", ACTOR)] {
            let legend: Vec<f64> = texts
                .iter()
                .filter(|(_, t)| t == name)
                .map(|(y, _)| *y)
                .collect();
            assert_eq!(legend.len(), 1, "{name} in the legend once");
            // The data bars (taller than the legend's swatch) start below it.
            let bars: Vec<(f64, f64)> = rects(&svg, color)
                .into_iter()
                .filter(|(_, h)| *h > 14.0)
                .collect();
            assert!(!bars.is_empty(), "{name} has bars");
            for (y, _) in bars {
                assert!(y > legend[0] + 10.0, "a {name} bar at {y} under the legend");
            }
        }
    }

    #[test]
    fn the_verdict_panel_shows_every_bar_against_its_goal() {
        let report = fixture();
        let svg = chart_svg(&report).expect("drawn");
        let words: Vec<String> = texts(&svg).into_iter().map(|(_, t)| t).collect();
        let missed = report.bars.iter().filter(|b| !b.pass).count();
        assert!(
            missed > 0 && missed < report.bars.len(),
            "the fixture has both"
        );
        let caption = format!("verdict: {missed} of {} bars MISSED", report.bars.len());
        assert!(words.contains(&caption), "{caption} in {words:?}");
        assert_eq!(words.iter().filter(|t| *t == "MISSED").count(), missed);
        assert_eq!(
            words.iter().filter(|t| *t == "pass").count(),
            report.bars.len() - missed
        );
        for b in &report.bars {
            let figures = format!("{}  (goal {})", b.measured, b.target);
            assert!(words.contains(&figures), "{figures} missing");
            assert!(
                words.iter().any(|t| t == &cut(&b.name, 88)),
                "{} missing",
                b.name
            );
        }
        // A bar per ratio, green or red as the verdict says.
        let ratios = |pass: bool| {
            report
                .bars
                .iter()
                .filter(|b| b.pass == pass && b.goal_ratio().is_some())
                .count()
        };
        let drawn = |color: RGBColor| rects(&svg, color).iter().filter(|(_, h)| *h > 0.0).count();
        assert_eq!(drawn(PASS), ratios(true));
        assert_eq!(drawn(MISSED), ratios(false));
    }

    #[test]
    fn an_all_met_verdict_says_so() {
        let mut report = fixture();
        for b in &mut report.bars {
            b.pass = true;
        }
        let svg = chart_svg(&report).expect("drawn");
        let caption = format!("verdict: all {} bars met", report.bars.len());
        assert!(texts(&svg).iter().any(|(_, t)| *t == caption));
        assert!(!texts(&svg).iter().any(|(_, t)| t == "MISSED"));
    }

    #[test]
    fn a_report_without_workloads_has_no_chart() {
        let mut report = fixture();
        report.workloads.clear();
        let e = chart_svg(&report).expect_err("no chart");
        assert!(e.contains("no workload"), "{e}");
    }

    #[test]
    fn axis_labels_are_compact() {
        assert_eq!(compact(100.0), "100");
        assert_eq!(compact(10_000.0), "10k");
        assert_eq!(compact(1_500_000.0), "1.5M");
        assert_eq!(compact(2.5), "2.5");
    }

    #[test]
    fn long_names_are_cut_with_an_ellipsis() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("a longer name", 8), "a longe…");
        assert_eq!(cut("a longer name", 8).chars().count(), 8);
    }
}
