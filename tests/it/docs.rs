//! The documentation: README.md and the book under `docs/src/` (built by `mdbook build docs`).
//!
//! `check` reads every page and reports, as `file:line: problem`:
//! - a relative link (`[text](path)`, `[text](path#anchor)`, `[text](#anchor)`) whose file does
//!   not exist, or whose `#anchor` names no heading of a Markdown target;
//! - a link from a book page that leaves `docs/src/` (mdBook renders only its own pages; such a
//!   file is pulled in with `{{#include ...}}`, whose path must exist too);
//! - a path named anywhere on a page (text, code span or code block) that starts with
//!   `pipelines/`, `sql/`, `src/`, `benches/`, `scripts/`, `data/` or `tests/` and does not
//!   exist in the repository (`*` and placeholders such as `<name>` are globs, which must match
//!   something);
//! - a page under `docs/src/` that `SUMMARY.md` does not list;
//! - a README of more than 400 lines.
//!
//! The first test runs it on the repository; the second on a small tree with one mistake of
//! each sort, so the checker itself is shown to find them.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use regex::Regex;

use crate::common::root;

/// The README's ceiling (issue 31: the rest of the documentation lives in the book).
const README_MAX_LINES: usize = 400;

/// Path prefixes that name files of the repository.
const PATH_PREFIXES: &[&str] = &[
    "pipelines",
    "sql",
    "src",
    "benches",
    "scripts",
    "data",
    "tests",
];

/// One line of a page, with whether it sits inside a fenced code block.
struct Line<'a> {
    number: usize,
    text: &'a str,
    in_code: bool,
}

/// The lines of a Markdown text, fenced code blocks (``` or ~~~, any length) marked.
fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut fence: Option<String> = None;
    for (i, text) in text.lines().enumerate() {
        let trimmed = text.trim_start();
        let marker: String = trimmed
            .chars()
            .take_while(|&c| c == '`' || c == '~')
            .collect();
        let is_fence =
            marker.len() >= 3 && marker.chars().all(|c| c == marker.as_bytes()[0] as char);
        match &fence {
            Some(open) => {
                let closes = is_fence
                    && marker.starts_with(open.as_str())
                    && trimmed[marker.len()..].trim().is_empty();
                out.push(Line {
                    number: i + 1,
                    text,
                    in_code: true,
                });
                if closes {
                    fence = None;
                }
            }
            None => {
                if is_fence {
                    fence = Some(marker);
                    out.push(Line {
                        number: i + 1,
                        text,
                        in_code: true,
                    });
                } else {
                    out.push(Line {
                        number: i + 1,
                        text,
                        in_code: false,
                    });
                }
            }
        }
    }
    out
}

/// A line with its inline code spans blanked out (links inside code are not links).
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '`' {
            let run = chars[i..].iter().take_while(|&&c| c == '`').count();
            // Find the closing run of exactly the same length.
            let mut j = i + run;
            let mut closed = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let r = chars[j..].iter().take_while(|&&c| c == '`').count();
                    if r == run {
                        closed = Some(j + r);
                        break;
                    }
                    j += r;
                } else {
                    j += 1;
                }
            }
            match closed {
                Some(end) => {
                    out.extend(std::iter::repeat_n(' ', end - i));
                    i = end;
                }
                None => {
                    out.extend(&chars[i..i + run]);
                    i += run;
                }
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The anchor mdBook and GitHub give a heading: lower case, letters, digits, `_` and `-`
/// kept, spaces turned into `-`, everything else dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '_' || c == '-' {
                Some(c.to_lowercase().collect::<String>())
            } else if c.is_whitespace() {
                Some("-".to_string())
            } else {
                None
            }
        })
        .collect()
}

