//! quark-eval's picture: one PNG with a panel of the pools' mean reward per quantile
//! across iterations, a panel per evaluation metric across iterations (each policy a
//! line with points and 95% error bars, the reference a dashed horizontal line in
//! its interval's band), and the control curve: the task's headline metric of the
//! newest policy conditioned on each quantile token. The iteration panels show the
//! models sampled with the samples per prompt that cover the most iterations (a
//! metric such as average max toxicity grows with the samples per prompt, so only
//! equal counts share a panel).
//!
//! Drawn with plotters on an in-memory bitmap and encoded with the `png` crate. The
//! text uses DejaVu Sans embedded in the library (`lib/assets`), so the plot looks
//! the same on every machine and needs no system fonts.

use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

use super::metrics::metric;
use crate::pool::QuantileSummary;
use crate::schema::EvalMetricsRow;

/// Picture size in pixels.
pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 1000;

/// DejaVu Sans 2.37, unmodified (licence beside it in lib/assets).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// A pool's quantile summary placed at the iteration it was built in.
#[derive(Clone, Debug)]
pub struct PoolPoint {
    pub iteration: u32,
    pub quantiles: Vec<QuantileSummary>,
}

/// One panel: a title, the y-axis label and the metrics drawn in it.
struct Panel {
    title: &'static str,
    y_label: &'static str,
    /// (metric name, legend name); several metrics share a panel when they are the
    /// same measure at different n.
    metrics: &'static [(&'static str, &'static str)],
    /// Whether the values are shares or probabilities, in [0, 1].
    unit: bool,
}

const PANELS: &[Panel] = &[
    Panel {
        title: "Average max. toxicity",
        y_label: "max toxicity per prompt (lower is better)",
        metrics: &[(metric::AVG_MAX_TOXICITY, "avg. max toxicity")],
        unit: true,
    },
    Panel {
        title: "Toxicity probability",
        y_label: "share of prompts with a toxic sample",
        metrics: &[(metric::TOXICITY_PROB, "toxicity prob.")],
        unit: true,
    },
    Panel {
        title: "Profanity (rustrict, an independent judge)",
        y_label: "share of samples flagged",
        metrics: &[(metric::PROFANITY_RATE, "profanity rate")],
        unit: true,
    },
    Panel {
        title: "Perplexity under the reference",
        y_label: "perplexity (lower is more fluent)",
        metrics: &[(metric::PERPLEXITY, "perplexity")],
        unit: false,
    },
    Panel {
        title: "Distinct n-grams",
        y_label: "dist-n (higher is more diverse)",
        metrics: &[
            (metric::DIST_1, "dist-1"),
            (metric::DIST_2, "dist-2"),
            (metric::DIST_3, "dist-3"),
        ],
        unit: true,
    },
    Panel {
        title: "Share of positive completions",
        y_label: "share positive",
        metrics: &[(metric::SHARE_POSITIVE, "share positive")],
        unit: true,
    },
    Panel {
        title: "Repetition within a completion",
        y_label: "rep-n (lower is better)",
        metrics: &[
            (metric::REP_2, "rep-2"),
            (metric::REP_3, "rep-3"),
            (metric::REP_4, "rep-4"),
        ],
        unit: true,
    },
    Panel {
        title: "Token diversity",
        y_label: "mean of (1-rep-2)(1-rep-3)(1-rep-4)",
        metrics: &[(metric::DIVERSITY, "diversity")],
        unit: true,
    },
    Panel {
        title: "Mean reward",
        y_label: "reward (higher is better)",
        metrics: &[(metric::REWARD, "reward")],
        unit: false,
    },
];

/// Line colours (a colour-blind-friendly qualitative palette, Okabe and Ito).
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(120, 120, 120),
];
const REFERENCE: RGBColor = RGBColor(90, 90, 90);
const GRID: RGBColor = RGBColor(225, 225, 225);

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plot: {e}")
}

fn register() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("plot: the embedded font does not load"))
    }
}

