//! `pipelines/verifiable_if.yaml` end to end against the simulator: four prompts of our own
//! and one of IFEval's (decontaminated away), two constraint types so that what each answer
//! follows is known, two answers per prompt chosen by the simulator's rules. Every verdict,
//! SFT row, DPO pair, RLVR row and per-type pass rate below is worked out by hand from the
//! rules (comments show how). The RLVR ground truth is parsed back from its Python literal.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::common::{ifloom, jsonl, ok, root, s, sql_json, stderr, tempdir};
use crate::llm::Sim;

/// (a word the simulator's rule matches, the prompt, answer 0, answer 1)
const PROMPTS: [(&str, &str, &str, &str); 4] = [
    // pass (quoted, no comma) / fail (comma)
    (
        "harbour",
        "Describe the harbour at dawn for a travel brochure.",
        "\"The harbour wakes slowly\"",
        "\"Boats, nets and gulls\"",
    ),
    // fail (no quotes) / pass
    (
        "tides",
        "Explain how tides work to a curious child.",
        "The moon pulls the sea",
        "\"Gravity from the moon pulls the water\"",
    ),
    // fail (comma, though quoted) / fail (comma, no quotes)
    (
        "bakery",
        "Suggest a name for a bakery that sells only bread.",
        "\"Crumb, Crust\"",
        "Loaf, and more",
    ),
    // pass / pass
    (
        "violin",
        "List three reasons to learn the violin as an adult.",
        "\"It trains the ear\"",
        "\"It is calming\"",
    ),
];

const TYPES: &str = "punctuation:no_comma,startend:quotation";

/// The first IFEval prompt, which decontamination must remove.
fn ifeval_prompt() -> String {
    let all = std::fs::read_to_string(root().join("../shared/data/ifeval/input_data.jsonl"))
        .expect("../shared/data/ifeval/input_data.jsonl");
    let v: Value = serde_json::from_str(all.lines().next().unwrap()).unwrap();
    v["prompt"].as_str().unwrap().to_string()
}

fn write_inputs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("prompts.jsonl");
    let mut lines: Vec<String> = PROMPTS
        .iter()
        .map(|(_, p, ..)| json!({ "text": p }).to_string())
        .collect();
    lines.push(json!({ "text": ifeval_prompt() }).to_string());
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let rules = dir.join("rules.json");
    let rules_json: Vec<Value> = PROMPTS
        .iter()
        .map(|(m, _, a, b)| json!({"match": m, "responses": [a, b]}))
        .collect();
    std::fs::write(&rules, json!({ "rules": rules_json }).to_string()).unwrap();
    (data, rules)
}

fn run(dir: &Path, run: &Path, sets: &[String], until: Option<&str>) -> std::process::Output {
    let p = root().join("pipelines/verifiable_if.yaml");
    let cache = dir.join("cache.sqlite");
    let mut args = vec!["run", s(&p), "--run-dir", s(run), "--cache", s(&cache)];
    for kv in sets {
        args.extend(["--set", kv.as_str()]);
    }
    if let Some(u) = until {
        args.extend(["--until", u]);
    }
    ifloom(dir, &args)
}

