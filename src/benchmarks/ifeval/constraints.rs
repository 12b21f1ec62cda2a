//! `kind: ifeval_constraints` — attach 1–3 verifiable constraints of IFEval's 25 types to each
//! prompt, with sampled arguments, rendered as natural instructions (as Tulu 3 built its
//! verifiable IF data), so that the `ifeval` kind can check the answers by code.
//!
//! Per row, deterministically from the stage's `seed` and the row's `_id`:
//! 1. a count n, uniform in `min_constraints..=max_constraints`;
//! 2. n types from `types` (all 25 by default) in a shuffled order, no two of which conflict:
//!    the reference registry's `INSTRUCTION_CONFLICTS` (google-research
//!    `instruction_following_eval/instructions_registry.py`), made symmetric as its
//!    `conflict_make` does, plus [`EXTRA_CONFLICTS`] (pairs whose arguments ifloom cannot make
//!    satisfiable together) and one rule on the row (`repeat_prompt` beside `no_comma` when
//!    the prompt itself has a comma). When no n types fit together, the largest set that
//!    does is taken;
//! 3. arguments for each, with IFEval's kwargs names, in ranges close to the reference's
//!    `build_description` defaults (see [`Draw::kwargs`]); keywords come from the prompt's
//!    own words and short lists written here, not from the reference's word list;
//! 4. one sentence per constraint from ifloom's templates (two or three per type, worded
//!    after the reference's descriptions and Tulu 3's constraint templates).
//!
//! Added columns: `instruction_id_list` (list of ids), `kwargs` (a JSON array with one object
//! per id, as the `ifeval` kind reads it), `constraints` (the rendered sentences),
//! `constrained_prompt` (the prompt, a blank line, the sentences one per line) and
//! `ground_truth` (open-instruct's IFEval reward label: the Python literal
//! `[{'instruction_id': [...], 'kwargs': [{...}, ...]}]` that its `IFEvalVerifier` reads with
//! `ast.literal_eval`). A row whose prompt is null or blank gets no constraint (counter
//! `skipped`).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, ListBuilder, StringArray, StringBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::checks::INSTRUCTION_IDS;
use crate::error::{Diagnostic, Error, Result};
use crate::stages::{
    KindEntry, PlanCtx, RunCtx, RunOutput, Stage, kit, reserved_columns, unknown_column,
};
use crate::table::{is_string_type, with_fields};

pub const KIND: KindEntry = KindEntry {
    name: "ifeval_constraints",
    about: "attach 1-3 IFEval-type constraints with sampled arguments to each prompt, rendered as instructions (seeded)",
    build: crate::stages::build::<IfevalConstraintsStage>,
    schema: |g| IfevalConstraintsStage::json_schema(g),
    capabilities: &[],
    removed_rows: "",
};

fn d_prompt() -> String {
    "prompt".into()
}
fn d_min() -> usize {
    1
}
fn d_max() -> usize {
    3
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IfevalConstraintsStage {
    /// Text column with the prompt the constraints are added to.
    #[serde(default = "d_prompt")]
    pub prompt: String,
    /// Seed of the draws (with each row's `_id`): the same seed gives the same constraints.
    #[serde(default)]
    pub seed: u64,
    /// Fewest constraints per prompt (default 1).
    #[serde(default = "d_min")]
    pub min_constraints: usize,
    /// Most constraints per prompt (default 3).
    #[serde(default = "d_max")]
    pub max_constraints: usize,
    /// The instruction types to draw from (default: all 25 IFEval types): a list, or one
    /// string of comma-separated ids (what `--set types=a,b` can pass).
    #[serde(default)]
    pub types: Option<TypeList>,
}

/// A list of instruction ids, or one comma-separated string of them.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TypeList {
    List(Vec<String>),
    Csv(String),
}

impl TypeList {
    fn names(&self) -> Vec<String> {
        match self {
            TypeList::List(v) => v.clone(),
            TypeList::Csv(s) => s
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
        }
    }
}

const ADDED: [&str; 5] = [
    "instruction_id_list",
    "kwargs",
    "constraints",
    "constrained_prompt",
    "ground_truth",
];

/// The most constraints a prompt can take (four types fit with anything but a handful).
const MAX_CONSTRAINTS: usize = 5;

fn string_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

impl IfevalConstraintsStage {
    fn types(&self) -> Vec<&'static str> {
        match &self.types {
            None => INSTRUCTION_IDS.to_vec(),
            Some(ts) => {
                let ts = ts.names();
                INSTRUCTION_IDS
                    .iter()
                    .copied()
                    .filter(|id| ts.iter().any(|t| t == id))
                    .collect()
            }
        }
    }
}

impl Stage for IfevalConstraintsStage {
    fn needs_id(&self) -> bool {
        true
    }

    // The instruction types as resolved (the registry's order, `types:` applied).
    fn fingerprint_extra(&self) -> serde_json::Value {
        json!({ "types": self.types() })
    }