/// Colour of quantile `q` of `k`: from the best (blue) to the worst (red).
fn quantile_color(q: u32, k: u32) -> RGBColor {
    let t = if k <= 1 {
        0.0
    } else {
        f64::from(q) / f64::from(k - 1)
    };
    let (a, b) = ((0.0, 90.0, 180.0), (210.0, 50.0, 40.0));
    let mix = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Tick labels with a precision suited to the axis span (and no "-0.00").
fn format_tick(v: f64, span: f64) -> String {
    let decimals = if span < 0.02 {
        4
    } else if span < 0.5 {
        3
    } else if span < 5.0 {
        2
    } else if span < 50.0 {
        1
    } else {
        0
    };
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_owned()
    } else {
        s
    }
}

/// A padded range around `values` (never empty, even for one value).
fn padded(values: impl Iterator<Item = f64>, pad_frac: f64) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((a, b)) => Some((a.min(v), b.max(v))),
        })?;
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * pad_frac
    } else {
        (lo.abs() * 0.1).max(0.05)
    };
    Some((lo - pad, hi + pad))
}

/// The x range for points at `iterations`: padded, and centred on a lone iteration.
fn iteration_range(iterations: impl Iterator<Item = f64>) -> (f64, f64) {
    let its: Vec<f64> = iterations.filter(|v| v.is_finite()).collect();
    let lo = its.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = its.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if its.is_empty() {
        (-1.0, 1.0)
    } else if hi - lo < 1.0 {
        (lo - 1.0, hi + 1.0)
    } else {
        let pad = (hi - lo) * 0.08;
        (lo - pad, hi + pad)
    }
}

/// Keeps a y range of values known to lie in [0, 1] from showing ticks far outside.
fn clamp_unit(y: (f64, f64)) -> (f64, f64) {
    let margin = 0.015 * (y.1 - y.0);
    (y.0.max(-margin), y.1.min(1.0 + margin))
}

/// The models of the picture with their colours: each policy label in order of
/// appearance, then the reference (grey, drawn dashed).
struct Models {
    policies: Vec<(String, RGBColor)>,
    reference: bool,
}

impl Models {
    fn of(rows: &[EvalMetricsRow]) -> Self {
        let mut policies: Vec<(String, RGBColor)> = Vec::new();
        for r in rows.iter().filter(|r| r.model != REFERENCE_LABEL) {
            if !policies.iter().any(|(m, _)| *m == r.model) {
                let color = PALETTE[policies.len() % PALETTE.len()];
                policies.push((r.model.clone(), color));
            }
        }
        Self {
            policies,
            reference: rows.iter().any(|r| r.model == REFERENCE_LABEL),
        }
    }
}

const REFERENCE_LABEL: &str = "reference";

/// The metric the control curve shows: the task's headline one present in `rows`.
fn control_metric(rows: &[EvalMetricsRow]) -> Option<&'static str> {
    [
        metric::AVG_MAX_TOXICITY,
        metric::SHARE_POSITIVE,
        metric::DIVERSITY,
        metric::REWARD,
    ]
    .into_iter()
    .find(|m| rows.iter().any(|r| r.metric == *m && r.value.is_some()))
}

/// The control curve: the newest iteration that has a policy conditioned on another
/// token than 0, at those rows' samples per prompt; its rows (of `metric`) by token,
/// and the reference's at the same samples per prompt.
struct ControlCurve<'a> {
    metric: &'static str,
    iteration: u32,
    samples: u32,
    points: Vec<(u32, &'a EvalMetricsRow)>,
    reference: Option<&'a EvalMetricsRow>,
}