/// A Python literal (what `repr()` writes for lists, dicts, str, int, None, True, False) as
/// JSON: enough of `ast.literal_eval` to read a ground truth back without Python.
fn python_literal(text: &str) -> Value {
    struct P<'a> {
        c: std::iter::Peekable<std::str::Chars<'a>>,
    }
    impl P<'_> {
        fn ws(&mut self) {
            while self.c.peek().is_some_and(|c| c.is_whitespace()) {
                self.c.next();
            }
        }
        fn value(&mut self) -> Value {
            self.ws();
            match *self.c.peek().expect("a value") {
                '[' => {
                    self.c.next();
                    let mut items = Vec::new();
                    loop {
                        self.ws();
                        if self.c.peek() == Some(&']') {
                            self.c.next();
                            return Value::Array(items);
                        }
                        items.push(self.value());
                        self.ws();
                        match self.c.next() {
                            Some(',') => {}
                            Some(']') => return Value::Array(items),
                            other => panic!("list: unexpected {other:?}"),
                        }
                    }
                }
                '{' => {
                    self.c.next();
                    let mut m = serde_json::Map::new();
                    loop {
                        self.ws();
                        if self.c.peek() == Some(&'}') {
                            self.c.next();
                            return Value::Object(m);
                        }
                        let Value::String(k) = self.value() else {
                            panic!("dict keys are strings here")
                        };
                        self.ws();
                        assert_eq!(self.c.next(), Some(':'));
                        let v = self.value();
                        m.insert(k, v);
                        self.ws();
                        match self.c.next() {
                            Some(',') => {}
                            Some('}') => return Value::Object(m),
                            other => panic!("dict: unexpected {other:?}"),
                        }
                    }
                }
                q @ ('\'' | '"') => {
                    self.c.next();
                    let mut out = String::new();
                    loop {
                        match self.c.next().expect("a closed string") {
                            c if c == q => return Value::String(out),
                            '\\' => match self.c.next().unwrap() {
                                'n' => out.push('\n'),
                                't' => out.push('\t'),
                                'r' => out.push('\r'),
                                e @ ('x' | 'u' | 'U') => {
                                    let n = match e {
                                        'x' => 2,
                                        'u' => 4,
                                        _ => 8,
                                    };
                                    let h: String =
                                        (0..n).map(|_| self.c.next().unwrap()).collect();
                                    out.push(
                                        char::from_u32(u32::from_str_radix(&h, 16).unwrap())
                                            .unwrap(),
                                    );
                                }
                                c => out.push(c),
                            },
                            c => out.push(c),
                        }
                    }
                }
                _ => {
                    let mut word = String::new();
                    while self
                        .c
                        .peek()
                        .is_some_and(|c| c.is_alphanumeric() || *c == '-' || *c == '.')
                    {
                        word.push(self.c.next().unwrap());
                    }
                    match word.as_str() {
                        "None" => Value::Null,
                        "True" => Value::Bool(true),
                        "False" => Value::Bool(false),
                        w => serde_json::from_str(w).unwrap_or_else(|_| panic!("number {w}")),
                    }
                }
            }
        }
    }
    let mut p = P {
        c: text.chars().peekable(),
    };
    let v = p.value();
    p.ws();
    assert!(p.c.next().is_none(), "trailing text in {text}");
    v
}

