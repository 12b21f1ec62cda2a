//! `ifloom report`: one self-contained HTML file with the figures of `ifloom stats` as charts
//! and tables, plus a few sample rows of every stage to eyeball quality.
//!
//! Charts are inline SVG written here rather than by a plotting crate: they are bars and
//! histograms, the file must open with no network and no fonts to fetch, and text in SVG is
//! laid out by the browser, so nothing needs measuring on our side. Every chart has a title,
//! axis labels with units and a `<title>` tooltip on each mark.
//!
//! The page carries a small script that checks its own charts once loaded (each `svg.chart`
//! has a non-zero size and at least one mark) and records the result, and any script error,
//! as attributes of `<body>`, so a headless browser can verify the rendering from the DOM.

use std::fmt::Write as _;

use serde_json::Value;

use crate::engine::Engine;
use crate::error::Result;
use crate::module::{self, Chart};
use crate::stats::{self, Histogram, Section, Stats};
use crate::store::RunDir;

/// HTML-escape text.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const PALETTE: &[&str] = &["#3b6fb6", "#e08a2c", "#4a9e5c", "#b6453b", "#7d5bb6"];

/// Round axis maximum and tick step for values up to `max`.
fn axis(max: f64) -> (f64, f64) {
    if max <= 0.0 {
        return (1.0, 0.25);
    }
    let mag = 10f64.powf(max.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 5.0)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_num(v: f64, percent: bool) -> String {
    if percent {
        return format!("{:.0}%", v * 100.0);
    }
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A horizontal bar chart: one row per label, one bar per series.
pub fn hbar(
    title: &str,
    value_label: &str,
    series: &[&str],
    rows: &[(String, Vec<f64>)],
    percent: bool,
) -> String {
    let (left, right, top, row_h) = (190.0, 30.0, 46.0, 12.0 * series.len() as f64 + 10.0);
    let width = 760.0;
    let plot_w = width - left - right;
    let height = top + row_h * rows.len().max(1) as f64 + 56.0;
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max);
    let (amax, step) = if percent { (1.0, 0.25) } else { axis(max) };
    let x = |v: f64| left + plot_w * (v / amax).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}"><text class="title" x="{cx}" y="20" text-anchor="middle">{t}</text>"#,
        t = esc(title),
        cx = width / 2.0
    );
    let bottom = height - 40.0;
    let mut v = 0.0;
    while v <= amax + 1e-9 {
        let _ = write!(
            s,
            r##"<line x1="{0}" y1="{top}" x2="{0}" y2="{bottom}" stroke="#ddd"/><text class="tick" x="{0}" y="{1}" text-anchor="middle">{2}</text>"##,
            x(v),
            bottom + 14.0,
            fmt_num(v, percent)
        );
        v += step;
    }
    for (i, (label, vals)) in rows.iter().enumerate() {
        let y0 = top + row_h * i as f64;
        let _ = write!(
            s,
            r#"<text class="label" x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y0 + row_h / 2.0 + 4.0,
            esc(&truncate(label, 28))
        );
        for (j, v) in vals.iter().enumerate() {
            let y = y0 + 5.0 + 12.0 * j as f64;
            let _ = write!(
                s,
                r#"<rect class="mark" x="{left}" y="{y}" width="{:.1}" height="10" fill="{}"><title>{}: {} {}</title></rect>"#,
                (x(*v) - left).max(0.5),
                PALETTE[j % PALETTE.len()],
                esc(label),
                esc(series.get(j).copied().unwrap_or("")),
                fmt_num(*v, percent)
            );
        }
    }
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#555"/><text class="axis" x="{}" y="{}" text-anchor="middle">{}</text>"##,
        left + plot_w,
        left + plot_w / 2.0,
        height - 8.0,
        esc(value_label)
    );
    s.push_str(&legend(series, width - right, 34.0));
    s.push_str("</svg>");
    s
}

fn legend(series: &[&str], right: f64, y: f64) -> String {
    if series.len() < 2 {
        return String::new();
    }
    let mut s = String::new();
    let mut x = right;
    for (j, name) in series.iter().enumerate().rev() {
        x -= 14.0 + 7.0 * name.len() as f64;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{}" width="10" height="10" fill="{}"/><text class="tick" x="{}" y="{y}">{}</text>"#,
            y - 9.0,
            PALETTE[j % PALETTE.len()],
            x + 13.0,
            esc(name)
        );
    }
    s
}

