//! IFEval's verifiable instructions, checked in Rust: the 25 instruction types of Google's
//! reference (`instruction_following_eval/instructions.py` in google-research), with the same
//! argument semantics and its strict and loose modes (`evaluation_lib.py`).
//!
//! [`Instruction::parse`] turns an id and its kwargs into a check (or a clear error where
//! the reference would draw a random argument, raise, or not know the id);
//! [`Instruction::follows`] is the reference's `check_following`; [`evaluate`] runs a row's
//! instructions in both modes.
//!
//! Where the reference leans on Python libraries: sentences are counted by NLTK's Punkt
//! tokenizer with its English parameters ([`punkt`]), words by case as `nltk.word_tokenize`
//! cuts them ([`words`]), languages by a bit-exact port of `langdetect` (the `langdetect`
//! crate, seeded 0), JSON by Python's `json.loads` grammar ([`crate::python::pyjson`]), case and whitespace
//! by Python's `str` rules ([`crate::python::pytext`]).

pub mod punkt;
pub mod words;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use crate::python::{pyjson, pytext};
use pytext::{is_lower, is_upper, split_whitespace, strip};

/// The 25 instruction ids, in the reference registry's order.
pub const INSTRUCTION_IDS: [&str; 25] = [
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "language:response_language",
    "length_constraints:number_sentences",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
    "startend:quotation",
];

/// `less than` / `at least`, the reference's two comparison relations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Relation {
    LessThan,
    AtLeast,
}

impl Relation {
    fn holds(self, count: usize, threshold: f64) -> bool {
        match self {
            Relation::LessThan => (count as f64) < threshold,
            Relation::AtLeast => (count as f64) >= threshold,
        }
    }
}

/// One instruction with its arguments, ready to check responses.
#[derive(Debug, Clone)]
pub enum Instruction {
    KeywordsExistence(Vec<Regex>),
    KeywordsFrequency(Regex, f64, Relation),
    ForbiddenWords(Vec<Regex>),
    LetterFrequency(char, f64, Relation),
    ResponseLanguage(String),
    NumberSentences(f64, Relation),
    NumberParagraphs(f64),
    NumberWords(f64, Relation),
    NthParagraphFirstWord {
        num_paragraphs: f64,
        nth: usize,
        first_word: String,
    },
    NumberPlaceholders(f64),
    Postscript(Regex),
    NumberBulletLists(f64),
    ConstrainedResponse,
    NumberHighlightedSections(f64),
    MultipleSections(Regex, f64),
    JsonFormat,
    Title,
    TwoResponses,
    RepeatPrompt(String),
    EndChecker(String),
    CapitalWordFrequency(f64, Relation),
    EnglishCapital,
    EnglishLowercase,
    NoComma,
    Quotation,
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("static regex")
}

static PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| re(r"\[.*?\]"));
static BULLET_STAR: LazyLock<Regex> = LazyLock::new(|| re(r"(?m)^\s*\*[^\*].*$"));
static BULLET_DASH: LazyLock<Regex> = LazyLock::new(|| re(r"(?m)^\s*-.*$"));
static HIGHLIGHT: LazyLock<Regex> = LazyLock::new(|| re(r"\*[^\n\*]*\*"));
static DOUBLE_HIGHLIGHT: LazyLock<Regex> = LazyLock::new(|| re(r"\*\*[^\n\*]*\*\*"));
static PARAGRAPH_SPLIT: LazyLock<Regex> = LazyLock::new(|| re(r"\s?\*\*\*\s?"));
static TITLE: LazyLock<Regex> = LazyLock::new(|| re(r"<<[^\n]+>>"));
static WORD: LazyLock<Regex> = LazyLock::new(|| re(&format!("{}+", pytext::PY_WORD_CLASS)));
static PS: LazyLock<Regex> = LazyLock::new(|| re(r"(?m)\s*p\.\s?s\..*$"));
static PPS: LazyLock<Regex> = LazyLock::new(|| re(r"(?m)\s*p\.\s?p\.\s?s.*$"));

