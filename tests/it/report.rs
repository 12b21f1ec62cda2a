//! `ifloom report` opened in a real browser: headless Chromium loads the file, the page's own
//! check records how many charts have a non-zero size with drawn marks and how many script
//! errors happened, and a screenshot is taken.
//!
//! Needs Debian's `chromium` (`.ci/run` installs it). Without it the test says so and passes,
//! unless IFLOOM_REQUIRE_BROWSER=1 (set by CI), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{ok, root};
use crate::ultraif::{fixture, run_ultraif, s};

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn browser(bin: &Path, profile: &Path, extra: &[String], page: &Path) -> (String, String) {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("start chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn attr(dom: &str, name: &str) -> Option<usize> {
    let at = dom.find(&format!("{name}=\""))? + name.len() + 2;
    dom[at..].split('"').next()?.parse().ok()
}

#[test]
fn report_renders_its_charts_in_headless_chromium() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var("IFLOOM_REQUIRE_BROWSER").is_err(),
            "IFLOOM_REQUIRE_BROWSER is set but chromium is not installed"
        );
        eprintln!("skipped: chromium not installed (apt-get install chromium)");
        return;
    };
    let f = fixture();
    let run = run_ultraif(&f, "run", &[]);
    let page = f.dir.join("report.html");
    ok(&root(), &["report", s(&run), "-o", s(&page)]);
    let html = std::fs::read_to_string(&page).unwrap();
    // Self-contained: nothing is fetched from anywhere.
    for remote in ["http://", "https://", "src=", "@import"] {
        let hits: Vec<&str> = html
            .match_indices(remote)
            .map(|(i, _)| &html[i.saturating_sub(30)..(i + 40).min(html.len())])
            .filter(|ctx| !ctx.contains("xmlns=\"http://www.w3.org/2000/svg\""))
            .collect();
        assert!(hits.is_empty(), "{remote} in the report: {hits:?}");
    }
    // Funnel, contamination per benchmark, pass rates by round, by category, by question,
    // tokens; for each of the 4 llm
    // stages (compose_r1, compose_r2, responses, judge) a latency and an output-length
    // histogram; questions per judged response.
    let charts = html.matches("<svg class=\"chart\"").count();
    assert_eq!(charts, 6 + 4 * 2 + 1, "charts in the page");
    assert!(html.contains("Funnel: rows per stage") && html.contains("latency (ms)"));
    assert!(
        html.contains("GOOD: gold light over the hills?"),
        "sample rows are shown"
    );

    let profile = f.dir.join("chromium-profile");
    let (dom, log) = browser(&bin, &profile, &["--dump-dom".into()], &page);
    assert_eq!(
        attr(&dom, "data-charts"),
        Some(charts),
        "{}",
        &dom[..dom.len().min(400)]
    );
    assert_eq!(
        attr(&dom, "data-charts-rendered"),
        Some(charts),
        "charts with a size and drawn marks"
    );
    assert_eq!(attr(&dom, "data-errors"), Some(0));
    assert!(!log.contains("Uncaught"), "console errors: {log}");

    let shot = f.dir.join("report.png");
    let (_, log) = browser(
        &bin,
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1200,2400".into(),
        ],
        &page,
    );
    assert!(!log.contains("Uncaught"), "console errors: {log}");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1200, 2400));
    if let Ok(keep) = std::env::var("IFLOOM_KEEP_REPORT") {
        std::fs::copy(&shot, Path::new(&keep).with_extension("png")).unwrap();
        std::fs::copy(&page, Path::new(&keep).with_extension("html")).unwrap();
    }
}
