//! EIFBench end to end: `pipelines/eval_eifbench.yaml` judging recorded responses (replay
//! profile) with `ifloom sim` as the judge, on four real items. The simulator's rules fix
//! every judgement (Chinese answers with the reference's `答案：是/否` marker, prose with
//! neither character, two contradicting markers), so the three levels are worked out by hand
//! below from the rules and the items' own question counts.

use serde_json::{Value, json};

use crate::common::{judged_replay, ok, regex_escape, root, s, tempdir};
use crate::stats::section;
use crate::ultraif::query;

/// (key, instruction, questions) of an item's sub-instructions, by the key's number.
fn subs(item: &Value) -> Vec<(String, String, Vec<String>)> {
    let mut v: Vec<(String, String, Vec<String>)> = item["sub_instructions"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                s["instruction"].as_str().unwrap().to_string(),
                s["scoring_questions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| q.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    v.sort_by_key(|(k, _, _)| {
        k.trim_start_matches("sub_instruction_")
            .parse::<u32>()
            .unwrap()
    });
    v
}

/// The piece of the judge prompt that names the response, the sub-task and the question.
fn judged_piece(response: &str, sub: &(String, String, Vec<String>), q: &str) -> String {
    regex_escape(&format!(
        "{response}\n- **子任务**：\n{}:{}\n- **约束**: \n{q}\n",
        sub.0, sub.1
    ))
}

#[test]
fn eifbench_levels_from_a_simulated_judge() {
    let all: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(root().join("../shared/data/eifbench/sorted_party100.json"))
            .unwrap(),
    )
    .unwrap();
    let (a, b, c, d) = (&all[0], &all[1], &all[2], &all[3]);
    let tmp = tempdir();
    let dir = tmp.path();
    std::fs::write(
        dir.join("subset.json"),
        serde_json::to_string(&vec![a, b, c, d]).unwrap(),
    )
    .unwrap();
    // C has no recorded response: its questions are not judged.
    let recorded: String = [(a, "RESP-A"), (b, "RESP-B"), (d, "RESP-D")]
        .iter()
        .map(|(i, r)| format!("{}\n", json!({"main_id": i["main_id"], "response": r})))
        .collect();
    std::fs::write(dir.join("responses.jsonl"), recorded).unwrap();

    let (sa, sb, sd) = (subs(a), subs(b), subs(d));
    let mut rules = Vec::new();
    // A: the first question of every sub-instruction is not met; the rest are.
    for sub in &sa {
        rules.push(json!({"match": judged_piece("RESP-A", sub, &sub.2[0]),
                          "response": "分析：没有满足该约束。\n答案：否"}));
    }
    // B: sub-instruction 0's first question gets prose with neither 是 nor 否 (unjudged);
    // sub-instruction 1's first gets two contradicting markers (否 present: false).
    rules.push(json!({"match": judged_piece("RESP-B", &sb[0], &sb[0].2[0]),
                      "response": "The response satisfies the constraint."}));
    rules.push(json!({"match": judged_piece("RESP-B", &sb[1], &sb[1].2[0]),
                      "response": "答案：是……不对，答案：否"}));
    // Everything else is met, said three ways.
    rules
        .push(json!({"match": "模型回复\\*\\*：\nRESP-A\n", "response": "分析：满足。\n答案：是"}));
    rules.push(json!({"match": "模型回复\\*\\*：\nRESP-B\n", "response": "是的，满足要求"}));
    rules.push(
        json!({"match": "模型回复\\*\\*：\nRESP-D\n", "response": "分析：完全满足\n答案:是"}),
    );
    let (_sim, run, record) = judged_replay(
        dir,
        "pipelines/eval_eifbench.yaml",
        &rules,
        &[
            format!("eifbench={}", s(&dir.join("subset.json"))),
            format!("responses={}", s(&dir.join("responses.jsonl"))),
        ],
    );

    let nq = |s: &[(String, String, Vec<String>)]| s.iter().map(|x| x.2.len()).sum::<usize>();
    let (na, nb, nd, nc) = (nq(&sa), nq(&sb), nq(&sd), nq(&subs(c)));
    // One request per question of A, B and D, each the system line and the judge prompt.
    let sent: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sent.len(), na + nb + nd);
    assert!(sent.iter().all(|r| {
        r["messages"][0]["content"] == "You are a helpful assistant."
            && r["messages"][1]["content"]
                .as_str()
                .unwrap()
                .starts_with("[System]\n请你作为一个客观公正的评委")
    }));

    let counts = query(
        &run,
        "SELECT answer_error, count(*) AS n FROM eifbench_answers WHERE answer IS NULL GROUP BY answer_error ORDER BY answer_error",
    );
    assert_eq!(
        counts,
        vec![
            json!({"answer_error": "no YES or NO in the judge's answer", "n": 1}),
            json!({"answer_error": "no response to judge", "n": nc}),
        ]
    );

    // By hand. A: every sub-task fails (its first question), share true (na - |A subs|) / na.
    // B: one question unjudged (left out), one false, in sub-tasks 0 and 1: sub-task 1 fails.
    // D: everything true. C: not judged, out of the levels.
    let share_a = (na - sa.len()) as f64 / na as f64;
    let share_b = (nb - 2) as f64 / (nb - 1) as f64;
    let sub_b = (sb.len() - 1) as f64 / sb.len() as f64;
    let r4 = |x: f64| (x * 10000.0).round() / 10000.0;
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let e = section(&st, "eifbench");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["items"], json!(4));
    assert_eq!(e[0]["judged_items"], json!(3));
    assert_eq!(e[0]["questions"], json!(na + nb + nc + nd));
    assert_eq!(e[0]["unjudged"], json!(nc + 1));
    assert_eq!(e[0]["task_level_acc"], json!(r4(1.0 / 3.0)));
    assert_eq!(
        e[0]["constraint_level_acc"],
        json!(r4((share_a + share_b + 1.0) / 3.0))
    );
    assert_eq!(
        e[0]["subtask_level_acc"],
        json!(r4((0.0 + sub_b + 1.0) / 3.0))
    );
}