const CONSTRAINED_RESPONSES: [&str; 3] = [
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
];

thread_local! {
    /// Patterns built from kwargs (keywords, markers, splitters) recur across rows: IFEval's
    /// 541 prompts are checked again for every model and every sample.
    static PATTERNS: RefCell<HashMap<String, Regex>> = RefCell::new(HashMap::new());
}

/// A pattern from the user's kwargs, as the reference hands it to Python's `re`.
fn user_regex(pattern: &str, what: &str) -> Result<Regex, String> {
    PATTERNS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(r) = cache.get(pattern) {
            return Ok(r.clone());
        }
        let r = Regex::new(pattern).map_err(|e| {
            format!(
                "{what} is used as a regular expression by the reference, and this one does not compile: {}",
                e.to_string().lines().last().unwrap_or_default()
            )
        })?;
        if cache.len() > 50_000 {
            cache.clear();
        }
        cache.insert(pattern.to_string(), r.clone());
        Ok(r)
    })
}

/// The kwargs of one instruction: a JSON object (null members count as absent, as in the
/// HuggingFace copy of IFEval where every row carries every key).
struct Kwargs<'a> {
    id: &'a str,
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Kwargs<'a> {
    fn get(&mut self, key: &'static str) -> Result<&'a Value, String> {
        self.used.push(key);
        match self.map.get(key) {
            Some(Value::Null) | None => Err(format!(
                "{}: kwarg `{key}` is missing (the reference would draw a random one)",
                self.id
            )),
            Some(v) => Ok(v),
        }
    }

    fn string(&mut self, key: &'static str) -> Result<&'a str, String> {
        let id = self.id;
        self.get(key)?
            .as_str()
            .ok_or_else(|| format!("{id}: kwarg `{key}` must be a string"))
    }

    /// A non-negative number (the reference draws a random one for a negative value).
    fn count(&mut self, key: &'static str) -> Result<f64, String> {
        let id = self.id;
        let v = self.get(key)?;
        match v.as_f64() {
            Some(n) if n >= 0.0 && !v.is_boolean() => Ok(n),
            _ => Err(format!(
                "{id}: kwarg `{key}` must be a non-negative number, got {v}"
            )),
        }
    }

    fn relation(&mut self, key: &'static str) -> Result<Relation, String> {
        match self.string(key)? {
            "less than" => Ok(Relation::LessThan),
            "at least" => Ok(Relation::AtLeast),
            other => Err(format!(
                "{}: kwarg `{key}` must be \"less than\" or \"at least\", got {other:?}",
                self.id
            )),
        }
    }

    fn strings(&mut self, key: &'static str) -> Result<Vec<&'a str>, String> {
        let id = self.id;
        let v = self.get(key)?;
        let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
            format!("{id}: kwarg `{key}` must be a non-empty list of strings, got {v}")
        })?;
        list.iter()
            .map(|w| {
                w.as_str()
                    .ok_or_else(|| format!("{id}: kwarg `{key}` must hold strings, got {w}"))
            })
            .collect()
    }

    /// The reference passes kwargs as Python keyword arguments: one it does not take is a
    /// TypeError there, an error here.
    fn no_others(&self) -> Result<(), String> {
        for (k, v) in self.map {
            if !v.is_null() && !self.used.contains(&k.as_str()) {
                return Err(format!(
                    "{}: unexpected kwarg `{k}`{}",
                    self.id,
                    if self.used.is_empty() {
                        " (this instruction takes none)".to_string()
                    } else {
                        format!(" (it takes {})", self.used.join(", "))
                    }
                ));
            }
        }
        Ok(())
    }
}