    fn plan(&self, ctx: &PlanCtx) -> Result<SchemaRef, Vec<Diagnostic>> {
        let schema = ctx.parent();
        let mut errs = Vec::new();
        match schema.field_with_name(&self.prompt) {
            Err(_) => errs.push(unknown_column(ctx, &["prompt"], &self.prompt, schema)),
            Ok(f) if !is_string_type(f.data_type()) => errs.push(
                ctx.err(
                    &["prompt"],
                    format!(
                        "column `{}` is {}, but the prompt must be text",
                        self.prompt,
                        f.data_type()
                    ),
                )
                .hint("cast it upstream"),
            ),
            Ok(_) => {}
        }
        let range_ok = (1..=self.max_constraints).contains(&self.min_constraints)
            && self.max_constraints <= MAX_CONSTRAINTS;
        if !range_ok {
            let at = if self.min_constraints < 1 {
                "min_constraints"
            } else {
                "max_constraints"
            };
            errs.push(ctx.err(
                &[at],
                format!(
                    "constraints per prompt must satisfy 1 <= min_constraints <= max_constraints <= {MAX_CONSTRAINTS}, got {}..={}",
                    self.min_constraints, self.max_constraints
                ),
            ));
        }
        if let Some(ts) = self.types.as_ref().map(TypeList::names) {
            let before = errs.len();
            let mut seen = HashSet::new();
            for t in &ts {
                if !INSTRUCTION_IDS.contains(&t.as_str()) {
                    errs.push(
                        ctx.err(&["types"], format!("unknown IFEval instruction type {t:?}"))
                            .maybe_hint(crate::error::did_you_mean(
                                t,
                                INSTRUCTION_IDS.iter().copied(),
                            ))
                            .hint_if_none(format!(
                                "the 25 types are IFEval's ids, e.g. {}",
                                INSTRUCTION_IDS[..3].join(", ")
                            )),
                    );
                } else if !seen.insert(t) {
                    errs.push(ctx.err(&["types"], format!("type {t:?} is listed twice")));
                }
            }
            if ts.is_empty() {
                errs.push(
                    ctx.err(&["types"], "no instruction type to draw from")
                        .hint("leave `types` out to draw from all 25"),
                );
            }
            let types = self.types();
            if range_ok
                && errs.len() == before
                && largest_compatible(&types, self.min_constraints) < self.min_constraints
            {
                errs.push(
                    ctx.err(
                        &["types"],
                        format!(
                            "no {} of these types may be combined (IFEval's INSTRUCTION_CONFLICTS), so min_constraints cannot be met",
                            self.min_constraints
                        ),
                    )
                    .hint("add types or lower min_constraints"),
                );
            }
        }
        errs.extend(reserved_columns(
            ctx,
            &ADDED,
            "which ifeval_constraints adds",
        ));
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(out_schema(schema))
    }

    fn schema_despite_errors(&self, ctx: &PlanCtx) -> Option<SchemaRef> {
        let kept: Vec<Field> = ctx
            .parent()
            .fields()
            .iter()
            .filter(|f| !ADDED.contains(&f.name().as_str()))
            .map(|f| f.as_ref().clone())
            .collect();
        Some(out_schema(&Schema::new(kept)))
    }

    fn run(&self, ctx: &RunCtx) -> Result<RunOutput> {
        let types = self.types();
        let mut out = RunOutput::default();
        let mut count = |name: String, n: i64| *out.counters.entry(name).or_default() += n;
        kit::append_columns(ctx, |b| {
            let col = |name: &str| -> Result<StringArray> {
                let c = b
                    .column_by_name(name)
                    .ok_or_else(|| Error::Internal(format!("ifeval_constraints: no {name}")))?;
                let c = cast(c, &DataType::Utf8)?;
                Ok(c.as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| Error::Internal(format!("{name} is not Utf8")))?
                    .clone())
            };
            let prompts = col(&self.prompt)?;
            let ids = col("_id")?;
            let mut id_list = ListBuilder::new(StringBuilder::new());
            let mut texts = ListBuilder::new(StringBuilder::new());
            let mut kwargs = StringBuilder::new();
            let mut constrained = StringBuilder::new();
            let mut truth = StringBuilder::new();
            for i in 0..b.num_rows() {
                let prompt = (!prompts.is_null(i)).then(|| prompts.value(i));
                let Some(prompt) = prompt.filter(|p| !p.trim().is_empty()) else {
                    id_list.append(true);
                    texts.append(true);
                    kwargs.append_value("[]");
                    constrained.append_null();
                    truth.append_null();
                    count("skipped".into(), 1);
                    continue;
                };
                let row_id = if ids.is_null(i) { "" } else { ids.value(i) };
                let s = sample(
                    prompt,
                    row_id,
                    self.seed,
                    &types,
                    self.min_constraints,
                    self.max_constraints,
                );
                for id in &s.ids {
                    id_list.values().append_value(id);
                    count(format!("type:{id}"), 1);
                }
                id_list.append(true);
                for t in &s.texts {
                    texts.values().append_value(t);
                }
                texts.append(true);
                kwargs.append_value(Value::from(s.kwargs.clone()).to_string());
                constrained.append_value(s.constrained_prompt(prompt));
                truth.append_value(s.ground_truth());
                count(format!("with_{}", s.ids.len()), 1);
                count("constraints".into(), s.ids.len() as i64);
            }
            Ok(vec![
                Arc::new(id_list.finish()) as ArrayRef,
                Arc::new(kwargs.finish()),
                Arc::new(texts.finish()),
                Arc::new(constrained.finish()),
                Arc::new(truth.finish()),
            ])
        })?;
        Ok(out)
    }
}

