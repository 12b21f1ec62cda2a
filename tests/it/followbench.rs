//! FollowBench end to end: `pipelines/eval_followbench.yaml` on nine real instruction groups
//! (every constraint type; groups the judge evaluates and groups the reference's rules
//! check), with `ifloom sim` as the judge. Recorded responses (replay profile) are crafted
//! so each rule's verdict is known; the simulator's rules fix each judge answer, well-formed
//! or messy (prose without a list, a list on a line before prose, a list of the wrong length,
//! bare names, lower-case "yes"). Every verdict is written next to the response and answer
//! that give it, and HSR, SSR and CSL are worked out below from those verdicts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::common::{ok, root, s, tempdir};
use crate::llm::Sim;
use crate::stats::section;
use crate::ultraif::query;

const TYPES: [&str; 6] = [
    "content",
    "situation",
    "style",
    "format",
    "example",
    "mixed",
];

/// A verdict: (every added constraint satisfied, share satisfied); `None`: no verdict.
type Verdict = Option<(bool, f64)>;

/// One instruction of the fixture: its response (None: none recorded), the judge's answer
/// (None: a rule checks it), and the verdict expected.
struct Case {
    response: Option<String>,
    judge: Option<&'static str>,
    want: Verdict,
}

/// The data file of a constraint type.
fn data(ty: &str) -> Vec<Value> {
    let p = root().join(format!(
        "../shared/data/followbench/data/{ty}_constraints.json"
    ));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Writes the six data files with only the given groups, and returns every row by
/// (type, example_id, level).
fn write_data(dir: &Path, groups: &[(&str, i64)]) -> BTreeMap<(String, i64, i64), Value> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rows = BTreeMap::new();
    for ty in TYPES {
        let keep: Vec<Value> = data(ty)
            .into_iter()
            .filter(|r| groups.contains(&(ty, r["example_id"].as_i64().unwrap())))
            .collect();
        assert!(!keep.is_empty(), "the fixture needs a group of {ty}");
        for r in &keep {
            let key = (
                ty.to_string(),
                r["example_id"].as_i64().unwrap(),
                r["level"].as_i64().unwrap(),
            );
            rows.insert(key, r.clone());
        }
        std::fs::write(
            dir.join(format!("{ty}_constraints.json")),
            serde_json::to_string(&keep).unwrap(),
        )
        .unwrap();
    }
    rows
}

fn judged(resp: &str, judge: &'static str, want: Verdict) -> Case {
    Case {
        response: Some(resp.to_string()),
        judge: Some(judge),
        want,
    }
}

fn ruled(resp: Option<&str>, want: Verdict) -> Case {
    Case {
        response: resp.map(str::to_string),
        judge: None,
        want,
    }
}

fn yes(soft: f64) -> Verdict {
    Some((soft == 1.0, soft))
}

fn rule(ok: bool) -> Verdict {
    Some((ok, if ok { 1.0 } else { 0.0 }))
}

/// The verdicts of one (constraint type, level): hard and soft per instruction with one.
#[derive(Default)]
struct Cell {
    instructions: usize,
    hard: Vec<f64>,
    soft: Vec<f64>,
}