/// Every anchor of a Markdown text (a repeated heading gets `-1`, `-2`, ... as on GitHub).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for line in lines(text).into_iter().filter(|l| !l.in_code) {
        let t = line.text.trim_start();
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !t[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(t[hashes..].trim().trim_end_matches('#'));
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

/// `a/b/../c` → `a/c` (no filesystem access; the result may not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Does `pattern` (relative to `root`; `*`, `?` and `<placeholder>` as wildcards) name at
/// least one existing file or folder?
fn exists_or_matches(root: &Path, pattern: &str) -> bool {
    let placeholder = Regex::new(r"<[^<>/]*>").unwrap();
    let pattern = placeholder.replace_all(pattern, "*");
    if !pattern.contains(['*', '?']) {
        return root.join(pattern.as_ref()).exists();
    }
    let full = format!("{}/{}", root.display(), pattern);
    glob::glob(&full).is_ok_and(|mut paths| paths.any(|p| p.is_ok()))
}

/// The pages checked: README.md and every `.md` under `docs/src/`, as paths relative to root.
fn pages(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = vec![PathBuf::from("README.md")];
    walk(&root.join("docs/src"), root, &mut out);
    out
}

/// Every problem of the documentation under `root`, as `file:line: what`.
pub fn check(root: &Path) -> Vec<String> {
    let link = Regex::new(r#"\]\(\s*<?([^()\s<>]+)>?(?:\s+"[^"]*")?\s*\)"#).unwrap();
    let include = Regex::new(r"\{\{#(?:include|rustdoc_include)\s+([^}:\s]+)[^}]*\}\}").unwrap();
    let path_token = Regex::new(&format!(
        r"(?:^|[^A-Za-z0-9_./~-])((?:{})/[A-Za-z0-9_.*?<>/-]*)",
        PATH_PREFIXES.join("|")
    ))
    .unwrap();
    let book = Path::new("docs/src");
    let mut problems = Vec::new();
    let mut anchor_cache: HashMap<PathBuf, BTreeSet<String>> = HashMap::new();
    let mut anchors_of = |file: &Path| -> BTreeSet<String> {
        anchor_cache
            .entry(file.to_path_buf())
            .or_insert_with(|| {
                anchors(&std::fs::read_to_string(root.join(file)).unwrap_or_default())
            })
            .clone()
    };

    let pages = pages(root);
    for page in &pages {
        let text = match std::fs::read_to_string(root.join(page)) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("{}: unreadable: {e}", page.display()));
                continue;
            }
        };
        let dir = page.parent().unwrap_or(Path::new(""));
        let in_book = page.starts_with(book);
        let at = |line: &Line| format!("{}:{}", page.display(), line.number);
        for line in lines(&text) {
            // (b) paths of the repository, wherever they are written.
            for m in path_token.captures_iter(line.text) {
                let token = m[1].trim_end_matches(['.', ',', ':', ';']);
                if !exists_or_matches(root, token) {
                    problems.push(format!("{}: path `{token}` does not exist", at(&line)));
                }
            }
            if line.in_code {
                continue;
            }
            // {{#include file}}: mdBook pulls the file in; it must exist.
            for m in include.captures_iter(line.text) {
                let target = normalize(&dir.join(&m[1]));
                if !root.join(&target).is_file() {
                    problems.push(format!(
                        "{}: included file `{}` does not exist",
                        at(&line),
                        &m[1]
                    ));
                }
            }
            // (a) relative links and their anchors.
            for m in link.captures_iter(&without_code_spans(line.text)) {
                let target = &m[1];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (file_part, anchor) = match target.split_once('#') {
                    Some((f, a)) => (f, Some(a)),
                    None => (target, None),
                };
                let file = if file_part.is_empty() {
                    page.clone()
                } else {
                    normalize(&dir.join(file_part))
                };
                if !root.join(&file).exists() {
                    problems.push(format!(
                        "{}: broken link `{target}` (no file {})",
                        at(&line),
                        file.display()
                    ));
                    continue;
                }
                if in_book && !file.starts_with(book) {
                    problems.push(format!(
                        "{}: link `{target}` leaves docs/src/, which mdBook does not render (link a page of the book, or include the file)",
                        at(&line)
                    ));
                    continue;
                }
                if let Some(anchor) = anchor
                    && file.extension().is_some_and(|x| x == "md")
                    && !anchors_of(&file).contains(anchor)
                {
                    problems.push(format!(
                        "{}: broken link `{target}` (no heading #{anchor} in {})",
                        at(&line),
                        file.display()
                    ));
                }
            }
        }
    }

    // (c) every page of the book is in SUMMARY.md.
    let summary = book.join("SUMMARY.md");
    match std::fs::read_to_string(root.join(&summary)) {
        Ok(text) => {
            let listed: BTreeSet<PathBuf> = lines(&text)
                .iter()
                .filter(|l| !l.in_code)
                .flat_map(|l| {
                    link.captures_iter(l.text)
                        .map(|m| normalize(&book.join(m[1].split('#').next().unwrap())))
                        .collect::<Vec<_>>()
                })
                .collect();
            for page in pages
                .iter()
                .filter(|p| p.starts_with(book) && **p != summary)
            {
                if !listed.contains(page) {
                    problems.push(format!(
                        "{}: not listed in {}",
                        page.display(),
                        summary.display()
                    ));
                }
            }
        }
        Err(e) => problems.push(format!("{}: unreadable: {e}", summary.display())),
    }

    // (d) the README stays short.
    if let Ok(readme) = std::fs::read_to_string(root.join("README.md")) {
        let n = readme.lines().count();
        if n > README_MAX_LINES {
            problems.push(format!(
                "README.md: {n} lines, more than {README_MAX_LINES}: move text into a page of docs/src/"
            ));
        }
    }
    problems
}