fn out_schema(parent: &Schema) -> SchemaRef {
    with_fields(
        parent,
        &[
            Field::new("instruction_id_list", string_list(), true),
            Field::new("kwargs", DataType::Utf8, true),
            Field::new("constraints", string_list(), true),
            Field::new("constrained_prompt", DataType::Utf8, true),
            Field::new("ground_truth", DataType::Utf8, true),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Conflicts

/// One entry of the reference's `INSTRUCTION_CONFLICTS`: the listed types, or every type but
/// the listed ones (`set(INSTRUCTION_DICT.keys()).difference({...})`).
enum Conflicts {
    Only(&'static [&'static str]),
    AllBut(&'static [&'static str]),
}

/// `INSTRUCTION_CONFLICTS` of google-research `instruction_following_eval/instructions_registry.py`,
/// entry for entry (open-instruct's IFEvalG copy has the same for these 25 types).
const REGISTRY_CONFLICTS: [(&str, Conflicts); 25] = {
    use Conflicts::{AllBut, Only};
    [
        ("keywords:existence", Only(&["keywords:existence"])),
        ("keywords:frequency", Only(&["keywords:frequency"])),
        (
            "keywords:forbidden_words",
            Only(&["keywords:forbidden_words"]),
        ),
        (
            "keywords:letter_frequency",
            Only(&["keywords:letter_frequency"]),
        ),
        (
            "language:response_language",
            Only(&[
                "language:response_language",
                "detectable_format:multiple_sections",
                "keywords:existence",
                "keywords:frequency",
                "keywords:forbidden_words",
                "startend:end_checker",
                "change_case:english_capital",
                "change_case:english_lowercase",
            ]),
        ),
        (
            "length_constraints:number_sentences",
            Only(&["length_constraints:number_sentences"]),
        ),
        (
            "length_constraints:number_paragraphs",
            Only(&[
                "length_constraints:number_paragraphs",
                "length_constraints:nth_paragraph_first_word",
                "length_constraints:number_sentences",
            ]),
        ),
        (
            "length_constraints:number_words",
            Only(&["length_constraints:number_words"]),
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            Only(&[
                "length_constraints:nth_paragraph_first_word",
                "length_constraints:number_paragraphs",
            ]),
        ),
        (
            "detectable_content:number_placeholders",
            Only(&["detectable_content:number_placeholders"]),
        ),
        (
            "detectable_content:postscript",
            Only(&["detectable_content:postscript"]),
        ),
        (
            "detectable_format:number_bullet_lists",
            Only(&["detectable_format:number_bullet_lists"]),
        ),
        ("detectable_format:constrained_response", AllBut(&[])),
        (
            "detectable_format:number_highlighted_sections",
            Only(&["detectable_format:number_highlighted_sections"]),
        ),
        (
            "detectable_format:multiple_sections",
            Only(&[
                "detectable_format:multiple_sections",
                "language:response_language",
                "detectable_format:number_highlighted_sections",
            ]),
        ),
        (
            "detectable_format:json_format",
            AllBut(&["keywords:forbidden_words", "keywords:existence"]),
        ),
        (
            "detectable_format:title",
            Only(&["detectable_format:title"]),
        ),
        (
            "combination:two_responses",
            AllBut(&[
                "keywords:forbidden_words",
                "keywords:existence",
                "language:response_language",
                "detectable_format:title",
                "punctuation:no_comma",
            ]),
        ),
        (
            "combination:repeat_prompt",
            AllBut(&[
                "keywords:existence",
                "detectable_format:title",
                "punctuation:no_comma",
            ]),
        ),
        ("startend:end_checker", Only(&["startend:end_checker"])),
        (
            "change_case:capital_word_frequency",
            Only(&[
                "change_case:capital_word_frequency",
                "change_case:english_lowercase",
                "change_case:english_capital",
            ]),
        ),
        (
            "change_case:english_capital",
            Only(&["change_case:english_capital"]),
        ),
        (
            "change_case:english_lowercase",
            Only(&[
                "change_case:english_lowercase",
                "change_case:english_capital",
            ]),
        ),
        ("punctuation:no_comma", Only(&["punctuation:no_comma"])),
        (
            "startend:quotation",
            Only(&["startend:quotation", "detectable_format:title"]),
        ),
    ]
};

/// Pairs the registry allows but whose arguments, as ifloom draws them, could not be met
/// together: a count of an English letter, of all-capital words or an English first word in
/// an answer written in, say, Thai; and a lowercase-only answer whose sections must be
/// marked `Section 1` (the splitter is matched case-sensitively).
pub const EXTRA_CONFLICTS: [(&str, &str); 4] = [
    ("language:response_language", "keywords:letter_frequency"),
    (
        "language:response_language",
        "change_case:capital_word_frequency",
    ),
    (
        "language:response_language",
        "length_constraints:nth_paragraph_first_word",
    ),
    (
        "change_case:english_lowercase",
        "detectable_format:multiple_sections",
    ),
];

fn listed(a: &str, b: &str) -> bool {
    REGISTRY_CONFLICTS.iter().any(|(k, c)| {
        *k == a
            && match c {
                Conflicts::Only(set) => set.contains(&b),
                Conflicts::AllBut(set) => !set.contains(&b),
            }
    })
}

/// May `a` and `b` not be given together? The registry's conflicts both ways (its
/// `conflict_make`), every type with itself, and [`EXTRA_CONFLICTS`].
pub fn conflicts(a: &str, b: &str) -> bool {
    a == b
        || listed(a, b)
        || listed(b, a)
        || EXTRA_CONFLICTS
            .iter()
            .any(|&(x, y)| (x == a && y == b) || (x == b && y == a))
}

/// May `a` and `b` be given together to this prompt? Repeating a prompt that has a comma
/// breaks "no commas".
fn compatible_for(prompt: &str, a: &str, b: &str) -> bool {
    if conflicts(a, b) {
        return false;
    }
    let pair = |x: &str, y: &str| (a == x && b == y) || (a == y && b == x);
    !(pair("combination:repeat_prompt", "punctuation:no_comma") && prompt.contains(','))
}

/// The first set of `n` mutually compatible types in `order` (depth first, so the order
/// decides which), or `None`.
fn first_set(
    order: &[&'static str],
    n: usize,
    ok: &dyn Fn(&str, &str) -> bool,
) -> Option<Vec<&'static str>> {
    fn go(
        order: &[&'static str],
        start: usize,
        n: usize,
        ok: &dyn Fn(&str, &str) -> bool,
        chosen: &mut Vec<&'static str>,
    ) -> bool {
        if chosen.len() == n {
            return true;
        }
        for i in start..order.len() {
            if chosen.iter().all(|c| ok(c, order[i])) {
                chosen.push(order[i]);
                if go(order, i + 1, n, ok, chosen) {
                    return true;
                }
                chosen.pop();
            }
        }
        false
    }
    let mut chosen = Vec::with_capacity(n);
    go(order, 0, n, ok, &mut chosen).then_some(chosen)
}

/// The size of the largest compatible set of `types`, up to `cap` (for plan-time checks).
fn largest_compatible(types: &[&'static str], cap: usize) -> usize {
    (1..=cap)
        .rev()
        .find(|&n| first_set(types, n, &|a, b| !conflicts(a, b)).is_some())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Draws

/// splitmix64 over a seed made of the stage's seed and the row's `_id`: the same on every
/// machine and in every version of every crate.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, row_id: &str) -> Rng {
        Rng(xxhash_rust::xxh3::xxh3_64_with_seed(
            row_id.as_bytes(),
            seed,
        ))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}

/// Words too common to be keywords (ifloom's list).
const STOPWORDS: &[&str] = &[
    "about",
    "above",
    "after",
    "again",
    "also",
    "among",
    "another",
    "answer",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "could",
    "describe",
    "does",
    "doing",
    "down",
    "each",
    "explain",
    "following",
    "from",
    "give",
    "have",
    "having",
    "help",
    "here",
    "into",
    "just",
    "know",
    "like",
    "make",
    "many",
    "more",
    "most",
    "much",
    "must",
    "need",
    "only",
    "other",
    "over",
    "please",
    "same",
    "should",
    "some",
    "such",
    "tell",
    "than",
    "that",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "under",
    "until",
    "upon",
    "using",
    "very",
    "want",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "will",
    "with",
    "within",
    "without",
    "would",
    "write",
    "your",
    "yours",
];

/// Keywords to work into an answer when the prompt offers none (ifloom's list; the reference
/// draws from a 200-word list, not copied here).
const KEYWORDS: &[&str] = &[
    "balance",
    "benefit",
    "challenge",
    "community",
    "detail",
    "example",
    "future",
    "history",
    "journey",
    "morning",
    "network",
    "pattern",
    "practice",
    "quality",
    "question",
    "reason",
    "resource",
    "season",
    "simple",
    "solution",
];

/// Words to forbid: fillers that models overuse, so avoiding them is a real constraint that
/// never fights the prompt's topic (ifloom's list).
pub const FORBIDDEN: &[&str] = &[
    "actually",
    "additionally",
    "basically",
    "crucial",
    "delve",
    "essentially",
    "furthermore",
    "importantly",
    "literally",
    "moreover",
    "overall",
    "really",
    "simply",
    "truly",
    "ultimately",
    "utilize",
];

/// First words of a paragraph (ifloom's list).
pub const FIRST_WORDS: &[&str] = &[
    "first",
    "next",
    "finally",
    "today",
    "imagine",
    "consider",
    "historically",
    "interestingly",
    "fortunately",
    "meanwhile",
    "sometimes",
    "instead",
];

/// End phrases: the reference's two, and four more of ifloom's.
pub const END_PHRASES: &[&str] = &[
    "Any other questions?",
    "Is there anything else I can help with?",
    "Let me know if you have further questions.",
    "I hope this helps.",
    "That is all for now.",
    "Thank you for reading.",
];

/// The languages the reference's `build_description` can name (its `LANGUAGE_CODES`, which
/// open-instruct's verifier indexes), English left out: asked of English prompts it says
/// nothing. All are langdetect codes, so the `ifeval` kind accepts them.
pub const LANGUAGES: &[(&str, &str)] = &[
    ("es", "Spanish"),
    ("pt", "Portuguese"),
    ("ar", "Arabic"),
    ("hi", "Hindi"),
    ("fr", "French"),
    ("ru", "Russian"),
    ("de", "German"),
    ("ja", "Japanese"),
    ("it", "Italian"),
    ("bn", "Bengali"),
    ("uk", "Ukrainian"),
    ("th", "Thai"),
    ("ur", "Urdu"),
    ("ta", "Tamil"),
    ("te", "Telugu"),
    ("bg", "Bulgarian"),
    ("ko", "Korean"),
    ("pl", "Polish"),
    ("he", "Hebrew"),
    ("fa", "Persian"),
    ("vi", "Vietnamese"),
    ("ne", "Nepali"),
    ("sw", "Swahili"),
    ("kn", "Kannada"),
    ("mr", "Marathi"),
    ("gu", "Gujarati"),
    ("pa", "Punjabi"),
    ("ml", "Malayalam"),
    ("fi", "Finnish"),
];

/// Common letters are asked for at least N times, rare ones fewer than N times: both can be
/// met in an ordinary answer.
const COMMON_LETTERS: &[&str] = &["a", "e", "i", "o", "n", "s", "t", "r", "l"];
const RARE_LETTERS: &[&str] = &["j", "q", "x", "z", "k", "v"];

/// The prompt's own candidate keywords: lowercase ASCII words of 4 to 12 letters, not a stop
/// word nor a forbidden word, first occurrence order.
fn prompt_words(prompt: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    prompt
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| (4..=12).contains(&w.len()))
        .map(str::to_ascii_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()) && !FORBIDDEN.contains(&w.as_str()))
        .filter(|w| seen.insert(w.clone()))
        .collect()
}

/// What is drawn for one row.
struct Draw<'a> {
    rng: Rng,
    prompt: &'a str,
    chosen: Vec<&'static str>,
    words: Vec<String>,
    used: HashSet<String>,
}