fn r4(x: f64) -> f64 {
    (x * 10000.0).round() / 10000.0
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// A figure of a stats row against the value worked out here (both rounded to 4 places).
fn assert_figure(row: &serde_json::Map<String, Value>, col: &str, want: Option<f64>) {
    let got = row[col].as_f64();
    match (got, want) {
        (None, None) => {}
        (Some(g), Some(w)) if (g - r4(w)).abs() < 1e-9 => {}
        _ => panic!("{col}: got {:?}, want {want:?} in {row:?}", row[col]),
    }
}

/// Runs the pipeline on the data folder with the simulator as model and judge.
fn run(dir: &Path, sim: &Sim, extra: &[String]) -> PathBuf {
    let run = dir.join("run");
    let mut sets = vec![
        format!("data={}", s(&dir.join("data"))),
        format!("judge_url={}", sim.url),
        format!("url={}", sim.url),
        "model=sim-model".into(),
        "judge_model=sim-model".into(),
        "judge_profile=vllm".into(),
    ];
    sets.extend(extra.iter().cloned());
    let cache = dir.join("cache.sqlite");
    let mut args = vec![
        "run",
        "pipelines/eval_followbench.yaml",
        "--run-dir",
        s(&run),
        "--cache",
        s(&cache),
    ];
    let replay = extra.iter().any(|e| e.starts_with("responses="));
    if replay {
        args.extend(["--profile", "replay"]);
    }
    for kv in &sets {
        args.extend(["--set", kv.as_str()]);
    }
    ok(&root(), &args);
    run
}

fn requests(record: &Path) -> Vec<Value> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn followbench_rates_and_csl_from_rules_and_a_simulated_judge() {
    let tmp = tempdir();
    let dir = tmp.path();
    let groups = [
        ("content", 1),    // t0_zsnoopt_data: the judge
        ("content", 14),   // E2E: rule (the response must be the target)
        ("situation", 1),  // BBH_logical: rule (the last "(X)" must be the target)
        ("situation", 10), // self-made: the judge
        ("style", 1),      // quora: the judge
        ("format", 1),     // quora: the judge
        ("format", 22),    // rule: paragraphs, sentences, words
        ("example", 1),    // rule: the answer template
        ("mixed", 1),      // ROCStories: the judge
    ];
    let rows = write_data(&dir.join("data"), &groups);
    let target = |ty: &str, id: i64, level: i64| {
        rows[&(ty.to_string(), id, level)]["target"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let r = |ty: &str, id: i64, level: i64| format!("RESP-{ty}-{id}-{level}");
    // The example template with an answer in place of `{answer}`.
    let filled = |level: i64| {
        target("example", 1, level)
            .replace("{instruction}\n", "")
            .replace("{{", "{")
            .replace("}}", "}")
            .replace("{answer}", "Update on the wreck")
    };
    let long = "every sentence of this paragraph has to run past twenty words so this one keeps going on and on for a while";
    let cases: Vec<((&str, i64), Vec<Case>)> = vec![
        (
            ("content", 1),
            vec![
                judged(
                    &r("content", 1, 1),
                    "1) The constraint: ...\n2) Satisfied.\n3) ['YES']",
                    yes(1.0),
                ),
                judged(&r("content", 1, 2), "['YES', 'NO']", yes(0.5)),
                judged(
                    &r("content", 1, 3),
                    "```\n['YES', 'YES', 'YES']\n```",
                    yes(1.0),
                ),
                // Prose only: no list in the last line.
                judged(
                    &r("content", 1, 4),
                    "The answer satisfies all four constraints.",
                    None,
                ),
                judged(
                    &r("content", 1, 5),
                    "['YES', 'YES', 'YES', 'YES', 'NO']",
                    yes(0.8),
                ),
            ],
        ),
        (
            ("content", 14),
            vec![
                ruled(Some(&target("content", 14, 1)), rule(true)),
                ruled(Some(&target("content", 14, 2)), rule(true)),
                ruled(Some("name[Something else]"), rule(false)),
                ruled(Some(&target("content", 14, 4)), rule(true)),
                ruled(None, None),
            ],
        ),
        (
            // Targets (A), (B), (B), (B), (H) at levels 1-5.
            ("situation", 1),
            vec![
                ruled(Some("The answer is (A)."), rule(true)),
                ruled(Some("Either (B) or (C)."), rule(false)),
                ruled(Some("(A)"), rule(false)),
                ruled(Some("Not (A): (B)"), rule(true)),
                ruled(Some("(H)"), rule(true)),
            ],
        ),
        (
            ("situation", 10),
            vec![
                // Lower case: the reference looks for "YES" / "NO".
                judged(&r("situation", 10, 1), "yes", None),
                judged(&r("situation", 10, 2), "['YES', 'YES']", yes(1.0)),
                judged(
                    &r("situation", 10, 3),
                    "['YES', 'PARTIAL', 'NO']",
                    yes(1.0 / 3.0),
                ),
                // Bare names: the reference's eval fails.
                judged(&r("situation", 10, 4), "[YES, YES, YES, YES]", None),
                judged(
                    &r("situation", 10, 5),
                    "['YES', 'YES', 'YES', 'YES', 'YES']",
                    yes(1.0),
                ),
            ],
        ),
        (
            ("style", 1),
            vec![
                judged(&r("style", 1, 1), "['NO']", yes(0.0)),
                // The list is not on the last line.
                judged(
                    &r("style", 1, 2),
                    "['YES', 'YES']\nI hope this helps.",
                    None,
                ),
                // Two elements at level 3.
                judged(&r("style", 1, 3), "['YES', 'YES']", None),
                judged(&r("style", 1, 4), "['YES', 'YES', 'YES', 'YES']", yes(1.0)),
                judged(
                    &r("style", 1, 5),
                    "['NO', 'NO', 'NO', 'NO', 'NO']",
                    yes(0.0),
                ),
            ],
        ),
        (
            ("format", 1),
            vec![
                judged(&r("format", 1, 1), "['YES']", yes(1.0)),
                judged(&r("format", 1, 2), "[\"YES\", \"YES\"]", yes(1.0)),
                judged(&r("format", 1, 3), "['YES', 'YES', 'YES']", yes(1.0)),
                judged(&r("format", 1, 4), "['YES', 'YES', 'YES', 'YES']", yes(1.0)),
                judged(
                    &r("format", 1, 5),
                    "Final:\n['YES', 'YES', 'YES', 'YES', 'YES']",
                    yes(1.0),
                ),
            ],
        ),
        (
            ("format", 22),
            vec![
                ruled(Some("One.\n\nTwo.\n\nThree."), rule(true)),
                // Two paragraphs.
                ruled(Some(&format!("{long}.\n\n{long}.")), rule(false)),
                ruled(Some(&format!("{long}.\n\n{long}.\n\n{long}.")), rule(true)),
                // Not numbered.
                ruled(Some(&format!("{long}.\n\n{long}.\n\n{long}.")), rule(false)),
                ruled(Some("x"), rule(false)),
            ],
        ),
        (
            ("example", 1),
            vec![
                ruled(Some(&filled(1)), rule(true)),
                ruled(Some(&filled(2)), rule(true)),
                ruled(Some(&filled(3)), rule(true)),
                ruled(Some(&format!("Sure! {}", filled(4))), rule(false)),
                ruled(Some(&filled(5)), rule(true)),
            ],
        ),
        (
            ("mixed", 1),
            vec![
                judged(&r("mixed", 1, 1), "NO, it does not.", yes(0.0)),
                judged(&r("mixed", 1, 2), "['NO', 'YES']", yes(0.5)),
                judged(&r("mixed", 1, 3), "['YES', 'YES', 'YES']", yes(1.0)),
                Case {
                    response: None,
                    judge: None,
                    want: None,
                },
                judged(
                    &r("mixed", 1, 5),
                    "['YES', 'YES', 'YES', 'YES', 'MAYBE']",
                    yes(0.8),
                ),
            ],
        ),
    ];

    // Recorded responses, keyed by the instruction; judge rules keyed by the response.
    let mut recorded = String::new();
    let mut rules = Vec::new();
    let mut verdicts: BTreeMap<(String, i64, i64), Verdict> = BTreeMap::new();
    for ((ty, id), levels) in &cases {
        for (i, c) in levels.iter().enumerate() {
            let level = i as i64 + 1;
            let instruction = rows[&(ty.to_string(), *id, level)]["instruction"].clone();
            if let Some(resp) = &c.response {
                recorded.push_str(&format!(
                    "{}\n",
                    json!({"instruction": instruction, "response": resp})
                ));
            }
            if let (Some(resp), Some(judge)) = (&c.response, c.judge) {
                rules.push(json!({"match": format!("\n{resp}\n\n#System#"), "response": judge}));
            }
            verdicts.insert((ty.to_string(), *id, level), c.want);
        }
    }
    std::fs::write(dir.join("responses.jsonl"), recorded).unwrap();
    std::fs::write(dir.join("rules.json"), json!({"rules": rules}).to_string()).unwrap();
    let record = dir.join("requests.jsonl");
    let sim = Sim::start(&[
        "--slots",
        "16",
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&dir.join("rules.json")),
        "--record",
        s(&record),
    ]);
    let run = run(
        dir,
        &sim,
        &[format!("responses={}", s(&dir.join("responses.jsonl")))],
    );

    // The judge saw only what no rule checks and that has a response: 24 instructions.
    let sent = requests(&record);
    assert_eq!(sent.len(), rules.len());
    assert_eq!(sent.len(), 24);
    // The reference's prompt, for a level-2 content instruction and a level-1 mixed one.
    let instr = |ty: &str, id: i64, level: i64| {
        rows[&(ty.to_string(), id, level)]["instruction"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let want_content_2 = format!(
        "Given an initial instruction, we add one content constraint per time and obtain the final instruction with 2 additional constraints.\n\n\
         #Initial Instruction#\n{}\n\n\
         #Initial Instruction + 1 constraint#\n{}\n\n\
         #Initial Instruction + 2 constraints#\n{}\n\n\
         #Answer of Initial Instruction + 2 constraints#\nRESP-content-1-2\n\n\
         #System#\n1) Please identify all 2 added constraints.\n2) For the 2 added constraints, discriminate if the #Answer of Initial Instruction + 2 constraints# satisfies each constraint.\n3) In the final line, only output a Python LIST with 2 elements ('YES' or 'NO') indicating whether the answer satisfies each constraint.",
        instr("content", 1, 0),
        instr("content", 1, 1),
        instr("content", 1, 2)
    );
    let want_mixed_1 = format!(
        "Given an initial instruction, we add one constraint and obtain the final instruction with 1 additional constraint.\n\n\
         #Initial Instruction#\n{}\n\n\
         #Initial Instruction + 1 constraint#\n{}\n\n\
         #Answer of Initial Instruction + 1 constraint#\nRESP-mixed-1-1\n\n\
         #System#\n1) Please identify the 1 added constraint.\n2) Please descriminate if the #Answer of Initial Instruction + 1 constraint# satisfies the 1 added constraint.\n3) In the final line, only output a Python LIST with 1 element ('YES' or 'NO') indicating whether the answer satisfies the 1 added constraint.",
        instr("mixed", 1, 0),
        instr("mixed", 1, 1)
    );
    let prompts: Vec<&str> = sent
        .iter()
        .map(|r| {
            assert_eq!(r["messages"].as_array().unwrap().len(), 1);
            assert_eq!(r["messages"][0]["role"], "user");
            r["messages"][0]["content"].as_str().unwrap()
        })
        .collect();
    assert!(prompts.contains(&want_content_2.as_str()));
    assert!(prompts.contains(&want_mixed_1.as_str()));

    // Why the 7 instructions without a verdict have none.
    let errors = query(
        &run,
        "SELECT eval_error, count(*) AS n FROM followbench WHERE hard IS NULL GROUP BY eval_error ORDER BY eval_error",
    );
    assert_eq!(
        errors,
        vec![
            json!({"eval_error": "no YES or NO in the last line", "n": 1}),
            json!({"eval_error": "no [...] list in the last line", "n": 2}),
            json!({"eval_error": "no response to evaluate", "n": 2}),
            json!({"eval_error": "the last line's [...] is not a Python list of strings", "n": 1}),
            json!({"eval_error": "the list has 2 elements, level 3 needs 3", "n": 1}),
        ]
    );
    // Every row's verdict is the one written above.
    for row in query(
        &run,
        "SELECT constraint_type, example_id, level, hard, soft FROM followbench",
    ) {
        let key = (
            row["constraint_type"].as_str().unwrap().to_string(),
            row["example_id"].as_i64().unwrap(),
            row["level"].as_i64().unwrap(),
        );
        let want = verdicts[&key];
        assert_eq!(row["hard"].as_bool(), want.map(|w| w.0), "{key:?}");
        let soft = row["soft"].as_f64();
        assert!(
            soft.zip(want.map(|w| w.1))
                .is_some_and(|(g, w)| (g - w).abs() < 1e-12)
                || (soft.is_none() && want.is_none()),
            "{key:?}: soft {soft:?}"
        );
    }

    // The figures, by hand from the verdicts. Per (type, level): HSR and SSR over the
    // instructions with a verdict.
    let mut cells: BTreeMap<(String, i64), Cell> = BTreeMap::new();
    for ((ty, _, level), v) in &verdicts {
        let c = cells.entry((ty.clone(), *level)).or_default();
        c.instructions += 1;
        if let Some((hard, soft)) = v {
            c.hard.push(if *hard { 1.0 } else { 0.0 });
            c.soft.push(*soft);
        }
    }
    let cell = |ty: &str, level: i64| {
        let c = &cells[&(ty.to_string(), level)];
        (mean(&c.hard), mean(&c.soft))
    };
    // Spot checks of the arithmetic: content level 2 is (0 + 1) / 2 hard, (0.5 + 1) / 2 soft;
    // content level 4 has only the E2E verdict; style level 2 and 3 have none.
    assert_eq!(cell("content", 2), (Some(0.5), Some(0.75)));
    assert_eq!(cell("content", 4), (Some(1.0), Some(1.0)));
    assert_eq!(cell("style", 3), (None, None));

    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let got = section(&st, "followbench_cells");
    assert_eq!(got.len(), 30);
    for row in &got {
        let ty = row["constraint_type"].as_str().unwrap();
        let level = row["level"].as_i64().unwrap();
        let c = &cells[&(ty.to_string(), level)];
        assert_eq!(row["instructions"], json!(c.instructions));
        assert_eq!(row["evaluated"], json!(c.hard.len()));
        assert_eq!(row["unjudged"], json!(c.instructions - c.hard.len()));
        let (h, so) = cell(ty, level);
        assert_figure(row, "hsr", h);
        assert_figure(row, "ssr", so);
    }
    assert_eq!(
        got.iter()
            .map(|r| r["rule_checked"].as_i64().unwrap())
            .sum::<i64>(),
        // content 14 (4 with a response), situation 1, format 22, example 1.
        4 + 5 + 5 + 5
    );

    // Per level: the mean over types of the type's rate.
    let got = section(&st, "followbench_levels");
    assert_eq!(got.len(), 5);
    for row in &got {
        let level = row["level"].as_i64().unwrap();
        let hs: Vec<f64> = TYPES.iter().filter_map(|t| cell(t, level).0).collect();
        let ss: Vec<f64> = TYPES.iter().filter_map(|t| cell(t, level).1).collect();
        assert_eq!(row["constraint_types"], json!(hs.len()));
        assert_figure(row, "hsr", mean(&hs));
        assert_figure(row, "ssr", mean(&ss));
    }
    // Levels 2 and 3 have no style verdict: five types there.
    assert_eq!(got[1]["constraint_types"], json!(5));

    // Per type: the mean over levels, the level-weighted score, and CSL. CSL per group, by
    // hand: content 1 passes level 1 and fails 2 (1); content 14 passes 1-2, fails 3 (2);
    // situation 1 fails level 2 (1); situation 10 has no verdict at level 1 (unknown);
    // style 1 fails level 1 (0); format 1 passes all five (5); format 22 fails level 2 (1);
    // example 1 fails level 4 (3); mixed 1 fails level 1 (0).
    let csl: BTreeMap<&str, (Option<f64>, i64, i64)> = [
        ("content", (Some(1.5), 2, 0)),
        ("situation", (Some(1.0), 2, 1)),
        ("style", (Some(0.0), 1, 0)),
        ("format", (Some(3.0), 2, 0)),
        ("example", (Some(3.0), 1, 0)),
        ("mixed", (Some(0.0), 1, 0)),
    ]
    .into_iter()
    .collect();
    let got = section(&st, "followbench_types");
    assert_eq!(got.len(), 7);
    let mut per_type: BTreeMap<String, (f64, f64, f64, f64)> = BTreeMap::new();
    for row in &got {
        let ty = row["constraint_type"].as_str().unwrap();
        if ty == "all" {
            continue;
        }
        let levels: Vec<(i64, f64, f64)> = (1..=5)
            .filter_map(|l| {
                let (h, so) = cell(ty, l);
                Some((l, h?, so?))
            })
            .collect();
        let h = mean(&levels.iter().map(|x| x.1).collect::<Vec<_>>()).unwrap();
        let so = mean(&levels.iter().map(|x| x.2).collect::<Vec<_>>()).unwrap();
        let weight: i64 = levels.iter().map(|x| x.0).sum();
        let hw = levels.iter().map(|x| x.0 as f64 * x.1).sum::<f64>() / weight as f64;
        let sw = levels.iter().map(|x| x.0 as f64 * x.2).sum::<f64>() / weight as f64;
        assert_figure(row, "hsr", Some(h));
        assert_figure(row, "ssr", Some(so));
        assert_figure(row, "hsr_weighted", Some(hw));
        assert_figure(row, "ssr_weighted", Some(sw));
        let (c, groups, undetermined) = csl[ty];
        assert_figure(row, "csl", c);
        assert_eq!(row["groups"], json!(groups), "{ty}");
        assert_eq!(row["csl_undetermined"], json!(undetermined), "{ty}");
        per_type.insert(ty.to_string(), (h, so, hw, sw));
    }
    // With every level judged, the weighted score is (l1 + 2 l2 + 3 l3 + 4 l4 + 5 l5) / 15:
    // format is (1 + 2 (1/2) + 3 (1) + 4 (1/2) + 5 (1/2)) / 15 for hard.
    assert!((per_type["format"].2 - (1.0 + 1.0 + 3.0 + 2.0 + 2.5) / 15.0).abs() < 1e-12);
    let all = got.last().unwrap();
    assert_eq!(all["constraint_type"], "all");
    let col = |i: usize| {
        per_type
            .values()
            .map(|v| [v.0, v.1, v.2, v.3][i])
            .collect::<Vec<_>>()
    };
    assert_figure(all, "hsr", mean(&col(0)));
    assert_figure(all, "ssr", mean(&col(1)));
    assert_figure(all, "hsr_weighted", mean(&col(2)));
    assert_figure(all, "ssr_weighted", mean(&col(3)));
    assert_figure(all, "csl", Some((1.5 + 1.0 + 0.0 + 3.0 + 3.0 + 0.0) / 6.0));
    assert_eq!(all["groups"], json!(9));
    assert_eq!(all["instructions"], json!(45));
    assert_eq!(all["unjudged"], json!(7));
    assert_eq!(all["csl_undetermined"], json!(1));

    // The report charts the rates and CSL.
    let html = dir.join("report.html");
    ok(&root(), &["report", s(&run), "--out", s(&html)]);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("FollowBench per level"));
    assert!(page.contains("FollowBench consistent satisfaction levels"));
}

/// A run without the replay profile: the model under test answers every instruction of six
/// groups (one per constraint type; only example 1 is checked by rule). The simulator echoes
/// the instruction as the model, so no example template matches (`echo: ` comes first), and
/// answers the judge with a list of one YES and the rest NO: level L has HSR 1 at level 1 and
/// 0 above, SSR 1 / L. tests/slt/followbench_*.slt read this run too.
pub(crate) struct ModelRun {
    _tmp: tempfile::TempDir,
    pub run: PathBuf,
    /// The requests the simulator got.
    sent: Vec<Value>,
    rows: BTreeMap<(String, i64, i64), Value>,
}

pub(crate) fn model_run() -> ModelRun {
    let tmp = tempdir();
    let dir = tmp.path();
    let groups = [
        ("content", 1),
        ("situation", 10),
        ("style", 1),
        ("format", 1),
        ("example", 1),
        ("mixed", 1),
    ];
    let rows = write_data(&dir.join("data"), &groups);
    let rules: Vec<Value> = (1..=5)
        .map(|l: usize| {
            let list: Vec<&str> = (0..l)
                .map(|i| if i == 0 { "'YES'" } else { "'NO'" })
                .collect();
            let noun = if l == 1 { "element" } else { "elements" };
            json!({"match": format!("Python LIST with {l} {noun}"),
                   "response": format!("[{}]", list.join(", "))})
        })
        .collect();
    std::fs::write(dir.join("rules.json"), json!({"rules": rules}).to_string()).unwrap();
    let record = dir.join("requests.jsonl");
    let sim = Sim::start(&[
        "--base-ms",
        "1",
        "--per-token-ms",
        "0",
        "--rules",
        s(&dir.join("rules.json")),
        "--record",
        s(&record),
    ]);
    let run = run(dir, &sim, &[]);
    let sent = requests(&record);
    ModelRun {
        _tmp: tmp,
        run,
        sent,
        rows,
    }
}

#[test]
fn followbench_model_answers_go_to_the_judge() {
    let ModelRun {
        run, sent, rows, ..
    } = &model_run();
    // 30 model requests (6 groups x 5 levels) and 25 judge requests (all but the example).
    let model: Vec<&Value> = sent
        .iter()
        .filter(|r| {
            !r["messages"][0]["content"]
                .as_str()
                .unwrap()
                .starts_with("Given an initial instruction")
        })
        .collect();
    assert_eq!(model.len(), 30);
    assert_eq!(sent.len() - model.len(), 25);
    let instr = rows[&("style".to_string(), 1, 3)]["instruction"]
        .as_str()
        .unwrap();
    assert!(
        model
            .iter()
            .any(|r| r["messages"] == json!([{"role": "user", "content": instr}]))
    );
    assert!(sent.iter().any(|r| {
        r["messages"][0]["content"]
            .as_str()
            .unwrap()
            .contains(&format!("constraints#\necho: {instr}\n\n#System#"))
    }));

    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(run)])).unwrap();
    for row in section(&st, "followbench_cells") {
        let level = row["level"].as_i64().unwrap();
        let (h, so) = if row["constraint_type"] == "example" {
            (0.0, 0.0)
        } else {
            (if level == 1 { 1.0 } else { 0.0 }, 1.0 / level as f64)
        };
        assert_eq!(row["unjudged"], json!(0));
        assert_figure(&row, "hsr", Some(h));
        assert_figure(&row, "ssr", Some(so));
    }
    // CSL: 1 for every judged group, 0 for the example group.
    let types = section(&st, "followbench_types");
    for row in &types {
        let want = match row["constraint_type"].as_str().unwrap() {
            "example" => 0.0,
            "all" => 5.0 / 6.0,
            _ => 1.0,
        };
        assert_figure(row, "csl", Some(want));
    }
}