#[test]
fn docs_links_paths_and_summary_hold() {
    let problems = check(&root());
    assert!(
        problems.is_empty(),
        "{} problem(s) in README.md and docs/src/:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The checker on a tree with one mistake of each sort: every one is reported, with its
/// file and line, and nothing else.
#[test]
fn docs_check_reports_each_sort_of_mistake() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let write = |rel: &str, text: &str| {
        let p = r.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("sql/funnel.sql", "SELECT 1\n");
    write("src/stages/sql.rs", "\n");
    write("NOTES.md", "# Notes\n");
    write(
        "README.md",
        "# Project\n\nSee [the book](docs/src/intro.md#start) and [gone](docs/src/gone.md).\n\
         Runs `sql/funnel.sql` and `sql/missing.sql`; kinds live in `src/stages/<kind>.rs`.\n\
         Compare `[not a link](nowhere.md)` in code.\n",
    );
    write(
        "docs/src/SUMMARY.md",
        "# Summary\n\n- [Intro](intro.md)\n- [Kinds](stages/kinds.md)\n",
    );
    write(
        "docs/src/intro.md",
        "# Intro\n\n## Start here\n\nBad anchor: [kinds](stages/kinds.md#no-such).\n\
         Outside: [notes](../../NOTES.md).\n\n```sh\nifloom run pipelines/absent.yaml\n# [x](not-checked.md)\n```\n\
         {{#include ../../NOTES.md}} {{#include ../../ABSENT.md}}\n",
    );
    write(
        "docs/src/stages/kinds.md",
        "# Kinds\n\nBack to [the start](../intro.md#start-here), [self](#kinds); scripts in `scripts/*.sh`.\n",
    );
    write("docs/src/orphan.md", "# Orphan\n");
    write("docs/src/long.md", "");

    let got = check(r);
    let want = [
        "README.md:3: broken link `docs/src/intro.md#start` (no heading #start in docs/src/intro.md)",
        "README.md:3: broken link `docs/src/gone.md` (no file docs/src/gone.md)",
        "README.md:4: path `sql/missing.sql` does not exist",
        "docs/src/intro.md:5: broken link `stages/kinds.md#no-such` (no heading #no-such in docs/src/stages/kinds.md)",
        "docs/src/intro.md:6: link `../../NOTES.md` leaves docs/src/, which mdBook does not render (link a page of the book, or include the file)",
        "docs/src/intro.md:9: path `pipelines/absent.yaml` does not exist",
        "docs/src/intro.md:12: included file `../../ABSENT.md` does not exist",
        "docs/src/stages/kinds.md:3: path `scripts/*.sh` does not exist",
        "docs/src/long.md: not listed in docs/src/SUMMARY.md",
        "docs/src/orphan.md: not listed in docs/src/SUMMARY.md",
    ];
    assert_eq!(got, want, "\ngot:\n{}", got.join("\n"));

    // The README's ceiling: 401 lines is one too many.
    write("README.md", &"line\n".repeat(README_MAX_LINES + 1));
    let got = check(r);
    assert!(
        got.contains(&format!(
            "README.md: {} lines, more than {README_MAX_LINES}: move text into a page of docs/src/",
            README_MAX_LINES + 1
        )),
        "{got:?}"
    );
}