impl Instruction {
    /// The instruction `id` with its `kwargs`, as `build_description(**kwargs)` would set it
    /// up; an error where the reference would draw a random argument or raise.
    pub fn parse(id: &str, kwargs: &Map<String, Value>) -> Result<Instruction, String> {
        use Instruction as I;
        let mut k = Kwargs {
            id,
            map: kwargs,
            used: Vec::new(),
        };
        let ins = match id {
            "keywords:existence" => {
                let mut words = k.strings("keywords")?;
                words.sort_unstable();
                I::KeywordsExistence(
                    words
                        .iter()
                        .map(|w| user_regex(&format!("(?i){w}"), "a keyword"))
                        .collect::<Result<_, _>>()?,
                )
            }
            "keywords:frequency" => {
                let word = strip(k.string("keyword")?);
                if word.is_empty() {
                    return Err(format!("{id}: kwarg `keyword` is empty"));
                }
                I::KeywordsFrequency(
                    user_regex(&format!("(?i){word}"), "the keyword")?,
                    k.count("frequency")?,
                    k.relation("relation")?,
                )
            }
            "keywords:forbidden_words" => {
                let mut words = k.strings("forbidden_words")?;
                words.sort_unstable();
                words.dedup();
                I::ForbiddenWords(
                    words
                        .iter()
                        .map(|w| user_regex(&format!(r"(?i)\b{w}\b"), "a forbidden word"))
                        .collect::<Result<_, _>>()?,
                )
            }
            "keywords:letter_frequency" => {
                let letter = k.string("letter")?;
                // The reference swaps a "letter" that is not one ASCII letter for a random
                // one; IFEval itself asks for '#' (key 1122) and '!' (key 1129). Counting the
                // character asked for is deterministic and is what the prompt means.
                let mut cs = letter.chars();
                let c = match (cs.next(), cs.next()) {
                    (Some(c), None) if !pytext::is_space(c) => {
                        let mut lower = c.to_lowercase();
                        match (lower.next(), lower.next()) {
                            (Some(l), None) => l,
                            _ => c,
                        }
                    }
                    _ => {
                        return Err(format!(
                            "{id}: kwarg `letter` must be one character, got {letter:?}"
                        ));
                    }
                };
                I::LetterFrequency(c, k.count("let_frequency")?, k.relation("let_relation")?)
            }
            "language:response_language" => {
                let lang = k.string("language")?;
                if !LANGUAGE_CODES.contains(&lang) {
                    return Err(format!(
                        "{id}: kwarg `language` {lang:?} is not a langdetect code (e.g. {})",
                        LANGUAGE_CODES[..8].join(", ")
                    ));
                }
                I::ResponseLanguage(lang.to_string())
            }
            "length_constraints:number_sentences" => {
                I::NumberSentences(k.count("num_sentences")?, k.relation("relation")?)
            }
            "length_constraints:number_paragraphs" => {
                I::NumberParagraphs(k.count("num_paragraphs")?)
            }
            "length_constraints:number_words" => {
                I::NumberWords(k.count("num_words")?, k.relation("relation")?)
            }
            "length_constraints:nth_paragraph_first_word" => {
                let num_paragraphs = k.count("num_paragraphs")?;
                let nth = k.count("nth_paragraph")?;
                if nth < 1.0 || nth > num_paragraphs || nth.fract() != 0.0 {
                    return Err(format!(
                        "{id}: kwarg `nth_paragraph` must be a whole number from 1 to num_paragraphs ({num_paragraphs}), got {nth}"
                    ));
                }
                I::NthParagraphFirstWord {
                    num_paragraphs,
                    nth: nth as usize,
                    first_word: k.string("first_word")?.to_lowercase(),
                }
            }
            "detectable_content:number_placeholders" => {
                I::NumberPlaceholders(k.count("num_placeholders")?)
            }
            "detectable_content:postscript" => {
                let marker = strip(k.string("postscript_marker")?);
                I::Postscript(match marker {
                    "P.P.S" => PPS.clone(),
                    "P.S." => PS.clone(),
                    m => user_regex(
                        &format!(r"(?m)\s*{}.*$", m.to_lowercase()),
                        "the postscript marker",
                    )?,
                })
            }
            "detectable_format:number_bullet_lists" => {
                I::NumberBulletLists(k.count("num_bullets")?)
            }
            "detectable_format:constrained_response" => I::ConstrainedResponse,
            "detectable_format:number_highlighted_sections" => {
                I::NumberHighlightedSections(k.count("num_highlights")?)
            }
            "detectable_format:multiple_sections" => {
                let splitter = strip(k.string("section_spliter")?);
                I::MultipleSections(
                    user_regex(&format!(r"\s?{splitter}\s?\d+\s?"), "the section splitter")?,
                    k.count("num_sections")?,
                )
            }
            "detectable_format:json_format" => I::JsonFormat,
            "detectable_format:title" => I::Title,
            "combination:two_responses" => I::TwoResponses,
            "combination:repeat_prompt" => {
                let p = k.string("prompt_to_repeat")?;
                if p.is_empty() {
                    return Err(format!("{id}: kwarg `prompt_to_repeat` is empty"));
                }
                I::RepeatPrompt(strip(p).to_lowercase())
            }
            "startend:end_checker" => I::EndChecker(strip(k.string("end_phrase")?).to_lowercase()),
            "change_case:capital_word_frequency" => I::CapitalWordFrequency(
                k.count("capital_frequency")?,
                k.relation("capital_relation")?,
            ),
            "change_case:english_capital" => I::EnglishCapital,
            "change_case:english_lowercase" => I::EnglishLowercase,
            "punctuation:no_comma" => I::NoComma,
            "startend:quotation" => I::Quotation,
            _ => {
                let hint = crate::error::did_you_mean(id, INSTRUCTION_IDS.iter().copied())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown instruction id {id:?}{hint}; IFEval has 25, e.g. {}",
                    INSTRUCTION_IDS[..3].join(", ")
                ));
            }
        };
        k.no_others()?;
        Ok(ins)
    }

    /// The reference's `check_following(value)`.
    pub fn follows(&self, value: &str) -> bool {
        use Instruction as I;
        match self {
            I::KeywordsExistence(words) => words.iter().all(|w| w.is_match(value)),
            I::KeywordsFrequency(word, n, rel) => rel.holds(word.find_iter(value).count(), *n),
            I::ForbiddenWords(words) => !words.iter().any(|w| w.is_match(value)),
            I::LetterFrequency(letter, n, rel) => {
                let count = value
                    .chars()
                    .flat_map(char::to_lowercase)
                    .filter(|c| c == letter)
                    .count();
                rel.holds(count, *n)
            }
            I::ResponseLanguage(lang) => detect_language(value).is_none_or(|l| &l == lang),
            I::NumberSentences(n, rel) => rel.holds(punkt::count_sentences(value), *n),
            I::NumberParagraphs(n) => {
                let parts: Vec<&str> = PARAGRAPH_SPLIT.split(value).collect();
                let mut count = parts.len();
                for (i, p) in parts.iter().enumerate() {
                    if strip(p).is_empty() {
                        if i == 0 || i == parts.len() - 1 {
                            count -= 1;
                        } else {
                            return false;
                        }
                    }
                }
                count as f64 == *n
            }
            I::NumberWords(n, rel) => rel.holds(WORD.find_iter(value).count(), *n),
            I::NthParagraphFirstWord {
                num_paragraphs,
                nth,
                first_word,
            } => {
                let parts: Vec<&str> = value.split("\n\n").collect();
                let count = parts.iter().filter(|p| !strip(p).is_empty()).count();
                if *nth > count {
                    return false;
                }
                let paragraph = strip(parts[nth - 1]);
                let Some(word) = split_whitespace(paragraph).next() else {
                    return false;
                };
                let word = strip(word).trim_start_matches('\'').trim_start_matches('"');
                let mut first = String::new();
                for c in word.chars() {
                    if matches!(c, '.' | ',' | '?' | '!' | '\'' | '"') {
                        break;
                    }
                    first.extend(c.to_lowercase());
                }
                count as f64 == *num_paragraphs && &first == first_word
            }
            I::NumberPlaceholders(n) => PLACEHOLDER.find_iter(value).count() as f64 >= *n,
            I::Postscript(pattern) => pattern.is_match(&value.to_lowercase()),
            I::NumberBulletLists(n) => {
                (BULLET_STAR.find_iter(value).count() + BULLET_DASH.find_iter(value).count()) as f64
                    == *n
            }
            I::ConstrainedResponse => {
                let v = strip(value);
                CONSTRAINED_RESPONSES.iter().any(|r| v.contains(r))
            }
            I::NumberHighlightedSections(n) => {
                let single = HIGHLIGHT
                    .find_iter(value)
                    .filter(|m| !strip(m.as_str().trim_matches('*')).is_empty())
                    .count();
                let double = DOUBLE_HIGHLIGHT
                    .find_iter(value)
                    .filter(|m| {
                        let s = m.as_str();
                        !strip(&s[2..s.len() - 2]).is_empty()
                    })
                    .count();
                (single + double) as f64 >= *n
            }
            I::MultipleSections(splitter, n) => splitter.find_iter(value).count() as f64 >= *n,
            I::JsonFormat => {
                let v = strip(value);
                let v = ["```json", "```Json", "```JSON", "```"]
                    .iter()
                    .fold(v, |v, p| v.strip_prefix(p).unwrap_or(v));
                let v = v.strip_suffix("```").unwrap_or(v);
                pyjson::python_json_loads_accepts(strip(v))
            }
            I::Title => TITLE.find_iter(value).any(|m| {
                let t = m.as_str().trim_start_matches('<').trim_end_matches('>');
                !strip(t).is_empty()
            }),
            I::TwoResponses => {
                let parts: Vec<&str> = value.split("******").collect();
                let mut valid = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    if strip(p).is_empty() {
                        if i != 0 && i != parts.len() - 1 {
                            return false;
                        }
                    } else {
                        valid.push(*p);
                    }
                }
                valid.len() == 2 && strip(valid[0]) != strip(valid[1])
            }
            I::RepeatPrompt(prompt) => strip(value).to_lowercase().starts_with(prompt.as_str()),
            I::EndChecker(phrase) => strip(value)
                .trim_matches('"')
                .to_lowercase()
                .ends_with(phrase.as_str()),
            I::CapitalWordFrequency(n, rel) => rel.holds(words::count_upper_words(value), *n),
            I::EnglishCapital => {
                is_upper(value) && detect_language(value).is_none_or(|l| l == "en")
            }
            I::EnglishLowercase => {
                is_lower(value) && detect_language(value).is_none_or(|l| l == "en")
            }
            I::NoComma => !value.contains(','),
            I::Quotation => {
                let v = strip(value);
                v.chars().count() > 1 && v.starts_with('"') && v.ends_with('"')
            }
        }
    }
}