impl<'a> ControlCurve<'a> {
    fn of(rows: &'a [EvalMetricsRow]) -> Option<Self> {
        let metric = control_metric(rows)?;
        let of_metric = || rows.iter().filter(move |r| r.metric == metric);
        let newest = of_metric()
            .filter(|r| super::model_condition(&r.model).is_some_and(|k| k > 0))
            .max_by_key(|r| (r.iteration, r.samples_per_prompt))?;
        let (iteration, samples) = (newest.iteration?, newest.samples_per_prompt);
        let mut points: Vec<(u32, &EvalMetricsRow)> = of_metric()
            .filter(|r| r.iteration == Some(iteration) && r.samples_per_prompt == samples)
            .filter_map(|r| Some((super::model_condition(&r.model)?, r)))
            .collect();
        points.sort_by_key(|(k, _)| *k);
        let reference =
            of_metric().find(|r| r.model == REFERENCE_LABEL && r.samples_per_prompt == samples);
        Some(Self {
            metric,
            iteration,
            samples,
            points,
            reference,
        })
    }
}

/// The rows of the iteration panels: the samples per prompt whose policy rows cover
/// the most iterations (the larger count on a tie), and without the control curve's
/// other tokens when there is one.
fn iteration_rows(rows: &[EvalMetricsRow], control: bool) -> Vec<EvalMetricsRow> {
    let mut groups: Vec<(usize, u32)> = Vec::new();
    let mut counts: Vec<u32> = rows.iter().map(|r| r.samples_per_prompt).collect();
    counts.sort_unstable();
    counts.dedup();
    for n in counts {
        let mut its: Vec<u32> = rows
            .iter()
            .filter(|r| r.samples_per_prompt == n && r.model != REFERENCE_LABEL)
            .filter_map(|r| r.iteration)
            .collect();
        its.sort_unstable();
        its.dedup();
        groups.push((its.len(), n));
    }
    let Some(&(_, samples)) = groups.iter().max() else {
        return Vec::new();
    };
    rows.iter()
        .filter(|r| r.samples_per_prompt == samples)
        .filter(|r| !control || r.model == REFERENCE_LABEL || r.model == "policy")
        .cloned()
        .collect()
}

/// Draws the evaluation picture of `rows` (one task) with the pools' quantiles and
/// returns it as PNG bytes.
pub fn draw(task: &str, rows: &[EvalMetricsRow], pools: &[PoolPoint]) -> Result<Vec<u8>> {
    register()?;
    let control = ControlCurve::of(rows);
    let curve = iteration_rows(rows, control.is_some());
    let present = |m: &str| {
        curve
            .iter()
            .any(|r| r.metric == m && r.value.is_some_and(f64::is_finite))
    };
    let panels: Vec<&Panel> = PANELS
        .iter()
        .filter(|p| p.metrics.iter().any(|(m, _)| present(m)))
        .collect();
    let n = panels.len() + usize::from(!pools.is_empty()) + usize::from(control.is_some());
    let cols = match n {
        0..=3 => n.max(1),
        4 => 2,
        5 | 6 | 9 => 3,
        _ => 4,
    };
    let grid_rows = n.max(1).div_ceil(cols);
    let models = Models::of(&curve);

    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (header, body) = root.split_vertically(72);
        draw_header(&header, &title(task, &curve), &models)?;
        let areas = body.split_evenly((grid_rows, cols));
        let mut areas = areas.iter();
        if !pools.is_empty() {
            if let Some(area) = areas.next() {
                draw_pools(area, pools)?;
            }
        }
        if let Some(c) = &control {
            if let Some(area) = areas.next() {
                draw_control(area, c)?;
            }
        }
        for (panel, area) in panels.iter().zip(areas) {
            draw_panel(area, panel, &curve, &models)?;
        }
        root.present().map_err(err)?;
    }
    encode_png(&buf)
}

/// The picture's title: the task and the models evaluated.
fn title(task: &str, rows: &[EvalMetricsRow]) -> String {
    let policy_its: Vec<u32> = rows
        .iter()
        .filter(|r| r.model != REFERENCE_LABEL)
        .filter_map(|r| r.iteration)
        .collect();
    let span = match (policy_its.iter().min(), policy_its.iter().max()) {
        (Some(a), Some(b)) if a == b => format!(": the policy at iteration {a}"),
        (Some(a), Some(b)) => format!(": the policy over iterations {a}-{b}"),
        _ => String::new(),
    };
    let reference = match (
        span.is_empty(),
        rows.iter().any(|r| r.model == REFERENCE_LABEL),
    ) {
        (true, true) => ": the reference model",
        (false, true) => " against the reference",
        _ => "",
    };
    let samples = rows.first().map_or(String::new(), |r| {
        format!(", {} samples per prompt", r.samples_per_prompt)
    });
    format!("Quark evaluation, {task} task{span}{reference}{samples}")
}