/// A histogram: vertical bars over numeric bins of width `bucket`.
pub fn histogram(
    title: &str,
    x_label: &str,
    y_label: &str,
    bucket: i64,
    bins: &[(i64, i64)],
) -> String {
    let (left, right, top, bottom_pad) = (64.0, 24.0, 40.0, 50.0);
    let (width, height) = (760.0, 300.0);
    let plot_w = width - left - right;
    let bottom = height - bottom_pad;
    let lo = bins.first().map_or(0, |b| b.0);
    let hi = bins.last().map_or(bucket, |b| b.0 + bucket);
    let span = ((hi - lo) as f64).max(1.0);
    let x = |v: i64| left + plot_w * ((v - lo) as f64 / span);
    let max = bins.iter().map(|b| b.1).max().unwrap_or(0) as f64;
    let (amax, step) = axis(max);
    let y = |v: f64| bottom - (bottom - top) * (v / amax);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{t}"><text class="title" x="{cx}" y="20" text-anchor="middle">{t}</text>"#,
        t = esc(title),
        cx = width / 2.0
    );
    let mut v = 0.0;
    while v <= amax + 1e-9 {
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text class="tick" x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
            y(v),
            left + plot_w,
            left - 6.0,
            y(v) + 4.0,
            fmt_num(v, false)
        );
        v += step;
    }
    for (from, n) in bins {
        let (x0, x1) = (x(*from), x(from + bucket));
        let _ = write!(
            s,
            r##"<rect class="mark" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#3b6fb6"><title>{}–{}: {}</title></rect>"##,
            x0 + 0.5,
            y(*n as f64),
            (x1 - x0 - 1.0).max(0.5),
            bottom - y(*n as f64),
            from,
            from + bucket,
            n
        );
    }
    // About 6 tick labels on the x axis, at bin edges.
    let nbins = ((hi - lo) / bucket.max(1)).max(1);
    let every = (nbins as f64 / 6.0).ceil().max(1.0) as i64;
    let mut e = lo;
    while e <= hi {
        let _ = write!(
            s,
            r#"<text class="tick" x="{}" y="{}" text-anchor="middle">{}</text>"#,
            x(e),
            bottom + 14.0,
            fmt_num(e as f64, false)
        );
        e += bucket * every;
    }
    let _ = write!(
        s,
        r##"<line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="#555"/><text class="axis" x="{}" y="{}" text-anchor="middle">{}</text><text class="axis" transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text></svg>"##,
        left + plot_w,
        left + plot_w / 2.0,
        height - 10.0,
        esc(x_label),
        (top + bottom) / 2.0,
        esc(y_label)
    );
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn col<'a>(sec: &Section, row: &'a [Value], name: &str) -> Option<&'a Value> {
    sec.columns
        .iter()
        .position(|c| c == name)
        .and_then(|i| row.get(i))
}

fn num(sec: &Section, row: &[Value], name: &str) -> f64 {
    col(sec, row, name).and_then(Value::as_f64).unwrap_or(0.0)
}

fn text(sec: &Section, row: &[Value], name: &str) -> String {
    match col(sec, row, name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "<span class=\"null\">null</span>".into(),
        Value::String(s) => esc(&truncate(s, 400)),
        other => esc(&truncate(&other.to_string(), 400)),
    }
}