/// langdetect's 55 language codes (the `language` kwarg must be one to ever match).
const LANGUAGE_CODES: [&str; 55] = [
    "af", "ar", "bg", "bn", "ca", "cs", "cy", "da", "de", "el", "en", "es", "et", "fa", "fi", "fr",
    "gu", "he", "hi", "hr", "hu", "id", "it", "ja", "kn", "ko", "lt", "lv", "mk", "ml", "mr", "ne",
    "nl", "no", "pa", "pl", "pt", "ro", "ru", "sk", "sl", "so", "sq", "sv", "sw", "ta", "te", "th",
    "tl", "tr", "uk", "ur", "vi", "zh-cn", "zh-tw",
];

static DETECTOR: LazyLock<langdetect::DetectorFactory> = LazyLock::new(|| {
    // The reference calls langdetect unseeded, so its answer on a borderline text varies from
    // run to run; seed 0 makes ours repeatable (and equal to langdetect with
    // `DetectorFactory.seed = 0`). Python 3.11's arithmetic and Unicode tables, this
    // machine's python3.
    let mut f = langdetect::DetectorFactory::new(langdetect::Compat::python(11));
    f.load_builtin(&langdetect::DetectorFactory::builtin_files())
        .expect("langdetect's built-in profiles load");
    f.seed = langdetect::Seed::Int(0);
    f
});

