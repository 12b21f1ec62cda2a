//! InfoBench end to end: `pipelines/eval_infobench.yaml` judging recorded responses (the
//! replay profile) with `ifloom sim` as the judge. The simulator's rules fix the judge's
//! answer to every decomposed question, including answers the reference script cannot read
//! (which end an instruction's questioning), so every DRFR figure below is worked out by hand
//! from the rules, not by running ifloom. The headline `drfr` is the reference's `bool_ratio`
//! (qinyiwei/InfoBench evaluation.py): YES over the questions the judge was asked and answered,
//! an unreadable answer counting as NO (`if eva_value` on its None), the questions never asked
//! after it and the items with no response (skipped before asking) out of the denominator.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::common::{jsonl, judged_replay, ok, regex_escape, root, s, tempdir};
use crate::stats::section;
use crate::ultraif::query;

fn infobench() -> Vec<Value> {
    std::fs::read_to_string(root().join("../shared/data/infobench/InfoBench.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn questions(item: &Value) -> Vec<String> {
    item["decomposed_questions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn infobench_drfr_from_a_simulated_judge_asked_question_by_question() {
    let all = infobench();
    let pick = |subset: &str, with_input: bool, min_q: usize, skip: &[&str]| -> Value {
        all.iter()
            .find(|i| {
                i["subset"] == subset
                    && (i["input"].as_str().unwrap() != "") == with_input
                    && questions(i).len() >= min_q
                    && !skip.contains(&i["id"].as_str().unwrap())
            })
            .unwrap()
            .clone()
    };
    // A: easy, with an input; B: hard, no input; C: easy, another item; D: no response.
    let a = pick("Easy_set", true, 3, &[]);
    let b = pick("Hard_set", false, 3, &[]);
    let c = pick("Easy_set", true, 2, &[a["id"].as_str().unwrap()]);
    let d = pick("Hard_set", true, 1, &[b["id"].as_str().unwrap()]);
    let items = [&a, &b, &c, &d];
    let mut all_q: Vec<String> = items.iter().flat_map(|i| questions(i)).collect();
    let n_q = all_q.len();
    all_q.sort();
    all_q.dedup();
    assert_eq!(all_q.len(), n_q, "the chosen items share no question text");

    let tmp = tempdir();
    let dir = tmp.path();
    let subset: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.join("subset.jsonl"), subset).unwrap();
    let resp = |i: &Value| format!("Recorded answer to {}.", i["id"].as_str().unwrap());
    let recorded: String = [&a, &b, &c]
        .iter()
        .map(|i| format!("{}\n", json!({"id": i["id"], "response": resp(i)})))
        .collect();
    std::fs::write(dir.join("responses.jsonl"), recorded).unwrap();

    // The judge's answer per question. Question 1 arrives in the full first message (after
    // the response); later ones alone, as "<question>\n".
    let (qa, qb, qc) = (questions(&a), questions(&b), questions(&c));
    let mut answers: Vec<(String, &str)> = Vec::new();
    for (k, q) in qa.iter().enumerate() {
        let text = match k {
            0 => "YES",
            1 => "No, it is not.",        // starts with "no": NO
            2 => "The text is fine. YES", // YES without NO: YES
            _ => "Yes.",
        };
        answers.push((q.clone(), text));
    }
    answers.push((qb[0].clone(), "yes"));
    answers.push((qb[1].clone(), "I am not sure about this one.")); // unreadable: stop
    for q in &qb[2..] {
        answers.push((q.clone(), "YES")); // never asked
    }
    answers.push((qc[0].clone(), "**NO**")); // NO without YES: NO
    answers.push((qc[1].clone(), "Hard to say: YES and NO.")); // both: unreadable, stop
    for q in &qc[2..] {
        answers.push((q.clone(), "YES"));
    }
    let rules: Vec<Value> = answers
        .iter()
        .map(|(q, text)| {
            json!({"match": format!("(?s)(^|\nQuestion:\n){}\n$", regex_escape(q)), "response": text})
        })
        .collect();
    let (_sim, run, record) = judged_replay(
        dir,
        "pipelines/eval_infobench.yaml",
        &rules,
        &[
            format!("infobench={}", s(&dir.join("subset.jsonl"))),
            format!("responses={}", s(&dir.join("responses.jsonl"))),
        ],
    );

    // Per question: the answer and why there is none, worked out from the rules above.
    let rows = query(
        &run,
        "SELECT id, question_index, answer, answer_ref, answer_error FROM infobench_answers ORDER BY id, question_index",
    );
    // (answer, answer_ref, answer_error)
    let mut want: BTreeMap<(String, i64), (Value, Value, Value)> = BTreeMap::new();
    let id = |i: &Value| i["id"].as_str().unwrap().to_string();
    for k in 1..=qa.len() as i64 {
        want.insert((id(&a), k), (json!(k != 2), json!(k != 2), Value::Null));
    }
    let unreadable = json!("no YES or NO in the judge's answer");
    let not_asked = json!("not asked: question 2 got no answer");
    for (item, first) in [(&b, true), (&c, false)] {
        let n = questions(item).len() as i64;
        want.insert((id(item), 1), (json!(first), json!(first), Value::Null));
        // The reference's eval list ends in None here, which bool_ratio counts as false.
        want.insert(
            (id(item), 2),
            (Value::Null, json!(false), unreadable.clone()),
        );
        for k in 3..=n {
            want.insert((id(item), k), (Value::Null, Value::Null, not_asked.clone()));
        }
    }
    for k in 1..=questions(&d).len() as i64 {
        want.insert(
            (id(&d), k),
            (Value::Null, Value::Null, json!("no response to judge")),
        );
    }
    let got: BTreeMap<(String, i64), (Value, Value, Value)> = rows
        .iter()
        .map(|r| {
            (
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["question_index"].as_i64().unwrap(),
                ),
                (
                    r.get("answer").cloned().unwrap_or(Value::Null),
                    r.get("answer_ref").cloned().unwrap_or(Value::Null),
                    r.get("answer_error").cloned().unwrap_or(Value::Null),
                ),
            )
        })
        .collect();
    assert_eq!(got, want);

    // The protocol: one conversation per instruction, each question after the earlier ones
    // and the judge's answers; nothing sent after an unreadable answer.
    let sent = jsonl(&record);
    assert_eq!(
        sent.len(),
        qa.len() + 2 + 2,
        "A: every question; B and C: two each"
    );
    let last_a = sent
        .iter()
        .find(|r| {
            r["messages"].as_array().unwrap().last().unwrap()["content"] == format!("{}\n", qa[2])
        })
        .unwrap();
    let m = last_a["messages"].as_array().unwrap();
    assert_eq!(m.len(), 5);
    let first = m[0]["content"].as_str().unwrap();
    assert!(first.starts_with("Based on the provided Input (if any) and Generated Text"));
    assert!(first.contains(&format!(
        "\n\nInput:\n\"{}\"\n\nGenerated Text:\n\"{}\"\n\nQuestion:\n{}\n",
        a["input"].as_str().unwrap(),
        resp(&a),
        qa[0]
    )));
    assert_eq!(
        (m[1]["role"].as_str(), m[1]["content"].as_str()),
        (Some("assistant"), Some("YES"))
    );
    assert_eq!(m[2]["content"], format!("{}\n", qa[1]));
    assert_eq!(m[3]["content"], "No, it is not.");
    assert_eq!(last_a["temperature"], 0.0);
    // B has no input: the first message goes straight to the generated text.
    let first_b = sent
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_string())
        .find(|c| c.ends_with(&format!("Question:\n{}\n", qb[0])))
        .unwrap();
    assert!(!first_b.contains("\nInput:\n"));
    assert!(first_b.contains(&format!("'''\n\nGenerated Text:\n\"{}\"", resp(&b))));

    // DRFR by hand: A has n_A questions, one NO; B one YES then an unreadable answer; C one
    // NO then an unreadable answer; D no response. The reference's denominator: A's n_A, and
    // two asked of B and of C (the unreadable one as NO); D is skipped.
    let n_a = qa.len() as i64;
    let total = (qa.len() + qb.len() + qc.len() + questions(&d).len()) as i64;
    let (yes, judged, asked) = (n_a - 1 + 1, n_a + 2, n_a + 4);
    let r4 = |x: f64| (x * 10000.0).round() / 10000.0;
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let drfr = section(&st, "drfr");
    assert_eq!(drfr.len(), 1);
    assert_eq!(
        crate::trace::columns(&st, "drfr")[2..5],
        ["drfr", "drfr_judged", "drfr_all"],
        "the headline first among the figures, after table and slice"
    );
    assert_eq!(drfr[0]["drfr"], json!(r4(yes as f64 / asked as f64)));
    assert_eq!(drfr[0]["asked"], json!(asked));
    assert_eq!(drfr[0]["questions"], json!(total));
    assert_eq!(drfr[0]["judged"], json!(judged));
    assert_eq!(drfr[0]["unjudged"], json!(total - judged));
    assert_eq!(drfr[0]["yes"], json!(yes));
    assert_eq!(
        drfr[0]["drfr_judged"],
        json!(r4(yes as f64 / judged as f64))
    );
    assert_eq!(drfr[0]["drfr_all"], json!(r4(yes as f64 / total as f64)));
    // Per subset: easy = A and C, hard = B and D.
    let by_subset = section(&st, "drfr_by_subset");
    let easy_yes = n_a - 1;
    let easy_judged = n_a + 1;
    let easy_asked = n_a + 2;
    let easy_total = (qa.len() + qc.len()) as i64;
    let hard_total = (qb.len() + questions(&d).len()) as i64;
    // (slice, questions, judged, drfr, drfr_judged, drfr_all); hard: B asked 2 (YES, then
    // unreadable = NO), D skipped.
    let want_subset = vec![
        (
            "Easy_set",
            easy_total,
            easy_judged,
            r4(easy_yes as f64 / easy_asked as f64),
            r4(easy_yes as f64 / easy_judged as f64),
            r4(easy_yes as f64 / easy_total as f64),
        ),
        (
            "Hard_set",
            hard_total,
            1,
            0.5,
            1.0,
            r4(1.0 / hard_total as f64),
        ),
    ];
    let got_subset: Vec<(&str, i64, i64, f64, f64, f64)> = by_subset
        .iter()
        .map(|r| {
            (
                r["slice"].as_str().unwrap(),
                r["questions"].as_i64().unwrap(),
                r["judged"].as_i64().unwrap(),
                r["drfr"].as_f64().unwrap(),
                r["drfr_judged"].as_f64().unwrap(),
                r["drfr_all"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got_subset, want_subset);
    // Per category: each item's own figures, merged where two share a category.
    // questions, judged, yes, asked
    let mut cat: BTreeMap<String, (i64, i64, i64, i64)> = BTreeMap::new();
    for (item, judged, yes, asked) in [
        (&a, n_a, n_a - 1, n_a),
        (&b, 1, 1, 2),
        (&c, 1, 0, 2),
        (&d, 0, 0, 0),
    ] {
        let e = cat
            .entry(item["category"].as_str().unwrap().to_string())
            .or_default();
        e.0 += questions(item).len() as i64;
        e.1 += judged;
        e.2 += yes;
        e.3 += asked;
    }
    let by_cat = section(&st, "drfr_by_category");
    assert_eq!(by_cat.len(), cat.len());
    for r in &by_cat {
        let (q, j, y, n) = cat[r["slice"].as_str().unwrap()];
        assert_eq!(r["questions"], json!(q));
        assert_eq!(r["judged"], json!(j));
        assert_eq!(r["asked"], json!(n));
        let share = |d: i64| {
            if d == 0 {
                Value::Null
            } else {
                json!(r4(y as f64 / d as f64))
            }
        };
        let get = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        assert_eq!(get("drfr"), share(n), "{r:?}");
        assert_eq!(get("drfr_judged"), share(j), "{r:?}");
    }
}