/// The title and, below it, one legend for every panel: a line and point per policy,
/// a dashed line for the reference.
fn draw_header(area: &Area, title: &str, models: &Models) -> Result<()> {
    let (w, _) = area.dim_in_pixel();
    let title_style = (FAMILY, 26)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    area.draw(&Text::new(title, (w as i32 / 2, 8), title_style))
        .map_err(err)?;
    let label = (FAMILY, 15).into_font().color(&BLACK);
    let mut entries: Vec<(String, RGBColor, bool)> = models
        .policies
        .iter()
        .map(|(m, c)| (m.clone(), *c, false))
        .collect();
    if models.reference {
        entries.push((
            "reference (dashed, its 95% interval shaded; bars: 95% intervals)".to_owned(),
            REFERENCE,
            true,
        ));
    }
    let widths: Vec<i32> = entries
        .iter()
        .map(|(t, _, _)| {
            let (tw, _) = area.estimate_text_size(t, &label).unwrap_or((100, 15));
            36 + tw as i32 + 28
        })
        .collect();
    let mut x = (w as i32 - widths.iter().sum::<i32>()) / 2;
    let y = 52;
    for ((text, color, dashed), width) in entries.iter().zip(widths) {
        let style = color.stroke_width(3);
        if *dashed {
            area.draw(&PathElement::new(vec![(x, y), (x + 10, y)], style))
                .map_err(err)?;
            area.draw(&PathElement::new(vec![(x + 20, y), (x + 30, y)], style))
                .map_err(err)?;
            area.draw(&Circle::new((x + 15, y), 4, color.stroke_width(2)))
                .map_err(err)?;
        } else {
            area.draw(&PathElement::new(vec![(x, y), (x + 30, y)], style))
                .map_err(err)?;
            area.draw(&Circle::new((x + 15, y), 4, color.filled()))
                .map_err(err)?;
        }
        let text_style = label.clone().pos(Pos::new(HPos::Left, VPos::Center));
        area.draw(&Text::new(text.as_str(), (x + 36, y), text_style))
            .map_err(err)?;
        x += width;
    }
    Ok(())
}

fn encode_png(rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(err)?;
    writer.write_image_data(rgb).map_err(err)?;
    writer.finish().map_err(err)?;
    Ok(out)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn int_ticks(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// A chart with the common look: caption, light grid, axis descriptions.
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    x: (f64, f64),
    y: (f64, f64),
    x_desc: &str,
    y_desc: &str,
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 17).into_font())
        .margin(8)
        .margin_right(14)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x.0..x.1, y.0..y.1)
        .map_err(err)?;
    let span = y.1 - y.0;
    let n_iterations = (x.1 - x.0).floor() as usize + 1;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .x_labels(n_iterations.clamp(2, 12))
        .y_labels(6)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&int_ticks)
        .y_label_formatter(&|v| format_tick(*v, span))
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// A short text at a data point, `dx`/`dy` pixels away, anchored by `anchor`.
fn label_at(
    chart: &mut Chart,
    at: (f64, f64),
    text: String,
    color: RGBColor,
    anchor: HPos,
    dx: i32,
) -> Result<()> {
    let style = (FAMILY, 11)
        .into_font()
        .color(&color)
        .pos(Pos::new(anchor, VPos::Bottom));
    chart
        .draw_series(std::iter::once(
            EmptyElement::at(at) + Text::new(text, (dx, -4), style),
        ))
        .map_err(err)?;
    Ok(())
}