/// `langdetect.detect(value)`; `None` where it raises (no letters to go on), which the
/// reference counts as the instruction followed.
fn detect_language(value: &str) -> Option<String> {
    DETECTOR.detect(value).ok()
}

/// One row's result: per instruction, strict and loose (`None` where the instruction could
/// not be set up), and the problems found.
#[derive(Debug, Clone, PartialEq)]
pub struct RowVerdict {
    pub strict: Vec<Option<bool>>,
    pub loose: Vec<Option<bool>>,
    pub errors: Vec<String>,
}

impl RowVerdict {
    /// All instructions followed (`None` when one could not be checked).
    pub fn prompt_level(list: &[Option<bool>]) -> Option<bool> {
        list.iter().try_fold(true, |acc, v| v.map(|v| acc && v))
    }
}

/// The eight variants loose mode tries: the response, without its first line, without its
/// last, without both, and each of those with `*` removed (`test_instruction_following_loose`).
pub fn loose_variants(response: &str) -> [String; 8] {
    let lines: Vec<&str> = response.split('\n').collect();
    let join = |ls: &[&str]| strip(&ls.join("\n")).to_string();
    let n = lines.len();
    let remove_first = join(&lines[1.min(n)..]);
    let remove_last = join(&lines[..n.saturating_sub(1)]);
    let remove_both = if n >= 2 {
        join(&lines[1..n - 1])
    } else {
        String::new()
    };
    [
        response.to_string(),
        response.replace('*', ""),
        remove_first.clone(),
        remove_last.clone(),
        remove_both.clone(),
        remove_first.replace('*', ""),
        remove_last.replace('*', ""),
        remove_both.replace('*', ""),
    ]
}

