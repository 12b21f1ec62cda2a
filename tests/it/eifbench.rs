//! EIFBench end to end: `pipelines/eval_eifbench.yaml` judging recorded responses (replay
//! profile) with `ifloom sim` as the judge, on five real items. The simulator's rules fix
//! every judgement (Chinese answers with the reference's `答案：是/否` marker, prose with
//! neither character, two contradicting markers), so the levels are worked out by hand below
//! from the rules, the items' own question counts and the reference's reading
//! (Complex-IF EIFBench/6_evaluation.py `get_answer`, 8_metric.py): a judgement with neither
//! marker nor 是 without 否 is false; an item the model did not answer is judged on the text
//! "None"; an item not among the outputs is not judged.

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
    let (a, b, c, d, e) = (&all[0], &all[1], &all[2], &all[3], &all[4]);
    let tmp = tempdir();
    let dir = tmp.path();
    std::fs::write(
        dir.join("subset.json"),
        serde_json::to_string(&vec![a, b, c, d, e]).unwrap(),
    )
    .unwrap();
    // C has no line in the recorded file: not among the outputs, not judged. E has a line
    // with a null response: judged on the text "None", as the reference does.
    let mut recorded: String = [(a, "RESP-A"), (b, "RESP-B"), (d, "RESP-D")]
        .iter()
        .map(|(i, r)| format!("{}\n", json!({"main_id": i["main_id"], "response": r})))
        .collect();
    recorded.push_str(&format!(
        "{}\n",
        json!({"main_id": e["main_id"], "response": null})
    ));
    std::fs::write(dir.join("responses.jsonl"), recorded).unwrap();

    let (sa, sb, sd, se) = (subs(a), subs(b), subs(d), subs(e));
    assert!(sb.len() >= 2 && sb[0].2.len() >= 2);
    let mut rules = Vec::new();
    // A: the first question of every sub-instruction is not met; the rest are.
    for sub in &sa {
        rules.push(json!({"match": judged_piece("RESP-A", sub, &sub.2[0]),
                          "response": "分析：没有满足该约束。\n答案：否"}));
    }
    // B: sub-instruction 0's first question gets prose with neither 是 nor 否 (the reference
    // reads false; no readable answer); sub-instruction 1's first gets two contradicting
    // markers (not exactly one marker, 否 present: false).
    rules.push(json!({"match": judged_piece("RESP-B", &sb[0], &sb[0].2[0]),
                      "response": "The response satisfies the constraint."}));
    rules.push(json!({"match": judged_piece("RESP-B", &sb[1], &sb[1].2[0]),
                      "response": "答案：是……不对，答案：否"}));
    // Everything else of A, B and D is met, said three ways (D's ASCII colon is no marker
    // for the reference's regex; 是 without 否 still reads true).
    rules
        .push(json!({"match": "模型回复\\*\\*：\nRESP-A\n", "response": "分析：满足。\n答案：是"}));
    rules.push(json!({"match": "模型回复\\*\\*：\nRESP-B\n", "response": "是的，满足要求"}));
    rules.push(
        json!({"match": "模型回复\\*\\*：\nRESP-D\n", "response": "分析：完全满足\n答案:是"}),
    );
    // E: the judge sees "None" as the response and says no.
    rules.push(
        json!({"match": "模型回复\\*\\*：\nNone\n", "response": "分析：模型没有回复。\n答案：否"}),
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
    let (na, nb, nd, ne, nc) = (nq(&sa), nq(&sb), nq(&sd), nq(&se), nq(&subs(c)));
    // One request per question of A, B, D and E, each the system line and the judge prompt.
    let sent: Vec<Value> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sent.len(), na + nb + nd + ne);
    assert!(sent.iter().all(|r| {
        r["messages"][0]["content"] == "You are a helpful assistant."
            && r["messages"][1]["content"]
                .as_str()
                .unwrap()
                .starts_with("[System]\n请你作为一个客观公正的评委")
    }));
    let none_judged = sent
        .iter()
        .filter(|r| {
            r["messages"][1]["content"]
                .as_str()
                .unwrap()
                .contains("- **模型回复**：\nNone\n- **子任务**：")
        })
        .count();
    assert_eq!(none_judged, ne);

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
    let refs = query(
        &run,
        "SELECT count(answer_ref) AS judged, sum(CASE WHEN answer_ref THEN 1 ELSE 0 END) AS yes, \
         sum(CASE WHEN no_response THEN 1 ELSE 0 END) AS no_response FROM eifbench_answers",
    );
    // True: A's all but one per sub-instruction, B's all but two, all of D's; E's none.
    assert_eq!(
        refs,
        vec![json!({"judged": na + nb + nd + ne,
                    "yes": (na - sa.len()) + (nb - 2) + nd,
                    "no_response": ne + nc})]
    );

    // By hand, the reference's levels over A, B, D, E (C is out):
    // A: every sub-task fails (its first question), share true (na - |A subs|) / na.
    // B: two questions false, in sub-tasks 0 and 1: both fail; share (nb - 2) / nb.
    // D: everything true. E: everything false.
    let share_a = (na - sa.len()) as f64 / na as f64;
    let r4 = |x: f64| (x * 10000.0).round() / 10000.0;
    let st: Value = serde_json::from_str(&ok(&root(), &["stats", "--json", s(&run)])).unwrap();
    let ev = section(&st, "eifbench");
    assert_eq!(ev.len(), 1);
    let ev = &ev[0];
    assert_eq!(
        crate::trace::columns(&st, "eifbench")[1],
        "task_level_acc",
        "the headline first"
    );
    assert_eq!(ev["items"], json!(5));
    assert_eq!(ev["judged_items"], json!(4));
    assert_eq!(ev["questions"], json!(na + nb + nc + nd + ne));
    assert_eq!(ev["judged"], json!(na + nb + nd + ne));
    assert_eq!(ev["unjudged"], json!(nc));
    assert_eq!(ev["unreadable"], json!(1));
    assert_eq!(ev["task_level_acc"], json!(0.25));
    let share_b = (nb - 2) as f64 / nb as f64;
    assert_eq!(
        ev["constraint_level_acc"],
        json!(r4((share_a + share_b + 1.0 + 0.0) / 4.0))
    );
    let sub_b = (sb.len() - 2) as f64 / sb.len() as f64;
    assert_eq!(
        ev["subtask_level_acc"],
        json!(r4((0.0 + sub_b + 1.0 + 0.0) / 4.0))
    );
    // The readable levels leave B's unreadable judgement out: its sub-task 0 is then all true.
    let share_b = (nb - 2) as f64 / (nb - 1) as f64;
    let sub_b = (sb.len() - 1) as f64 / sb.len() as f64;
    assert_eq!(ev["readable_task_level_acc"], json!(0.25));
    assert_eq!(
        ev["readable_constraint_level_acc"],
        json!(r4((share_a + share_b + 1.0 + 0.0) / 4.0))
    );
    assert_eq!(
        ev["readable_subtask_level_acc"],
        json!(r4((0.0 + sub_b + 1.0 + 0.0) / 4.0))
    );
}
