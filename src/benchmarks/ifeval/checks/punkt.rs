//! Sentence counting as IFEval's `length_constraints:number_sentences` does it: NLTK's Punkt
//! sentence tokenizer with its pretrained English parameters (`count_sentences` in the
//! reference's `instructions_util.py` loads `tokenizers/punkt/english.pickle`).
//!
//! There is no Punkt crate that builds on stable Rust (`punkt` 1.0.5 needs nightly), so this
//! is the tokenizing half of NLTK 3.9's `PunktSentenceTokenizer` (no training): candidate
//! ends found as `_match_potential_end_contexts` finds them, each decided by tokenizing its
//! context and running the first and second annotation passes (abbreviations, ellipses,
//! collocations, the orthographic heuristic, frequent sentence starters, initials and
//! numbers), then `_realign_boundaries`. The parameters are NLTK's (`punkt_tab/english`, the
//! same values as the pickle), in `punkt_english/`.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use regex::Regex;

use super::words::is_decimal;
use crate::python::pytext::{is_space, is_upper};

struct Params {
    abbrev_types: HashSet<&'static str>,
    collocations: HashSet<(&'static str, &'static str)>,
    sent_starters: HashSet<&'static str>,
    ortho_context: HashMap<&'static str, u32>,
}

static PARAMS: LazyLock<Params> = LazyLock::new(|| {
    let lines = |s: &'static str| s.lines().map(str::trim_end).filter(|l| !l.is_empty());
    Params {
        abbrev_types: lines(include_str!("punkt_english/abbrev_types.txt")).collect(),
        collocations: lines(include_str!("punkt_english/collocations.tab"))
            .filter_map(|l| l.split_once('\t'))
            .collect(),
        sent_starters: lines(include_str!("punkt_english/sent_starters.txt")).collect(),
        ortho_context: lines(include_str!("punkt_english/ortho_context.tab"))
            .filter_map(|l| {
                let (w, n) = l.split_once('\t')?;
                Some((w, n.parse().ok()?))
            })
            .collect(),
    }
});

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

/// `len(tokenizer.tokenize(text))`.
pub fn count_sentences(text: &str) -> usize {
    let chars: Vec<char> = text.chars().collect();
    let slices = slices_from_text(&chars);
    realigned_count(&chars, &slices)
}

/// `PunktLanguageVars._re_non_word_chars`: characters that cannot appear within words.
fn is_non_word(c: char) -> bool {
    matches!(
        c,
        ')' | '"' | ';' | '}' | ']' | '*' | ':' | '@' | '\'' | '(' | '{' | '[' | '!' | '?'
    )
}

/// `_re_word_start`: a word may start with anything else.
fn is_word_start(c: char) -> bool {
    !matches!(
        c,
        '(' | '"'
            | '`'
            | '{'
            | '['
            | ':'
            | ';'
            | '&'
            | '#'
            | '*'
            | '@'
            | ')'
            | '}'
            | ']'
            | '-'
            | ','
    )
}

/// Length of `_re_multi_char_punct` (`-{2,}|\.{2,}|(?:\.\s){2,}\.`) matched at `i`, or 0.
fn multi_char_at(s: &[char], i: usize) -> usize {
    let run = |c: char| s[i..].iter().take_while(|&&x| x == c).count();
    match s.get(i) {
        Some('-') if run('-') >= 2 => run('-'),
        Some('.') if run('.') >= 2 => run('.'),
        Some('.') => {
            // (\.\s){2,}\.  (greedy)
            let mut j = i;
            let mut pairs = 0;
            while s.get(j) == Some(&'.') && s.get(j + 1).is_some_and(|&c| is_space(c)) {
                pairs += 1;
                j += 2;
            }
            // Back off until a period follows the pairs.
            while pairs >= 2 {
                if s.get(i + 2 * pairs) == Some(&'.') {
                    return 2 * pairs + 1;
                }
                pairs -= 1;
            }
            0
        }
        _ => 0,
    }
}