/// The loose variants other than the response itself, without repeats.
fn distinct_variants(response: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(7);
    for v in loose_variants(response).into_iter().skip(1) {
        if v != response && !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// Check one response against its instructions in strict and loose mode. `kwargs` holds one
/// JSON object per instruction (aligned with `ids`).
pub fn evaluate(ids: &[&str], kwargs: &[Map<String, Value>], response: &str) -> RowVerdict {
    let mut v = RowVerdict {
        strict: Vec::with_capacity(ids.len()),
        loose: Vec::with_capacity(ids.len()),
        errors: Vec::new(),
    };
    if kwargs.len() != ids.len() {
        v.errors.push(format!(
            "{} instruction ids but {} kwargs: they must be aligned",
            ids.len(),
            kwargs.len()
        ));
        v.strict = vec![None; ids.len()];
        v.loose = vec![None; ids.len()];
        return v;
    }
    // The loose variants, each distinct text once: without `*` or blank edge lines, several
    // are the same string, and checking a text twice gives the same answer.
    let mut variants: Option<Vec<String>> = None;
    for (id, kw) in ids.iter().zip(kwargs) {
        match Instruction::parse(id, kw) {
            Ok(ins) => {
                // Strict and loose both skip an empty (whitespace-only) candidate.
                let check = |r: &str| !strip(r).is_empty() && ins.follows(r);
                let strict = check(response);
                let loose = strict
                    || variants
                        .get_or_insert_with(|| distinct_variants(response))
                        .iter()
                        .any(|r| check(r));
                v.strict.push(Some(strict));
                v.loose.push(Some(loose));
            }
            Err(e) => {
                v.errors.push(e);
                v.strict.push(None);
                v.loose.push(None);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests;