fn draw_pools(area: &Area, pools: &[PoolPoint]) -> Result<()> {
    let mut pools = pools.to_vec();
    pools.sort_by_key(|p| p.iteration);
    let k = pools
        .iter()
        .flat_map(|p| p.quantiles.iter().map(|q| q.quantile + 1))
        .max()
        .unwrap_or(1);
    let x = iteration_range(pools.iter().map(|p| f64::from(p.iteration)));
    let y = padded(
        pools
            .iter()
            .flat_map(|p| p.quantiles.iter().map(|q| q.mean_reward)),
        0.15,
    )
    .unwrap_or((0.0, 1.0));
    let mut chart = chart(
        area,
        "Pool: mean reward of each quantile",
        x,
        y,
        "iteration the pool was built in",
        "mean reward",
    )?;
    for q in 0..k {
        let points: Vec<(f64, f64)> = pools
            .iter()
            .filter_map(|p| {
                p.quantiles
                    .iter()
                    .find(|s| s.quantile == q)
                    .map(|s| (f64::from(p.iteration), s.mean_reward))
            })
            .collect();
        let Some(&last) = points.last() else {
            continue;
        };
        let color = quantile_color(q, k);
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
        let name = match q {
            0 => format!("q{q} best"),
            q if q + 1 == k => format!("q{q} worst"),
            q => format!("q{q}"),
        };
        label_at(&mut chart, last, name, color, HPos::Right, -2)?;
    }
    Ok(())
}

fn draw_panel(area: &Area, panel: &Panel, rows: &[EvalMetricsRow], models: &Models) -> Result<()> {
    let in_panel: Vec<&EvalMetricsRow> = rows
        .iter()
        .filter(|r| panel.metrics.iter().any(|(m, _)| *m == r.metric))
        .filter(|r| r.value.is_some_and(f64::is_finite))
        .collect();
    let iterations = in_panel.iter().filter_map(|r| r.iteration).map(f64::from);
    let x = iteration_range(iterations);
    let y = padded(in_panel.iter().flat_map(|r| extent(r)), 0.15).unwrap_or((0.0, 1.0));
    let y = if panel.unit { clamp_unit(y) } else { y };
    let mut chart = chart(area, panel.title, x, y, "iteration", panel.y_label)?;
    // Several metrics in one panel (dist-n, rep-n) share the model's colour and are
    // told apart by a label at the end of each line.
    let grouped = panel.metrics.len() > 1;
    let mut reference_labels: Vec<(f64, f64, &str)> = Vec::new();
    for (metric, legend_name) in panel.metrics {
        // Reference: a dashed line across the panel at its value, and a hollow point
        // at the iteration it was sampled in (where the policies start from).
        for r in in_panel
            .iter()
            .filter(|r| r.model == REFERENCE_LABEL && r.metric == *metric)
        {
            let v = r.value.unwrap_or_default();
            reference_line(&mut chart, r, x)?;
            if let Some(i) = r.iteration {
                chart
                    .draw_series(std::iter::once(Circle::new(
                        (f64::from(i), v),
                        4,
                        REFERENCE.stroke_width(2),
                    )))
                    .map_err(err)?;
            }
            if grouped {
                reference_labels.push((r.iteration.map_or(x.0, f64::from), v, *legend_name));
            }
        }
        for (policy, color) in &models.policies {
            let mut points: Vec<(f64, f64)> = in_panel
                .iter()
                .filter(|r| r.model == *policy && r.metric == *metric)
                .filter_map(|r| Some((f64::from(r.iteration?), r.value?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let Some(&last) = points.last() else {
                continue;
            };
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err)?;
            let bars = in_panel
                .iter()
                .filter(|r| r.model == *policy && r.metric == *metric)
                .filter_map(|r| Some((f64::from(r.iteration?), r.value?, r.ci_low?, r.ci_high?)));
            error_bars(&mut chart, bars, *color)?;
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
            if grouped {
                let label = (*legend_name).to_owned();
                label_at(&mut chart, last, label, *color, HPos::Right, -6)?;
            }
        }
    }
    // Beside the reference's own point, away from the policies' line ends; values
    // that nearly coincide (rep-3 and rep-4 both 0) share one label.
    reference_labels.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut merged: Vec<(f64, f64, String)> = Vec::new();
    for (at_x, v, name) in reference_labels {
        match merged.last_mut() {
            Some(last) if (v - last.1).abs() < 0.04 * (y.1 - y.0) => {
                last.2.push_str(", ");
                last.2.push_str(name);
            }
            _ => merged.push((at_x, v, name.to_owned())),
        }
    }
    for (at_x, v, text) in merged {
        label_at(&mut chart, (at_x, v), text, REFERENCE, HPos::Left, 7)?;
    }
    Ok(())
}

/// A row's value and interval ends: what its panel's y range must hold.
fn extent(r: &EvalMetricsRow) -> impl Iterator<Item = f64> {
    [r.value, r.ci_low, r.ci_high].into_iter().flatten()
}

/// 95% intervals as vertical bars with caps at (x, value, low, high).
fn error_bars(
    chart: &mut Chart,
    bars: impl Iterator<Item = (f64, f64, f64, f64)>,
    color: RGBColor,
) -> Result<()> {
    chart
        .draw_series(
            bars.map(|(x, v, lo, hi)| {
                ErrorBar::new_vertical(x, lo, v, hi, color.stroke_width(1), 8)
            }),
        )
        .map_err(err)?;
    Ok(())
}

/// The reference's value as a dashed line across the panel, in a light band of its
/// 95% interval.
fn reference_line(chart: &mut Chart, r: &EvalMetricsRow, x: (f64, f64)) -> Result<()> {
    if let (Some(lo), Some(hi)) = (r.ci_low, r.ci_high) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x.0, lo), (x.1, hi)],
                REFERENCE.mix(0.12).filled(),
            )))
            .map_err(err)?;
    }
    if let Some(v) = r.value {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x.0, v), (x.1, v)],
                10,
                6,
                REFERENCE.stroke_width(2),
            ))
            .map_err(err)?;
    }
    Ok(())
}