impl Draw<'_> {
    /// A keyword not used yet in this row: from the prompt when `from_prompt` and it has one,
    /// else from [`KEYWORDS`].
    fn keyword(&mut self, from_prompt: bool) -> String {
        let fresh = |ws: Vec<String>, used: &HashSet<String>| -> Vec<String> {
            ws.into_iter().filter(|w| !used.contains(w)).collect()
        };
        let mut pool = if from_prompt {
            fresh(self.words.clone(), &self.used)
        } else {
            Vec::new()
        };
        if pool.is_empty() {
            pool = fresh(KEYWORDS.iter().map(|s| s.to_string()).collect(), &self.used);
        }
        let w = self.rng.pick(&pool).clone();
        self.used.insert(w.clone());
        w
    }

    fn relation(&mut self) -> &'static str {
        if self.rng.coin() {
            "at least"
        } else {
            "less than"
        }
    }

    /// IFEval's kwargs for `id`, with ranges near the reference's defaults (noted per type).
    fn kwargs(&mut self, id: &str) -> Map<String, Value> {
        let r = &mut self.rng;
        let v = match id {
            // Reference: two words of its list. Here: one of the prompt's words (on topic, a
            // good answer can use it) and one of KEYWORDS (to be worked in), sorted as the
            // reference sorts them.
            "keywords:existence" => {
                let mut ks = vec![self.keyword(true), self.keyword(false)];
                ks.sort();
                json!({ "keywords": ks })
            }
            // Reference: 1..=3 times, either relation. "Less than 1" would be a forbidden word.
            "keywords:frequency" => {
                let keyword = self.keyword(true);
                let relation = self.relation();
                let lo = if relation == "at least" { 1 } else { 2 };
                let frequency = self.rng.range(lo, 3);
                json!({ "keyword": keyword, "frequency": frequency, "relation": relation })
            }
            "keywords:forbidden_words" => {
                let n = 1 + r.below(2);
                let mut ws: Vec<&str> = FORBIDDEN.to_vec();
                r.shuffle(&mut ws);
                let mut ws = ws[..n].to_vec();
                ws.sort_unstable();
                json!({ "forbidden_words": ws })
            }
            // Reference: any letter, 1..=10 times, either relation.
            "keywords:letter_frequency" => {
                if r.coin() {
                    let letter = *r.pick(COMMON_LETTERS);
                    json!({ "letter": letter, "let_frequency": r.range(5, 10), "let_relation": "at least" })
                } else {
                    let letter = *r.pick(RARE_LETTERS);
                    json!({ "letter": letter, "let_frequency": r.range(2, 6), "let_relation": "less than" })
                }
            }
            "language:response_language" => json!({ "language": r.pick(LANGUAGES).0 }),
            // Reference: 1..=20. "Less than 1" or "2" cannot be met by an answer.
            "length_constraints:number_sentences" => {
                let relation = self.relation();
                let (lo, hi) = if relation == "at least" {
                    (2, 12)
                } else {
                    (4, 15)
                };
                json!({ "num_sentences": self.rng.range(lo, hi), "relation": relation })
            }
            // Reference: 1..=5; one paragraph asks for no divider, so 2..=5.
            "length_constraints:number_paragraphs" => {
                json!({ "num_paragraphs": r.range(2, 5) })
            }
            // Reference: 100..=500, either relation. Multiples of 10 read naturally.
            "length_constraints:number_words" => {
                let relation = self.relation();
                let (lo, hi) = if relation == "at least" {
                    (5, 40)
                } else {
                    (5, 30)
                };
                json!({ "num_words": 10 * self.rng.range(lo, hi), "relation": relation })
            }
            "length_constraints:nth_paragraph_first_word" => {
                let n = r.range(2, 5);
                let nth = r.range(1, n);
                json!({ "num_paragraphs": n, "nth_paragraph": nth, "first_word": *r.pick(FIRST_WORDS) })
            }
            "detectable_content:number_placeholders" => {
                json!({ "num_placeholders": r.range(1, 4) })
            }
            "detectable_content:postscript" => {
                json!({ "postscript_marker": *r.pick(&["P.S.", "P.P.S"]) })
            }
            "detectable_format:number_bullet_lists" => json!({ "num_bullets": r.range(1, 5) }),
            "detectable_format:number_highlighted_sections" => {
                json!({ "num_highlights": r.range(1, 4) })
            }
            // Reference: "Section" or "SECTION", 1..=5 sections. An all-capitals answer must
            // use SECTION.
            "detectable_format:multiple_sections" => {
                let splitter = if self.chosen.contains(&"change_case:english_capital") {
                    "SECTION"
                } else {
                    *r.pick(&["Section", "SECTION"])
                };
                json!({ "section_spliter": splitter, "num_sections": r.range(2, 5) })
            }
            "combination:repeat_prompt" => json!({ "prompt_to_repeat": self.prompt }),
            "startend:end_checker" => json!({ "end_phrase": *r.pick(END_PHRASES) }),
            // Reference: 1..=20, either relation. "I" counts as a capital word, so "less
            // than" starts at 5.
            "change_case:capital_word_frequency" => {
                let relation = self.relation();
                let (lo, hi) = if relation == "at least" {
                    (2, 10)
                } else {
                    (5, 15)
                };
                json!({ "capital_frequency": self.rng.range(lo, hi), "capital_relation": relation })
            }
            // constrained_response, json_format, title, two_responses, english_capital,
            // english_lowercase, no_comma, quotation: no arguments.
            _ => json!({}),
        };
        match v {
            Value::Object(m) => m,
            _ => unreachable!("kwargs are objects"),
        }
    }
}