fn html_table(columns: &[String], rows: &[Vec<Value>]) -> String {
    let mut s = String::from("<div class=\"scroll\"><table><thead><tr>");
    for c in columns {
        let _ = write!(s, "<th>{}</th>", esc(c));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for v in r {
            let _ = write!(s, "<td>{}</td>", cell(v));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

const RATES: &[(&str, &str)] = &[
    ("sft_pass_rate", "SFT pass rate"),
    ("dpo_pass_rate", "DPO pass rate"),
    ("response_pass_rate", "response pass rate"),
];

/// The core's charts drawn before the modules' (see [`crate::module::Module::charts`]).
const FIRST: &[Chart] = &[
    Chart {
        section: "funnel",
        unless: None,
        title: "Funnel: rows per stage",
        axis: "rows",
        label: "{stage}",
        series: &[("rows_out", "rows")],
        percent: false,
    },
    Chart {
        section: "contamination",
        unless: None,
        title: "Contamination removed per benchmark",
        axis: "rows",
        label: "{stage} {reference}",
        series: &[
            ("ngram_rows", "shared n-gram"),
            ("near_dup_rows", "near duplicate"),
        ],
        percent: false,
    },
    Chart {
        section: "pass_by_round",
        unless: None,
        title: "Pass rates by augmentation round",
        axis: "share of instructions / responses (%)",
        label: "{table} round {round}",
        series: RATES,
        percent: true,
    },
    Chart {
        section: "pass_rates",
        unless: Some("pass_by_round"),
        title: "Pass rates",
        axis: "share of instructions / responses (%)",
        label: "{table}",
        series: RATES,
        percent: true,
    },
    Chart {
        section: "pass_by_category",
        unless: None,
        title: "Pass rate by constraint category",
        axis: "share of YES answers (%)",
        label: "{category}",
        series: &[("pass_rate", "pass rate")],
        percent: true,
    },
    Chart {
        section: "pass_by_question",
        unless: None,
        title: "Pass rate by evaluation question",
        axis: "share of YES answers (%)",
        label: "question {question}",
        series: &[("pass_rate", "pass rate")],
        percent: true,
    },
];

/// The core's charts drawn after the modules'.
const LAST: &[Chart] = &[Chart {
    section: "llm",
    unless: None,
    title: "Token totals per LLM stage",
    axis: "tokens",
    label: "{stage}",
    series: &[
        ("prompt_tokens", "prompt"),
        ("completion_tokens", "completion"),
    ],
    percent: false,
}];

/// One declared chart of the run's figures; `None` when the run lacks its section.
fn draw(st: &Stats, chart: &Chart) -> Option<String> {
    let sec = st.section(chart.section)?;
    if chart.unless.is_some_and(|u| st.section(u).is_some()) {
        return None;
    }
    let rows: Vec<(String, Vec<f64>)> = sec
        .rows
        .iter()
        .map(|r| {
            (
                module::label(chart.label, |c| text(sec, r, c)),
                chart.series.iter().map(|(c, _)| num(sec, r, c)).collect(),
            )
        })
        .collect();
    let names: Vec<&str> = chart.series.iter().map(|(_, n)| *n).collect();
    Some(hbar(chart.title, chart.axis, &names, &rows, chart.percent))
}

/// The charts of a run's figures: the core's, each module's, then the histograms.
pub fn charts(st: &Stats) -> Vec<String> {
    let modules = crate::registry::modules()
        .iter()
        .flat_map(|m| m.charts.iter());
    let mut out: Vec<String> = FIRST
        .iter()
        .chain(modules)
        .chain(LAST)
        .filter_map(|c| draw(st, c))
        .collect();
    for h in &st.histograms {
        out.push(hist_chart(h));
    }
    out
}

fn hist_chart(h: &Histogram) -> String {
    let (title, x, y) = match h.unit.as_str() {
        "ms" => (
            format!("Latency of {} (requests sent)", h.table),
            "latency (ms)",
            "requests",
        ),
        "items" => (
            format!("{}.{}: items per row", h.table, h.column),
            "items",
            "rows",
        ),
        _ => (
            format!("{}.{}: length", h.table, h.column),
            "length (characters)",
            "rows",
        ),
    };
    histogram(&title, x, y, h.bucket, &h.bins)
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}\
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}\
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top;max-width:420px;white-space:pre-wrap;word-break:break-word}\
th{background:#f3f3f3}.scroll{overflow-x:auto}.null{color:#999}.q{color:#777;font-size:12px}\
svg.chart{display:block;margin:12px 0;background:#fff}svg .title{font-size:15px;font-weight:600}svg .tick{font-size:11px;fill:#555}svg .label{font-size:12px}svg .axis{font-size:12px;fill:#333}";

/// Checks the page's own charts once loaded; results go to attributes of `<body>`.
const CHECK: &str = "window.__ifloomErrors=[];window.addEventListener('error',function(e){window.__ifloomErrors.push(String(e.message))});\
window.addEventListener('load',function(){var s=document.querySelectorAll('svg.chart'),ok=0;\
for(var i=0;i<s.length;i++){var r=s[i].getBoundingClientRect(),m=s[i].querySelectorAll('.mark'),drawn=0;\
for(var j=0;j<m.length;j++){var b=m[j].getBoundingClientRect();if(b.width>0&&b.height>0)drawn++}\
if(r.width>0&&r.height>0&&drawn>0)ok++}\
document.body.setAttribute('data-charts',String(s.length));document.body.setAttribute('data-charts-rendered',String(ok));\
document.body.setAttribute('data-errors',String(window.__ifloomErrors.length));});";

/// Sample rows of every stage: `(table, columns, rows)`.
pub type Samples = Vec<(String, Vec<String>, Vec<Vec<Value>>)>;

/// The first `n` rows of every table of the run (side tables included).
pub fn samples(dir: &RunDir, n: usize) -> Result<Samples> {
    let mut out = Vec::new();
    for (t, _) in dir.tables()? {
        // The first rows in part order: a `LIMIT` over a table of several parts returned
        // whichever part a thread read first, so two reports of one run could differ.
        let mut batches = Vec::new();
        let mut left = n;
        for b in crate::table::read_batches(&t.files) {
            if left == 0 {
                break;
            }
            let b = b?;
            let take = left.min(b.num_rows());
            batches.push(b.slice(0, take));
            left -= take;
        }
        let (cols, rows) = stats::json_rows(&batches)?;
        let cols = if cols.is_empty() {
            t.schema.fields().iter().map(|f| f.name().clone()).collect()
        } else {
            cols
        };
        out.push((t.id.clone(), cols, rows));
    }
    Ok(out)
}

/// The whole page.
pub fn render(st: &Stats, samples: &Samples) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ifloom report: {run}</title><style>{STYLE}</style><script>{CHECK}</script></head><body><h1>ifloom report</h1><p>Run <code>{run}</code>. Every figure below is a query of <code>sql/</code> over the run's tables; the one behind each table is named under it (<code>ifloom sql --run RUN -f sql/FILE --param k=v</code>).</p>",
        run = esc(&st.run)
    );
    s.push_str("<h2>Charts</h2>");
    for c in charts(st) {
        s.push_str(&c);
    }
    s.push_str("<h2>Figures</h2>");
    for sec in &st.sections {
        let _ = write!(s, "<h3>{}</h3>", esc(&sec.title));
        s.push_str(&html_table(&sec.columns, &sec.rows));
        let _ = write!(s, "<p class=\"q\">{}</p>", esc(&sec.queries.join("; ")));
    }
    s.push_str("<h2>Sample rows</h2>");
    for (t, cols, rows) in samples {
        let _ = write!(s, "<h3>{}</h3>", esc(t));
        if rows.is_empty() {
            s.push_str("<p>(no rows)</p>");
        } else {
            s.push_str(&html_table(cols, rows));
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// Compute the figures and samples of a run and render the page.
pub fn build(
    engine: &Engine,
    dir: &RunDir,
    opts: &stats::Options,
    sample_rows: usize,
) -> Result<String> {
    let st = stats::compute_blocking(engine, dir, opts)?;
    let sm = samples(dir, sample_rows)?;
    Ok(render(&st, &sm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round_and_cover_the_maximum() {
        assert_eq!(axis(7.0), (8.0, 2.0));
        assert_eq!(axis(49.0), (50.0, 10.0));
        assert_eq!(axis(1234.0), (1250.0, 250.0));
        let (m, s) = axis(0.3);
        assert!(m >= 0.3 && s > 0.0);
    }

    #[test]
    fn charts_escape_text_and_draw_one_mark_per_value() {
        let svg = hbar(
            "a <b>",
            "rows",
            &["x", "y"],
            &[("s&t".into(), vec![1.0, 2.0])],
            false,
        );
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("s&amp;t"));
        assert_eq!(svg.matches("class=\"mark\"").count(), 2);
        let h = histogram("h", "ms", "requests", 5, &[(0, 1), (10, 4)]);
        assert_eq!(h.matches("class=\"mark\"").count(), 2);
        assert!(h.contains("<title>10–15: 4</title>"));
    }
}