/// open-instruct's reading of a ground truth: `ast.literal_eval(label)[0]` (a JSON string
/// there is read with `json.loads`), then `instruction_id` and `kwargs`.
fn read_ground_truth(label: &str) -> (Vec<String>, Vec<Value>) {
    let v = python_literal(label);
    let mut first = v[0].clone();
    if let Value::String(s) = &first {
        first = serde_json::from_str(s).unwrap();
    }
    let ids = first["instruction_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    (ids, first["kwargs"].as_array().unwrap().clone())
}

/// Python's own `ast.literal_eval` on each label, as JSON, when python3 is on this machine.
fn python_reads(labels: &[String]) -> Option<Vec<Value>> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import ast, json, sys\nfor l in sys.stdin:\n    print(json.dumps(ast.literal_eval(json.loads(l))))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take().unwrap();
    for l in labels {
        writeln!(stdin, "{}", Value::String(l.clone())).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().ok()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

#[test]
fn verifiable_if_against_the_simulator_gives_the_rows_worked_out_by_hand() {
    let tmp = tempdir();
    let (data, rules) = write_inputs(tmp.path());
    let sim = Sim::start(&["--rules", s(&rules)]);
    let sets = vec![
        format!("data={}", s(&data)),
        "prompt_expr=text".to_string(),
        format!("constraint_types={TYPES}"),
        "min_constraints=2".to_string(),
        "max_constraints=2".to_string(),
        "samples=2".to_string(),
        "max_tokens=64".to_string(),
        format!("url={}", sim.url),
        "model=sim-model".to_string(),
    ];
    let run_dir = tmp.path().join("run");
    let o = run(tmp.path(), &run_dir, &sets, None);
    assert!(o.status.success(), "{}", stderr(&o));
    // One request per prompt (n = 2), the IFEval prompt never sent.
    assert_eq!(sim.requests(), 4);

    // Decontamination removed IFEval's prompt, and only it.
    let removed = sql_json(
        tmp.path(),
        &run_dir,
        "SELECT prompt, _reference FROM clean_seeds__removed",
    );
    assert_eq!(
        removed,
        vec![json!({"prompt": ifeval_prompt(), "_reference": "ifeval"})]
    );

    // Each prompt got both types (2 of 2, in a seeded order), the sentences after a blank line.
    let constrained = sql_json(
        tmp.path(),
        &run_dir,
        "SELECT _id, prompt, instruction_id_list, kwargs, constraints, constrained_prompt, ground_truth \
         FROM constrained ORDER BY prompt",
    );
    assert_eq!(constrained.len(), 4);
    for r in &constrained {
        let mut ids: Vec<&str> = r["instruction_id_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, ["punctuation:no_comma", "startend:quotation"]);
        assert_eq!(r["kwargs"], json!("[{},{}]"));
        let texts: Vec<&str> = r["constraints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert_eq!(
            r["constrained_prompt"],
            json!(format!(
                "{}\n\n{}",
                r["prompt"].as_str().unwrap(),
                texts.join("\n")
            ))
        );
        assert!(
            texts.iter().any(|t| t.contains("comma"))
                && texts.iter().any(|t| t.contains("quotation")),
            "{texts:?}"
        );
    }

    // Verdicts (strict; single-line answers make loose the same):
    //   harbour: s0 pass, s1 fail (comma)        tides: s0 fail (quotes), s1 pass
    //   bakery:  s0 fail (comma), s1 fail (both)  violin: s0 pass, s1 pass
    let verdicts = sql_json(
        tmp.path(),
        &run_dir,
        "SELECT prompt, sample_index, verdict, prompt_strict, prompt_loose, ifeval_error \
         FROM checked ORDER BY prompt, sample_index",
    );
    let want: BTreeMap<&str, [&str; 2]> = [
        ("harbour", ["pass", "fail"]),
        ("tides", ["fail", "pass"]),
        ("bakery", ["fail", "fail"]),
        ("violin", ["pass", "pass"]),
    ]
    .into_iter()
    .collect();
    assert_eq!(verdicts.len(), 8);
    for v in &verdicts {
        let word = PROMPTS
            .iter()
            .find(|p| v["prompt"] == p.1)
            .map(|p| p.0)
            .unwrap();
        let i = v["sample_index"].as_u64().unwrap() as usize;
        assert_eq!(v["verdict"], want[word][i], "{v}");
        assert_eq!(v["prompt_strict"], v["prompt_loose"], "{v}");
        assert_eq!(v["ifeval_error"], Value::Null);
    }

    // SFT: the first passing answer of harbour (s0), tides (s1), violin (s0); bakery none.
    let sft = jsonl(&run_dir.join("out/sft_messages.jsonl"));
    let mut got: Vec<(String, String)> = sft
        .iter()
        .map(|r| {
            let m = r["messages"].as_array().unwrap();
            assert_eq!(m.len(), 2);
            assert_eq!(m[0]["role"], "user");
            assert_eq!(m[1]["role"], "assistant");
            let user = m[0]["content"].as_str().unwrap();
            let c = constrained
                .iter()
                .find(|c| c["constrained_prompt"] == user)
                .expect("the user turn is a constrained prompt");
            (
                c["prompt"].as_str().unwrap().to_string(),
                m[1]["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want_sft: Vec<(String, String)> = [(0, 2), (1, 3), (3, 2)]
        .iter()
        .map(|&(p, a)| {
            let row = PROMPTS[p];
            let answer = if a == 2 { row.2 } else { row.3 };
            (row.1.to_string(), answer.to_string())
        })
        .collect();
    want_sft.sort();
    assert_eq!(got, want_sft);

    // DPO: harbour (s0 over s1) and tides (s1 over s0); violin has no failing answer,
    // bakery no passing one.
    let dpo = jsonl(&run_dir.join("out/dpo_pairs.jsonl"));
    let mut pairs: Vec<(String, String)> = dpo
        .iter()
        .map(|r| {
            (
                r["chosen"].as_str().unwrap().to_string(),
                r["rejected"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    pairs.sort();
    let mut want_pairs = vec![
        (PROMPTS[0].2.to_string(), PROMPTS[0].3.to_string()),
        (PROMPTS[1].3.to_string(), PROMPTS[1].2.to_string()),
    ];
    want_pairs.sort();
    assert_eq!(pairs, want_pairs);
    for r in &dpo {
        assert!(
            constrained
                .iter()
                .any(|c| c["constrained_prompt"] == r["prompt"]),
            "{r}"
        );
    }
    let trl = jsonl(&run_dir.join("out/dpo_trl.jsonl"));
    assert_eq!(trl.len(), 2);
    // The rejected answers still followed one constraint each (quotes; no comma).
    let followed = sql_json(
        tmp.path(),
        &run_dir,
        "SELECT rejected_followed FROM dpo ORDER BY _id",
    );
    assert_eq!(followed, vec![json!({"rejected_followed": 1}); 2]);

    // RLVR: one row per prompt, open-instruct's shape; the ground truth names the row's checks
    // and arguments, read back as open-instruct reads it.
    let rlvr = jsonl(&run_dir.join("out/rlvr_ifeval.jsonl"));
    assert_eq!(rlvr.len(), 4);
    let mut labels = Vec::new();
    for r in &rlvr {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "constraint",
                "constraint_type",
                "dataset",
                "ground_truth",
                "key",
                "messages"
            ]
        );
        assert_eq!(r["dataset"], "ifeval");
        let c = constrained.iter().find(|c| c["_id"] == r["key"]).unwrap();
        assert_eq!(
            r["messages"],
            json!([{"role": "user", "content": c["constrained_prompt"]}])
        );
        let label = r["ground_truth"].as_str().unwrap();
        assert_eq!(label, c["ground_truth"].as_str().unwrap());
        let (ids, kwargs) = read_ground_truth(label);
        assert_eq!(json!(ids), c["instruction_id_list"]);
        let row_kwargs: Value = serde_json::from_str(c["kwargs"].as_str().unwrap()).unwrap();
        assert_eq!(Value::Array(kwargs), row_kwargs);
        assert_eq!(r["constraint_type"], json!(ids.join(", ")));
        labels.push(label.to_string());
    }
    if let Some(py) = python_reads(&labels) {
        for (l, p) in labels.iter().zip(py) {
            assert_eq!(python_literal(l), p, "python reads {l} otherwise");
        }
    }

    // Stats: pass rates per prompt (source_id) and per constraint type.
    //   pass 4 (harbour s0, tides s1, violin s0 s1), fail 4; SFT 3/4, DPO 2/4.
    //   no_comma: followed by harbour s0, tides s0 s1, violin s0 s1 = 5 of 8
    //   quotation: harbour s0 s1, tides s1, bakery s0, violin s0 s1 = 6 of 8
    let stats: Value =
        serde_json::from_str(&ok(tmp.path(), &["stats", "--json", s(&run_dir)])).unwrap();
    let rates = crate::stats::section(&stats, "pass_rates");
    let checked = rates.iter().find(|r| r["table"] == "checked").unwrap();
    assert_eq!(checked["instructions"], json!(4));
    assert_eq!(checked["pass"], json!(4));
    assert_eq!(checked["fail"], json!(4));
    assert_eq!(checked["sft_pass_rate"], json!(0.75));
    assert_eq!(checked["dpo_pass_rate"], json!(0.5));
    assert_eq!(checked["response_pass_rate"], json!(0.5));
    let by_type = crate::stats::section(&stats, "ifeval_by_type");
    let t = |id: &str| {
        by_type
            .iter()
            .find(|r| r["instruction_type"] == id)
            .unwrap_or_else(|| panic!("no {id} in {by_type:?}"))
    };
    assert_eq!(by_type.len(), 2);
    assert_eq!(t("punctuation:no_comma")["instructions"], json!(8));
    assert_eq!(t("punctuation:no_comma")["strict_acc"], json!(0.625));
    assert_eq!(t("punctuation:no_comma")["loose_acc"], json!(0.625));
    assert_eq!(t("startend:quotation")["strict_acc"], json!(0.75));
    assert_eq!(t("startend:quotation")["loose_acc"], json!(0.75));

    // A rerun into a new directory draws the same constraints (seeded by seed and _id), and
    // needs no model for the RLVR rows.
    let again = tmp.path().join("again");
    let o = run(tmp.path(), &again, &sets, Some("rlvr_ifeval"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(jsonl(&again.join("out/rlvr_ifeval.jsonl")), rlvr);
    assert_eq!(sim.requests(), 4);
}

#[test]
fn all_25_types_on_real_prompts_give_rlvr_rows_that_read_back() {
    // OASST's first prompts (the default data), no model: every row has 1-3 constraints whose
    // ground truth names exactly the row's checks and arguments.
    let tmp = tempdir();
    let run_dir = tmp.path().join("run");
    let o = run(
        tmp.path(),
        &run_dir,
        &["rows=60".to_string()],
        Some("rlvr_ifeval"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = sql_json(
        tmp.path(),
        &run_dir,
        "SELECT c.instruction_id_list, c.kwargs, r.ground_truth, r.dataset \
         FROM rlvr r JOIN constrained c USING (_id)",
    );
    assert!(rows.len() >= 55, "{}", rows.len());
    let mut types = std::collections::BTreeSet::new();
    for r in &rows {
        let (ids, kwargs) = read_ground_truth(r["ground_truth"].as_str().unwrap());
        assert!((1..=3).contains(&ids.len()), "{r}");
        assert_eq!(json!(ids), r["instruction_id_list"]);
        let row_kwargs: Value = serde_json::from_str(r["kwargs"].as_str().unwrap()).unwrap();
        assert_eq!(Value::Array(kwargs), row_kwargs);
        types.extend(ids);
    }
    assert!(types.len() >= 15, "{types:?}");
    // A bad type list is refused before anything runs.
    let o = run(
        tmp.path(),
        &tmp.path().join("bad"),
        &["constraint_types=punctuation:no_coma".to_string()],
        None,
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("punctuation:no_comma"),
        "{}",
        stderr(&o)
    );
}
