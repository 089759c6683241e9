//! The comparison plot: unwanted rate against `KL(p*‖p_new)`, one curve per method along the
//! Pareto frontier of its settings (means over seeds; its other settings as faint dots), the
//! base model, the ideal update `p*` at (0, 0) and the matched rates marked. Drawn with
//! `plotters` to SVG and PNG, with the DejaVu Sans font embedded in the binary (no system fonts
//! are read; its license is `assets/DejaVuSans-LICENSE.txt`).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::compare::CompareResults;
use crate::methods::Method;
use crate::{Error, Result};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Plot { path: "DejaVuSans.ttf".into(), reason: "invalid embedded font".into() })
    }
}

/// Colour and marker of a method: TNT variants in blues and purples (filled circles), the
/// token-level baselines in reds and oranges (triangles), the sequence-level methods in greens
/// and browns (squares), the tuning-free ProFS edit in black (hollow diamonds).
fn style_of(m: Method) -> (RGBColor, u8) {
    match m {
        Method::Tnff => (RGBColor(31, 119, 180), 0),
        Method::Tnrr => (RGBColor(106, 61, 154), 0),
        Method::Tnrf => (RGBColor(23, 190, 207), 0),
        Method::Tnfll => (RGBColor(66, 146, 198), 0),
        Method::Tnrll => (RGBColor(158, 154, 200), 0),
        Method::Nl => (RGBColor(214, 39, 40), 1),
        Method::Ul => (RGBColor(255, 127, 14), 1),
        Method::WelleckUl => (RGBColor(227, 119, 194), 1),
        Method::Npo => (RGBColor(44, 160, 44), 2),
        Method::Dpo => (RGBColor(140, 86, 75), 2),
        Method::Cp => (RGBColor(188, 189, 34), 2),
        Method::Rrhf => (RGBColor(127, 127, 127), 2),
        Method::Neat => (RGBColor(0, 100, 0), 2),
        Method::Profs => (RGBColor(0, 0, 0), 3),
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot { path: path.to_path_buf(), reason: e.to_string() }
}

/// Draws the plot of `results` into `svg` and `png`.
///
/// # Errors
/// [`Error::Plot`] when drawing or encoding fails; [`Error::InvalidInput`] when no point has
/// both an unwanted rate and `KL(p*‖p_new)` (the task has no detector).
pub fn draw_plot(results: &CompareResults, svg: &Path, png: &Path) -> Result<()> {
    register_font()?;
    {
        let root = SVGBackend::new(svg, (1100, 680)).into_drawing_area();
        draw(results, &root).map_err(|e| err(svg, e))?;
        root.present().map_err(|e| err(svg, e))?;
    }
    {
        let root = BitMapBackend::new(png, (1100, 680)).into_drawing_area();
        draw(results, &root).map_err(|e| err(png, e))?;
        root.present().map_err(|e| err(png, e))?;
    }
    Ok(())
}

/// Whether the results have anything to plot.
pub fn plottable(results: &CompareResults) -> bool {
    results.base_metrics.unwanted_rate.is_some() && results.base_metrics.kl_ideal.is_some()
}

/// A hollow diamond around `at` in data coordinates (about 14 px on the default canvas).
fn diamond(at: (f64, f64), x_max: f64, y_max: f64, color: RGBColor) -> PathElement<(f64, f64)> {
    let (dx, dy) = (x_max * 0.009, y_max * 0.012);
    PathElement::new(
        vec![
            (at.0, at.1 + dy),
            (at.0 + dx, at.1),
            (at.0, at.1 - dy),
            (at.0 - dx, at.1),
            (at.0, at.1 + dy),
        ],
        color.stroke_width(2),
    )
}

type DrawResult<T, DB> =
    std::result::Result<T, DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(
    results: &CompareResults,
    root: &DrawingArea<DB, Shift>,
) -> DrawResult<(), DB> {
    root.fill(&WHITE)?;
    let (area, legend) = root.split_horizontally(820);
    let base_rate = results.base_metrics.unwanted_rate.map_or(0.0, |e| e.value);
    let base_kl = results.base_metrics.kl_ideal.map_or(0.0, |e| e.value);
    // (method, setting label, KL, rate, se KL, se rate, on the frontier): the settings' means
    // over seeds.
    type Pt = (Method, String, f64, f64, Option<f64>, Option<f64>, bool);
    let on_front: std::collections::BTreeSet<usize> =
        results.summary.iter().flat_map(|m| m.frontier.iter().copied()).collect();
    let pts: Vec<Pt> = results
        .aggregates
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let (kl, rate) = (a.kl_ideal?, a.unwanted_rate?);
            Some((
                a.method,
                a.setting(),
                kl.value,
                rate.value,
                kl.se.is_finite().then_some(kl.se),
                rate.se.is_finite().then_some(rate.se),
                on_front.contains(&i),
            ))
        })
        .collect();
    let max_kl = pts.iter().map(|p| p.2).fold(base_kl, f64::max);
    // Keep the region around the base model readable: points further right are drawn on the
    // right edge as hollow circles with their value.
    let x_max = (max_kl.min(3.0 * base_kl.max(0.05)) * 1.08).max(0.05);
    let y_max = (pts.iter().map(|p| p.3).fold(base_rate, f64::max) * 1.1).max(0.01);
    let mut chart = ChartBuilder::on(&area)
        .caption(
            format!("{}: unwanted rate vs distance to the ideal update", results.task.name),
            (FAMILY, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("KL(p* ‖ p_new)  [nats per response]")
        .y_desc("unwanted rate of sampled responses")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    for &t in &results.matched_rates {
        chart.draw_series(LineSeries::new(
            [(0.0, t), (x_max, t)],
            ShapeStyle { color: RGBColor(150, 150, 150).to_rgba(), filled: false, stroke_width: 1 },
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("matched rate {t:.3}"),
            (x_max * 0.42, t + y_max * 0.022),
            (FAMILY, 12).into_font().color(&RGBColor(110, 110, 110)),
        )))?;
    }
    let clip = |x: f64| x.min(x_max);
    let mut legend_items: Vec<(String, RGBColor, u8)> = Vec::new();
    // Points beyond the right edge: (rate, label, colour), labelled after all curves.
    let mut clipped: Vec<(f64, String, RGBColor)> = Vec::new();
    for sweep in &results.config.sweeps {
        let m = sweep.method;
        let (color, marker) = style_of(m);
        let all: Vec<&Pt> = pts.iter().filter(|p| p.0 == m).collect();
        if all.is_empty() {
            continue;
        }
        // The other settings: faint dots.
        chart.draw_series(
            all.iter()
                .filter(|p| !p.6 && p.2 <= x_max)
                .map(|p| Circle::new((p.2, p.3), 2, color.mix(0.45).filled())),
        )?;
        let mut mine: Vec<&Pt> = all.iter().copied().filter(|p| p.6).collect();
        mine.sort_by(|a, b| a.3.total_cmp(&b.3));
        legend_items.push((
            format!("{} ({} of {} settings)", m.name(), mine.len(), all.len()),
            color,
            marker,
        ));
        chart.draw_series(LineSeries::new(
            mine.iter().map(|p| (clip(p.2), p.3)),
            color.stroke_width(2),
        ))?;
        for p in &mine {
            let at = (clip(p.2), p.3);
            if let (Some(se_x), Some(se_y)) = (p.4, p.5)
                && p.2 <= x_max
            {
                let faint = color.mix(0.35).stroke_width(1);
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(at.0, (at.1 - se_y).max(0.0)), (at.0, at.1 + se_y)],
                    faint,
                )))?;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![((at.0 - se_x).max(0.0), at.1), (clip(at.0 + se_x), at.1)],
                    faint,
                )))?;
            }
            let style = color.filled();
            if p.2 > x_max {
                chart.draw_series(std::iter::once(Circle::new(at, 6, color.stroke_width(2))))?;
                clipped.push((p.3, format!("{} →{:.2}", m.name(), p.2), color));
                continue;
            }
            match marker {
                0 => chart.draw_series(std::iter::once(Circle::new(at, 5, style)))?,
                1 => chart.draw_series(std::iter::once(TriangleMarker::new(at, 6, style)))?,
                3 => chart.draw_series(std::iter::once(diamond(at, x_max, y_max, color)))?,
                _ => chart.draw_series(std::iter::once(Rectangle::new(
                    [
                        (at.0 - x_max * 0.005, at.1 - y_max * 0.008),
                        (at.0 + x_max * 0.005, at.1 + y_max * 0.008),
                    ],
                    style,
                )))?,
            };
        }
    }
    // Labels of clipped points, stacked upwards from their rate so that they do not overlap;
    // when the stack would leave the chart, it is spread evenly over the chart's height.
    clipped.sort_by(|a, b| a.0.total_cmp(&b.0));
    let step = y_max * 0.034;
    let mut ys = Vec::with_capacity(clipped.len());
    let mut next_y = f64::NEG_INFINITY;
    for (rate, _, _) in &clipped {
        let y = (rate + y_max * 0.012).max(next_y);
        next_y = y + step;
        ys.push(y);
    }
    if ys.last().is_some_and(|&y| y > y_max * 0.96) {
        let n = ys.len().max(1) as f64;
        for (i, y) in ys.iter_mut().enumerate() {
            *y = y_max * 0.02 + (i as f64) * (y_max * 0.94 / n);
        }
    }
    for ((_, label, color), y) in clipped.iter().zip(ys) {
        chart.draw_series(std::iter::once(Text::new(
            label.clone(),
            (x_max * 0.84, y + y_max * 0.025),
            (FAMILY, 12).into_font().color(color),
        )))?;
    }
    // The base model and the ideal update.
    chart.draw_series(std::iter::once(Cross::new(
        (clip(base_kl), base_rate),
        9,
        BLACK.stroke_width(3),
    )))?;
    chart.draw_series(std::iter::once(Text::new(
        "base p°",
        (clip(base_kl) + x_max * 0.012, base_rate + y_max * 0.012),
        (FAMILY, 16),
    )))?;
    let gold = RGBColor(212, 160, 23);
    chart.draw_series(std::iter::once(Circle::new((0.0, 0.0), 9, gold.filled())))?;
    chart.draw_series(std::iter::once(Text::new(
        "ideal p* (0, 0)",
        (x_max * 0.015, y_max * 0.025),
        (FAMILY, 16),
    )))?;
    // Legend.
    legend.fill(&WHITE)?;
    let mut y = 40;
    legend.draw(&Text::new("method (settings on its frontier)", (4, y - 22), (FAMILY, 14)))?;
    for (label, color, marker) in &legend_items {
        legend.draw(&PathElement::new(vec![(6, y), (34, y)], color.stroke_width(2)))?;
        match marker {
            0 => legend.draw(&Circle::new((20, y), 5, color.filled()))?,
            1 => legend.draw(&TriangleMarker::new((20, y), 6, color.filled()))?,
            3 => legend.draw(&PathElement::new(
                vec![(20, y - 7), (27, y), (20, y + 7), (13, y), (20, y - 7)],
                color.stroke_width(2),
            ))?,
            _ => legend.draw(&Rectangle::new([(15, y - 5), (25, y + 5)], color.filled()))?,
        }
        legend.draw(&Text::new(label.clone(), (40, y - 8), (FAMILY, 14)))?;
        y += 26;
    }
    y += 10;
    legend.draw(&Cross::new((20, y), 7, BLACK.stroke_width(3)))?;
    legend.draw(&Text::new("base model p°", (40, y - 8), (FAMILY, 14)))?;
    y += 26;
    legend.draw(&Circle::new((20, y), 7, gold.filled()))?;
    legend.draw(&Text::new("ideal update p*", (40, y - 8), (FAMILY, 14)))?;
    y += 26;
    legend.draw(&Circle::new((20, y), 6, BLACK.stroke_width(2)))?;
    legend.draw(&Text::new("beyond the right edge", (40, y - 8), (FAMILY, 14)))?;
    legend.draw(&Text::new("(setting →KL)", (40, y + 10), (FAMILY, 14)))?;
    Ok(())
}