/// The control curve: the policy's metric at each quantile token, with its
/// intervals, against the reference at the same samples per prompt.
fn draw_control(area: &Area, c: &ControlCurve) -> Result<()> {
    let k_max = c.points.iter().map(|(k, _)| *k).max().unwrap_or(0);
    let x = (-0.5, f64::from(k_max) + 0.5);
    let y = padded(
        c.points
            .iter()
            .map(|(_, r)| *r)
            .chain(c.reference)
            .flat_map(extent),
        0.15,
    )
    .unwrap_or((0.0, 1.0));
    let unit = c.metric != metric::REWARD;
    let y = if unit { clamp_unit(y) } else { y };
    let caption = format!(
        "Control curve: {} (iteration {}, {}/prompt)",
        c.metric.replace('_', " "),
        c.iteration,
        c.samples
    );
    let mut chart = chart(
        area,
        &caption,
        x,
        y,
        "quantile token k (0 = best reward)",
        "value at <|quark:k|>",
    )?;
    if let Some(r) = c.reference {
        reference_line(&mut chart, r, x)?;
        if let Some(v) = r.value {
            label_at(
                &mut chart,
                (x.0, v),
                "reference".to_owned(),
                REFERENCE,
                HPos::Left,
                4,
            )?;
        }
    }
    let points: Vec<(f64, f64)> = c
        .points
        .iter()
        .filter_map(|(k, r)| Some((f64::from(*k), r.value?)))
        .collect();
    let color = PALETTE[0];
    chart
        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
        .map_err(err)?;
    let bars = c
        .points
        .iter()
        .filter_map(|(k, r)| Some((f64::from(*k), r.value?, r.ci_low?, r.ci_high?)));
    error_bars(&mut chart, bars, color)?;
    let k_total = k_max + 1;
    chart
        .draw_series(
            c.points
                .iter()
                .filter_map(|(k, r)| Some((*k, r.value?)))
                .map(|(k, v)| {
                    Circle::new((f64::from(k), v), 5, quantile_color(k, k_total).filled())
                }),
        )
        .map_err(err)?;
    Ok(())
}