/// One row's constraints.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub ids: Vec<&'static str>,
    pub kwargs: Vec<Map<String, Value>>,
    pub texts: Vec<String>,
}

impl Sampled {
    /// The prompt, a blank line, then one constraint per line.
    pub fn constrained_prompt(&self, prompt: &str) -> String {
        if self.texts.is_empty() {
            return prompt.to_string();
        }
        format!("{}\n\n{}", prompt.trim_end(), self.texts.join("\n"))
    }

    /// open-instruct's IFEval label (`IFEvalVerifier` in `open_instruct/ground_truth_utils.py`
    /// reads it with `ast.literal_eval(label)[0]`): `[{'instruction_id': [...], 'kwargs':
    /// [{...}, ...]}]`, written as Python's `str()` writes that list.
    pub fn ground_truth(&self) -> String {
        let mut m = Map::new();
        m.insert("instruction_id".into(), json!(self.ids));
        m.insert(
            "kwargs".into(),
            Value::Array(self.kwargs.iter().cloned().map(Value::Object).collect()),
        );
        py_literal(&Value::Array(vec![Value::Object(m)]))
    }
}

/// A JSON value as Python's `repr()` writes the equal Python value (None, True, 'text', ...).
pub fn py_literal(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => crate::udf::py_str_repr(s),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", crate::udf::py_str_repr(k), py_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Draw a row's constraints: `min..=max` of `types`, none conflicting, with arguments and
/// texts. Deterministic in (`seed`, `row_id`, `prompt`).
pub fn sample(
    prompt: &str,
    row_id: &str,
    seed: u64,
    types: &[&'static str],
    min: usize,
    max: usize,
) -> Sampled {
    let mut rng = Rng::new(seed, row_id);
    let n = rng.range(min as u64, max as u64) as usize;
    let mut order = types.to_vec();
    rng.shuffle(&mut order);
    let ok = |a: &str, b: &str| compatible_for(prompt, a, b);
    let chosen = (1..=n)
        .rev()
        .find_map(|k| first_set(&order, k, &ok))
        .unwrap_or_default();
    let mut d = Draw {
        rng,
        prompt,
        chosen: chosen.clone(),
        words: prompt_words(prompt),
        used: HashSet::new(),
    };
    let mut out = Sampled {
        ids: chosen.clone(),
        kwargs: Vec::new(),
        texts: Vec::new(),
    };
    for id in chosen {
        let kw = d.kwargs(id);
        let variant = d.rng.next();
        out.texts.push(render(id, &kw, variant));
        out.kwargs.push(kw);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Texts

fn quoted_list(ws: &[Value]) -> String {
    let ws: Vec<String> = ws
        .iter()
        .map(|w| format!("\"{}\"", w.as_str().unwrap_or_default()))
        .collect();
    match ws.len() {
        0 => String::new(),
        1 => ws[0].clone(),
        n => format!("{} and {}", ws[..n - 1].join(", "), ws[n - 1]),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The sentence asking for `id` with `kw`; `variant` picks one of the type's templates.
/// ifloom's wording, after the reference's `build_description` patterns (template 0 is
/// usually close to the reference's) and Tulu 3's constraint templates.
pub fn render(id: &str, kw: &Map<String, Value>, variant: u64) -> String {
    let n = |k: &str| kw.get(k).and_then(Value::as_u64).unwrap_or_default();
    let s = |k: &str| {
        kw.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let list = |k: &str| quoted_list(kw.get(k).and_then(Value::as_array).map_or(&[], |v| v));
    // "at least" / "less than", or "fewer than" in the second wording.
    let rel = |k: &str, alt: bool| {
        let r = s(k);
        if alt && r == "less than" {
            "fewer than".to_string()
        } else {
            r
        }
    };
    let pick =
        |templates: &[String]| templates[(variant % templates.len() as u64) as usize].clone();
    match id {
        "keywords:existence" => pick(&[
            format!("Include the keywords {} in your response.", list("keywords")),
            format!("Make sure your answer uses the words {}.", list("keywords")),
            format!("Your response must mention {}.", list("keywords")),
        ]),
        "keywords:frequency" => pick(&[
            format!(
                "In your response, the word \"{}\" should appear {} {} times.",
                s("keyword"),
                rel("relation", false),
                n("frequency")
            ),
            format!(
                "Use the word \"{}\" {} {} in your answer.",
                s("keyword"),
                rel("relation", true),
                plural(n("frequency"), "time", "times")
            ),
        ]),
        "keywords:forbidden_words" => {
            let n_words = kw.get("forbidden_words").and_then(Value::as_array).map_or(0, Vec::len);
            let the = if n_words == 1 { "the word" } else { "the words" };
            let ws = list("forbidden_words");
            pick(&[
                format!("Do not include {the} {ws} in your response."),
                format!("Avoid {the} {ws} anywhere in your answer."),
                format!("Your answer must not contain {ws}."),
            ])
        }
        "keywords:letter_frequency" => pick(&[
            format!(
                "In your response, the letter {} should appear {} {} times.",
                s("letter"),
                rel("let_relation", false),
                n("let_frequency")
            ),
            format!(
                "Make sure the letter \"{}\" appears {} {} in your answer.",
                s("letter"),
                rel("let_relation", true),
                plural(n("let_frequency"), "time", "times")
            ),
        ]),
        "language:response_language" => {
            let code = s("language");
            let name = LANGUAGES
                .iter()
                .find(|(c, _)| *c == code)
                .map_or(code.as_str(), |(_, n)| n);
            pick(&[
                format!(
                    "Your ENTIRE response should be in {name} language, no other language is allowed."
                ),
                format!("Answer only in {name}; do not use any other language."),
                format!("Write your whole response in {name}, and in no other language."),
            ])
        }
        "length_constraints:number_sentences" => pick(&[
            format!(
                "Your response should contain {} {} sentences.",
                rel("relation", false),
                n("num_sentences")
            ),
            format!(
                "Answer in {} {}.",
                rel("relation", true),
                plural(n("num_sentences"), "sentence", "sentences")
            ),
        ]),
        "length_constraints:number_paragraphs" => pick(&[
            format!(
                "There should be {} paragraphs. Paragraphs are separated with the markdown divider: ***",
                n("num_paragraphs")
            ),
            format!(
                "Write exactly {} paragraphs, separated from each other by the markdown divider ***.",
                n("num_paragraphs")
            ),
        ]),
        "length_constraints:number_words" => pick(&[
            format!(
                "Answer with {} {} words.",
                rel("relation", false),
                n("num_words")
            ),
            format!(
                "Your response should be {} {} words long.",
                rel("relation", true),
                n("num_words")
            ),
        ]),
        "length_constraints:nth_paragraph_first_word" => pick(&[
            format!(
                "There should be {} paragraphs. Paragraphs and only paragraphs are separated with each other by two new lines as if it was '\\n\\n' in python. Paragraph {} must start with word {}.",
                n("num_paragraphs"),
                n("nth_paragraph"),
                s("first_word")
            ),
            format!(
                "Write {} paragraphs separated by one blank line (two new lines) and nothing else; the {} paragraph must begin with the word \"{}\".",
                n("num_paragraphs"),
                ordinal(n("nth_paragraph")),
                s("first_word")
            ),
        ]),
        "detectable_content:number_placeholders" => pick(&[
            format!(
                "The response must contain at least {} represented by square brackets, such as [address].",
                plural(n("num_placeholders"), "placeholder", "placeholders")
            ),
            format!(
                "Include at least {} in square brackets, like [name], for details to be filled in later.",
                plural(n("num_placeholders"), "placeholder", "placeholders")
            ),
        ]),
        "detectable_content:postscript" => pick(&[
            format!(
                "At the end of your response, please explicitly add a postscript starting with {}",
                s("postscript_marker")
            ),
            format!(
                "End your answer with a postscript that starts with {}",
                s("postscript_marker")
            ),
        ]),
        "detectable_format:number_bullet_lists" => pick(&[
            format!(
                "Your answer must contain exactly {}. Use the markdown bullet points such as:\n* This is point 1.\n* This is point 2",
                plural(n("num_bullets"), "bullet point", "bullet points")
            ),
            format!(
                "Format your answer as exactly {} (lines starting with \"* \"), and use no other list items.",
                plural(n("num_bullets"), "markdown bullet point", "markdown bullet points")
            ),
        ]),
        "detectable_format:constrained_response" => pick(&[
            "Answer with one of the following options: ('My answer is yes.', 'My answer is no.', 'My answer is maybe.')".to_string(),
            "Reply with exactly one of these: \"My answer is yes.\", \"My answer is no.\" or \"My answer is maybe.\"".to_string(),
        ]),
        "detectable_format:number_highlighted_sections" => pick(&[
            format!(
                "Highlight at least {} in your answer with markdown, i.e. *highlighted section*.",
                plural(n("num_highlights"), "section", "sections")
            ),
            format!(
                "Mark at least {} of your answer as highlighted with single asterisks, like *this part*.",
                plural(n("num_highlights"), "part", "parts")
            ),
        ]),
        "detectable_format:multiple_sections" => {
            let sp = s("section_spliter");
            pick(&[
                format!(
                    "Your response must have {} sections. Mark the beginning of each section with {sp} X, such as:\n{sp} 1\n[content of section 1]\n{sp} 2\n[content of section 2]",
                    n("num_sections")
                ),
                format!(
                    "Split your answer into {} sections, each beginning with a line \"{sp} X\" where X is its number ({sp} 1, {sp} 2, ...).",
                    n("num_sections")
                ),
            ])
        }
        "detectable_format:json_format" => pick(&[
            "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.".to_string(),
            "Give your whole answer as JSON; a ```json fence around it is fine.".to_string(),
        ]),
        "detectable_format:title" => pick(&[
            "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.".to_string(),
            "Give your answer a title in double angular brackets, for example <<a short title>>.".to_string(),
        ]),
        "combination:two_responses" => pick(&[
            "Give two different responses. Responses and only responses should be separated by 6 asterisk symbols: ******.".to_string(),
            "Write two different answers, separated by six asterisks (******) and nothing else.".to_string(),
        ]),
        "combination:repeat_prompt" => pick(&[
            "First repeat the request above word for word without change, then give your answer (1. do not say any words or characters before repeating the request; 2. the request you need to repeat does not include these instructions).".to_string(),
            "Before answering, copy the request above exactly as it is written, without these instructions and with nothing before it; then answer it.".to_string(),
        ]),
        "startend:end_checker" => pick(&[
            format!(
                "Finish your response with this exact phrase: \"{}\" No other words should follow this phrase.",
                s("end_phrase")
            ),
            format!(
                "End your answer with the exact phrase \"{}\", with nothing after it.",
                s("end_phrase")
            ),
        ]),
        "change_case:capital_word_frequency" => pick(&[
            format!(
                "In your response, words with all capital letters should appear {} {} times.",
                rel("capital_relation", false),
                n("capital_frequency")
            ),
            format!(
                "Use {} {} written entirely in capital letters.",
                rel("capital_relation", true),
                plural(n("capital_frequency"), "word", "words")
            ),
        ]),
        "change_case:english_capital" => pick(&[
            "Your entire response should be in English, and in all capital letters.".to_string(),
            "Write your whole answer in English, using capital letters only.".to_string(),
        ]),
        "change_case:english_lowercase" => pick(&[
            "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed.".to_string(),
            "Answer in English and in lowercase letters only; no capital letters at all.".to_string(),
        ]),
        "punctuation:no_comma" => pick(&[
            "In your entire response, refrain from the use of any commas.".to_string(),
            "Do not use any commas in your answer.".to_string(),
        ]),
        "startend:quotation" => pick(&[
            "Wrap your entire response with double quotation marks.".to_string(),
            "Put your whole answer inside double quotation marks.".to_string(),
        ]),
        other => format!("({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::checks::Instruction;
    use super::*;

    const PROMPTS: [&str; 5] = [
        "Can you tell me about GLaDOS?",
        "Write a short story about a lighthouse keeper who finds a message in a bottle, and explain what it means.",
        "why some poeple prefer short happiness ?",
        "Use ABC notation to write a melody in the style of a folk tune.",
        "Compare Rust and Python for writing command line tools",
    ];

    fn rows(n: usize) -> impl Iterator<Item = (String, &'static str)> {
        (0..n).map(|i| (format!("{i:016x}"), PROMPTS[i % PROMPTS.len()]))
    }

    #[test]
    fn every_sampled_row_parses_with_ifevals_own_parser_and_has_no_conflict() {
        let mut count_sizes = [0usize; 4];
        for (id, prompt) in rows(3000) {
            let s = sample(prompt, &id, 7, &INSTRUCTION_IDS, 1, 3);
            assert!((1..=3).contains(&s.ids.len()), "{s:?}");
            count_sizes[s.ids.len()] += 1;
            assert_eq!(s.ids.len(), s.kwargs.len());
            assert_eq!(s.ids.len(), s.texts.len());
            for (i, a) in s.ids.iter().enumerate() {
                for b in &s.ids[i + 1..] {
                    assert!(!conflicts(a, b), "{a} and {b} together: {s:?}");
                    assert!(compatible_for(prompt, a, b), "{a} and {b} for {prompt:?}");
                }
            }
            for (id, kw) in s.ids.iter().zip(&s.kwargs) {
                Instruction::parse(id, kw).unwrap_or_else(|e| panic!("{id} {kw:?}: {e}"));
            }
            // The kwargs column as the ifeval kind reads it, and the evaluation runs clean.
            let v = super::super::checks::evaluate(&s.ids, &s.kwargs, "An answer.");
            assert!(v.errors.is_empty(), "{:?}", v.errors);
        }
        // Every size is drawn (roughly a third each; constrained_response alone caps a few).
        assert!(count_sizes[1..].iter().all(|&c| c > 600), "{count_sizes:?}");
    }

    #[test]
    fn the_conflict_table_is_the_registrys_made_symmetric() {
        // Spot checks against instructions_registry.py.
        assert!(conflicts(
            "language:response_language",
            "keywords:existence"
        ));
        assert!(conflicts(
            "keywords:existence",
            "language:response_language"
        ));
        assert!(conflicts(
            "length_constraints:number_sentences",
            "length_constraints:number_paragraphs"
        ));
        assert!(!conflicts(
            "detectable_format:json_format",
            "keywords:forbidden_words"
        ));
        assert!(conflicts(
            "detectable_format:json_format",
            "punctuation:no_comma"
        ));
        assert!(!conflicts(
            "combination:two_responses",
            "punctuation:no_comma"
        ));
        assert!(conflicts("combination:two_responses", "startend:quotation"));
        assert!(!conflicts(
            "combination:repeat_prompt",
            "detectable_format:title"
        ));
        assert!(conflicts("startend:quotation", "detectable_format:title"));
        assert!(!conflicts("startend:quotation", "punctuation:no_comma"));
        for t in INSTRUCTION_IDS {
            assert!(conflicts(t, t));
            assert!(conflicts(t, "detectable_format:constrained_response"));
            for u in INSTRUCTION_IDS {
                assert_eq!(conflicts(t, u), conflicts(u, t), "{t} {u}");
            }
        }
        // Every registry key is one of the 25 ids, and so is every name it lists.
        for (k, c) in &REGISTRY_CONFLICTS {
            assert!(INSTRUCTION_IDS.contains(k), "{k}");
            let (Conflicts::Only(set) | Conflicts::AllBut(set)) = c;
            for s in *set {
                assert!(INSTRUCTION_IDS.contains(s), "{s}");
            }
        }
        for (a, b) in EXTRA_CONFLICTS {
            assert!(INSTRUCTION_IDS.contains(&a) && INSTRUCTION_IDS.contains(&b));
        }
    }

    #[test]
    fn the_same_seed_and_id_give_the_same_constraints_and_another_seed_others() {
        let mut differ = 0;
        for (id, prompt) in rows(200) {
            let a = sample(prompt, &id, 1, &INSTRUCTION_IDS, 1, 3);
            let b = sample(prompt, &id, 1, &INSTRUCTION_IDS, 1, 3);
            assert_eq!(a, b);
            assert_eq!(a.ground_truth(), b.ground_truth());
            if sample(prompt, &id, 2, &INSTRUCTION_IDS, 1, 3) != a {
                differ += 1;
            }
        }
        assert!(differ > 150, "{differ} of 200 changed with the seed");
    }

    #[test]
    fn every_type_is_reachable_and_each_alone_renders_its_arguments() {
        let mut seen = HashSet::new();
        for (id, prompt) in rows(2000) {
            for t in sample(prompt, &id, 0, &INSTRUCTION_IDS, 1, 3).ids {
                seen.insert(t);
            }
        }
        assert_eq!(seen.len(), 25, "missing: {:?}", {
            let mut m: Vec<_> = INSTRUCTION_IDS
                .iter()
                .filter(|t| !seen.contains(*t))
                .collect();
            m.sort();
            m
        });
        // Restricted to one type, every row gets it; numbers and words of its arguments are
        // in its text (in both wordings).
        for t in INSTRUCTION_IDS {
            for (id, prompt) in rows(40) {
                let s = sample(prompt, &id, 3, &[t], 1, 1);
                assert_eq!(s.ids, [t]);
                let text = &s.texts[0];
                assert!(!text.starts_with('('), "{t}: {text}");
                for (k, v) in &s.kwargs[0] {
                    match v {
                        Value::Number(n) => assert!(text.contains(&n.to_string()), "{t}: {text}"),
                        Value::String(w) if k == "prompt_to_repeat" => assert_eq!(w, prompt),
                        Value::String(w) if k == "language" => {
                            let name = LANGUAGES.iter().find(|l| l.0 == w).unwrap().1;
                            assert!(text.contains(name), "{t}: {text}");
                        }
                        Value::String(w) => {
                            let w = w.replace("less than", "");
                            assert!(text.contains(w.trim()), "{t} {k}: {text}")
                        }
                        Value::Array(ws) => {
                            for w in ws {
                                assert!(text.contains(w.as_str().unwrap()), "{t}: {text}");
                            }
                        }
                        _ => panic!("{t}: {v}"),
                    }
                }
            }
        }
    }

    #[test]
    fn arguments_that_would_fight_each_other_are_not_drawn() {
        use regex::Regex;
        // No forbidden word hides in a phrase or word the answer is asked to write.
        for w in FORBIDDEN {
            let re = Regex::new(&format!(r"(?i)\b{w}\b")).unwrap();
            for p in END_PHRASES.iter().chain(FIRST_WORDS).chain(KEYWORDS) {
                assert!(!re.is_match(p), "{w} in {p}");
            }
        }
        // A prompt with a comma never gets repeat_prompt beside no_comma; the other one can.
        let pair = ["combination:repeat_prompt", "punctuation:no_comma"];
        let (mut with_comma, mut without) = (0, 0);
        for i in 0..300 {
            let id = format!("{i}");
            with_comma += sample("Hello, world and more", &id, 0, &pair, 1, 2)
                .ids
                .len();
            without += sample("Hello world and more", &id, 0, &pair, 1, 2)
                .ids
                .len();
        }
        assert!(with_comma < 400 && without > 400, "{with_comma} {without}");
        // Sections in an all-capitals answer are marked SECTION; keywords of one row differ.
        for (id, prompt) in rows(300) {
            let s = sample(
                prompt,
                &id,
                0,
                &[
                    "change_case:english_capital",
                    "detectable_format:multiple_sections",
                    "keywords:existence",
                    "keywords:frequency",
                ],
                4,
                4,
            );
            assert_eq!(s.ids.len(), 4);
            let kw = |t: &str| &s.kwargs[s.ids.iter().position(|x| *x == t).unwrap()];
            assert_eq!(
                kw("detectable_format:multiple_sections")["section_spliter"],
                "SECTION"
            );
            let ks = kw("keywords:existence")["keywords"].as_array().unwrap();
            let f = &kw("keywords:frequency")["keyword"];
            assert_ne!(ks[0], ks[1]);
            assert!(!ks.contains(f), "{s:?}");
        }
    }

    #[test]
    fn the_ground_truth_is_the_python_literal_open_instruct_reads() {
        let s = Sampled {
            ids: vec![
                "keywords:existence",
                "punctuation:no_comma",
                "combination:repeat_prompt",
            ],
            kwargs: vec![
                json!({"keywords": ["lighthouse", "season"]})
                    .as_object()
                    .unwrap()
                    .clone(),
                Map::new(),
                json!({"prompt_to_repeat": "Say \"hi\"\nit's me"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ],
            texts: vec![],
        };
        assert_eq!(
            s.ground_truth(),
            r#"[{'instruction_id': ['keywords:existence', 'punctuation:no_comma', 'combination:repeat_prompt'], 'kwargs': [{'keywords': ['lighthouse', 'season']}, {}, {'prompt_to_repeat': 'Say "hi"\nit\'s me'}]}]"#
        );
        let n = Sampled {
            ids: vec!["length_constraints:number_words"],
            kwargs: vec![
                json!({"num_words": 120, "relation": "less than"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ],
            texts: vec!["Answer with less than 120 words.".into()],
        };
        assert_eq!(
            n.ground_truth(),
            "[{'instruction_id': ['length_constraints:number_words'], 'kwargs': [{'num_words': 120, 'relation': 'less than'}]}]"
        );
        assert_eq!(
            n.constrained_prompt("Hi there.  "),
            "Hi there.\n\nAnswer with less than 120 words."
        );
    }

    #[test]
    fn plan_time_checks_refuse_types_that_cannot_reach_the_minimum() {
        assert_eq!(
            largest_compatible(
                &["detectable_format:json_format", "detectable_format:title"],
                2
            ),
            1
        );
        assert_eq!(largest_compatible(&INSTRUCTION_IDS, 5), 5);
    }
}