/// `PunktLanguageVars.word_tokenize` on one line.
fn word_tokenize(s: &[char]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if is_space(c) {
            i += 1;
            continue;
        }
        let m = multi_char_at(s, i);
        if m > 0 {
            out.push(s[i..i + m].iter().collect());
            i += m;
            continue;
        }
        if is_word_start(c) {
            // \S+? up to the first position where a word-end sequence begins.
            let ends_at = |j: usize| -> bool {
                match s.get(j) {
                    None => true,
                    Some(&c) if is_space(c) || is_non_word(c) => true,
                    Some(_) if multi_char_at(s, j) > 0 => true,
                    Some(',') => match s.get(j + 1) {
                        None => true,
                        Some(&n) => is_space(n) || is_non_word(n) || multi_char_at(s, j + 1) > 0,
                    },
                    Some(_) => false,
                }
            };
            let mut j = i + 1;
            while !ends_at(j) {
                j += 1;
            }
            out.push(s[i..j].iter().collect());
            i = j;
            continue;
        }
        out.push(c.to_string());
        i += 1;
    }
    out
}

static RE_NUMERIC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?[\.,]?\d[\d,\.-]*\.?$").expect("static regex"));

struct Token {
    tok: String,
    /// `tok.lower()`, numbers as `##number##`.
    typ: String,
    period_final: bool,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

impl Token {
    fn new(tok: String) -> Token {
        let lower = tok.to_lowercase();
        let typ = if RE_NUMERIC.is_match(&lower) {
            "##number##".to_string()
        } else {
            lower
        };
        Token {
            period_final: tok.ends_with('.'),
            tok,
            typ,
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    fn type_no_period(&self) -> &str {
        if self.typ.chars().count() > 1 && self.typ.ends_with('.') {
            &self.typ[..self.typ.len() - 1]
        } else {
            &self.typ
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.typ
        }
    }

    fn first_upper(&self) -> bool {
        self.tok
            .chars()
            .next()
            .is_some_and(|c| is_upper(c.encode_utf8(&mut [0; 4])))
    }

    fn first_lower(&self) -> bool {
        self.tok
            .chars()
            .next()
            .is_some_and(|c| crate::python::pytext::is_lower(c.encode_utf8(&mut [0; 4])))
    }

    fn is_ellipsis(&self) -> bool {
        self.tok.len() >= 2 && self.tok.bytes().all(|b| b == b'.')
    }

    /// `[^\W\d]\.$`: one letter (or `_`, or a non-decimal number) and a period.
    fn is_initial(&self) -> bool {
        let mut cs = self.tok.chars();
        match (cs.next(), cs.next(), cs.next()) {
            (Some(c), Some('.'), None) => {
                (c.is_alphanumeric() || c == '_') && !is_decimal(c) && !c.is_ascii_digit()
            }
            _ => false,
        }
    }
}

/// `_tokenize_words` + `_annotate_tokens` on a candidate's context, then
/// `text_contains_sentbreak`: a break followed by at least one more token.
fn text_contains_sentbreak(context: &[char]) -> bool {
    let p = &*PARAMS;
    let mut toks: Vec<Token> = Vec::new();
    for line in context.split(|&c| c == '\n') {
        if line.iter().all(|&c| is_space(c)) {
            continue;
        }
        toks.extend(word_tokenize(line).into_iter().map(Token::new));
    }
    for t in &mut toks {
        first_pass(t, p);
    }
    for i in 0..toks.len() {
        if i + 1 < toks.len() {
            let (a, b) = toks.split_at_mut(i + 1);
            second_pass(&mut a[i], &b[0], p);
        }
        if toks[i].sentbreak && i + 1 < toks.len() {
            return true;
        }
    }
    false
}

fn first_pass(t: &mut Token, p: &Params) {
    let tok = t.tok.as_str();
    if tok == "." || tok == "?" || tok == "!" {
        t.sentbreak = true;
    } else if t.is_ellipsis() {
        t.ellipsis = true;
    } else if t.period_final && !tok.ends_with("..") {
        let stem = tok[..tok.len() - 1].to_lowercase();
        let last = stem.rsplit('-').next().unwrap_or("");
        if p.abbrev_types.contains(stem.as_str()) || p.abbrev_types.contains(last) {
            t.abbr = true;
        } else {
            t.sentbreak = true;
        }
    }
}

#[derive(PartialEq)]
enum Starter {
    Yes,
    No,
    Unknown,
}

fn ortho_heuristic(t: &Token, p: &Params) -> Starter {
    // `aug_tok.tok in ";:,.!?"` is a substring test in Python.
    if ";:,.!?".contains(t.tok.as_str()) {
        return Starter::No;
    }
    let ortho = p
        .ortho_context
        .get(t.type_no_sentperiod())
        .copied()
        .unwrap_or(0);
    if t.first_upper() && ortho & ORTHO_LC != 0 && ortho & ORTHO_MID_UC == 0 {
        return Starter::Yes;
    }
    if t.first_lower() && (ortho & ORTHO_UC != 0 || ortho & ORTHO_BEG_LC == 0) {
        return Starter::No;
    }
    Starter::Unknown
}

fn second_pass(t1: &mut Token, t2: &Token, p: &Params) {
    if !t1.period_final {
        return;
    }
    let typ = t1.type_no_period().to_string();
    let next_typ = t2.type_no_sentperiod();
    let initial = t1.is_initial();
    if p.collocations.contains(&(typ.as_str(), next_typ)) {
        t1.sentbreak = false;
        t1.abbr = true;
        return;
    }
    if (t1.abbr || t1.ellipsis) && !initial {
        if ortho_heuristic(t2, p) == Starter::Yes {
            t1.sentbreak = true;
            return;
        }
        if t2.first_upper() && p.sent_starters.contains(next_typ) {
            t1.sentbreak = true;
            return;
        }
    }
    if initial || typ == "##number##" {
        let starter = ortho_heuristic(t2, p);
        if starter == Starter::No {
            t1.sentbreak = false;
            t1.abbr = true;
            return;
        }
        let next_ortho = p.ortho_context.get(next_typ).copied().unwrap_or(0);
        if starter == Starter::Unknown && initial && t2.first_upper() && next_ortho & ORTHO_LC == 0
        {
            t1.sentbreak = false;
            t1.abbr = true;
        }
    }
}

/// A candidate sentence end: the `[.?!]` at `at`, and where the next token starts if
/// whitespace and a token follow it.
struct Candidate {
    at: usize,
    next_tok: Option<usize>,
    /// End of `after_tok` (the punctuation or the whitespace and next token).
    after_end: usize,
}

/// `period_context_re().finditer(text)`: `[.?!](?=(?P<after_tok>NonWord|\s+(?P<next_tok>\S+)))`.
fn candidates(s: &[char]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (i, &c) in s.iter().enumerate() {
        if !matches!(c, '.' | '?' | '!') {
            continue;
        }
        match s.get(i + 1) {
            Some(&n) if is_non_word(n) => out.push(Candidate {
                at: i,
                next_tok: None,
                after_end: i + 2,
            }),
            Some(&n) if is_space(n) => {
                let mut j = i + 1;
                while j < s.len() && is_space(s[j]) {
                    j += 1;
                }
                if j < s.len() {
                    let start = j;
                    while j < s.len() && !is_space(s[j]) {
                        j += 1;
                    }
                    out.push(Candidate {
                        at: i,
                        next_tok: Some(start),
                        after_end: j,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// `string.whitespace`, which `_get_last_whitespace_index` uses: ASCII only.
fn is_ascii_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// `_slices_from_text` over `_match_potential_end_contexts`: (start, end) of each sentence.
fn slices_from_text(s: &[char]) -> Vec<(usize, usize)> {
    // Pair each candidate with the slice of the word before it, as NLTK does, and drop a
    // candidate whose word overlaps the next candidate's ("U.S." yields only its last period).
    let mut contexts: Vec<(Candidate, (usize, usize))> = Vec::new();
    let mut prev_slice = (0usize, 0usize);
    let mut prev: Option<Candidate> = None;
    for m in candidates(s) {
        let before = &s[prev_slice.1..m.at];
        let last_ws = (0..before.len())
            .rev()
            .find(|&i| is_ascii_ws(before[i]))
            .unwrap_or(0);
        let start = if last_ws != 0 {
            last_ws + prev_slice.1 + 1
        } else {
            prev_slice.0
        };
        let word = (start, m.at);
        if let Some(p) = prev.take()
            && prev_slice.1 <= word.0
        {
            contexts.push((p, prev_slice));
        }
        prev = Some(m);
        prev_slice = word;
    }
    if let Some(p) = prev {
        contexts.push((p, prev_slice));
    }

    let mut slices = Vec::new();
    let mut last_break = 0;
    for (m, word) in contexts {
        let mut context: Vec<char> = s[word.0..word.1].to_vec();
        context.extend_from_slice(&s[m.at..m.after_end]);
        if text_contains_sentbreak(&context) {
            slices.push((last_break, m.at + 1));
            last_break = m.next_tok.unwrap_or(m.at + 1);
        }
    }
    let mut end = s.len();
    while end > 0 && is_space(s[end - 1]) {
        end -= 1;
    }
    slices.push((last_break, end));
    slices
}

/// `_realign_boundaries`, counting the non-empty sentences it yields.
fn realigned_count(s: &[char], slices: &[(usize, usize)]) -> usize {
    let nonempty = |(a, b): (usize, usize)| b > a;
    let mut n = 0;
    let mut realign = 0;
    for (k, &(start, stop)) in slices.iter().enumerate() {
        let s1 = (start + realign, stop);
        let Some(&(s2_start, s2_stop)) = slices.get(k + 1) else {
            n += usize::from(nonempty(s1));
            continue;
        };
        match boundary_realignment(&s[s2_start..s2_stop.max(s2_start)]) {
            Some(end) => {
                // The closing punctuation joins sentence 1 (always non-empty then).
                n += 1;
                realign = end;
            }
            None => {
                realign = 0;
                n += usize::from(nonempty(s1));
            }
        }
    }
    n
}

/// `re_boundary_realignment.match`: `["\')\]}]+?(?:\s+|(?=--)|$)` (MULTILINE); the end of
/// the match.
fn boundary_realignment(s: &[char]) -> Option<usize> {
    let run = s
        .iter()
        .take_while(|&&c| matches!(c, '"' | '\'' | ')' | ']' | '}'))
        .count();
    for k in 1..=run {
        match s.get(k) {
            Some(&c) if is_space(c) => {
                let ws = s[k..].iter().take_while(|&&c| is_space(c)).count();
                return Some(k + ws);
            }
            Some('-') if s.get(k + 1) == Some(&'-') => return Some(k),
            None | Some('\n') => return Some(k),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::count_sentences as n;

    #[test]
    fn sentences_as_nltk_punkt_english_counts_them() {
        // Each worked out from NLTK 3.9's sent_tokenize (punkt English) rules:
        assert_eq!(n("Hello there. How are you? I am fine!"), 3);
        // known abbreviation (dr) followed by a name: no break
        assert_eq!(n("I met Dr. Smith today. He was kind."), 2);
        // a period inside a word is no candidate; "U.S." followed by lowercase: no break
        assert_eq!(n("The U.S. economy grew. Good."), 2);
        // no closing punctuation: one sentence
        assert_eq!(n("just some words without an end"), 1);
        // empty and whitespace-only: none
        assert_eq!(n(""), 0);
        assert_eq!(n("   \n "), 0);
        // a closing quote after the period stays with its sentence
        assert_eq!(n("He said \"stop.\" Then he left."), 2);
        // newlines alone do not end sentences
        assert_eq!(n("Line one\nLine two\nLine three."), 1);
        // ellipsis followed by a lowercase word: no break
        assert_eq!(n("Well... maybe not. Sure."), 2);
    }
}
