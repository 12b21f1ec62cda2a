//! Words as `nltk.word_tokenize` cuts them, for the one check that counts them by case
//! (`change_case:capital_word_frequency`: tokens that are `isupper()`).
//!
//! NLTK's tokenizer (NLTKWordTokenizer, Treebank rules) is a sequence of regex rewrites.
//! Only the cuts that can turn one cased token into two, or join two, change the count, so
//! this reproduces those: whitespace; the characters the rules always set apart
//! (`;@#$%&?!*()[]{}<>`, straight and curly quotes, backticks); `--` and runs of two or more
//! periods; `:` and `,` unless a digit follows; and the contractions split off a word's end
//! (`'s 'm 'd '` in either case, `'ll 're 've n't` in all-lower or all-upper case, and
//! `cannot gimme gonna gotta lemme more'n wanna d'ye 'tis 'twas`). Where a token ends a
//! sentence NLTK also splits its final period; a period is uncased, so the count is the same.

use crate::python::pytext::{is_space, is_upper};

/// How many of `nltk.word_tokenize(text)`'s tokens are `isupper()`.
pub fn count_upper_words(text: &str) -> usize {
    let mut n = 0;
    for piece in pieces(text) {
        for part in split_contractions(piece) {
            n += usize::from(is_upper(part));
        }
    }
    n
}

fn is_separator(c: char) -> bool {
    matches!(
        c,
        ';' | '@'
            | '#'
            | '$'
            | '%'
            | '&'
            | '?'
            | '!'
            | '*'
            | '('
            | ')'
            | '['
            | ']'
            | '{'
            | '}'
            | '<'
            | '>'
            | '"'
            | '`'
            | '«'
            | '»'
            | '“'
            | '”'
            | '‘'
            | '’'
            | '„'
    )
}

/// The text cut at whitespace and at the separators (the separators themselves, uncased,
/// are dropped: they never count).
fn pieces(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i < chars.len() {
        let (pos, c) = chars[i];
        let next = chars.get(i + 1).map(|&(_, c)| c);
        let cut = is_space(c)
            || is_separator(c)
            || ((c == ':' || c == ',') && !next.is_some_and(is_decimal))
            || (c == '-' && next == Some('-'))
            || (c == '.' && next == Some('.'));
        if cut {
            if let Some(s) = start.take() {
                out.push(&text[s..pos]);
            }
            // A run of dashes or periods is one separator.
            if c == '-' || c == '.' {
                while chars.get(i + 1).is_some_and(|&(_, n)| n == c) {
                    i += 1;
                }
            }
        } else if start.is_none() {
            start = Some(pos);
        }
        i += 1;
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

/// Python's `\d` on `str`: decimal digits of any script.
pub(super) fn is_decimal(c: char) -> bool {
    c.is_ascii_digit() || is_nd(c)
}

/// Unicode Nd outside ASCII, by the blocks that have decimal digits (Arabic-Indic, Devanagari,
/// Bengali, ..., fullwidth): each block's digits are ten consecutive code points ending in 9.
fn is_nd(c: char) -> bool {
    const ZEROS: &[u32] = &[
        0x660, 0x6F0, 0x7C0, 0x966, 0x9E6, 0xA66, 0xAE6, 0xB66, 0xBE6, 0xC66, 0xCE6, 0xD66, 0xDE6,
        0xE50, 0xED0, 0xF20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90,
        0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0,
        0xFF10,
    ];
    let u = c as u32;
    ZEROS.iter().any(|&z| (z..z + 10).contains(&u))
}

const WHOLE_WORD_SPLITS: &[(&str, usize)] = &[
    ("cannot", 3),
    ("gimme", 3),
    ("gonna", 3),
    ("gotta", 3),
    ("lemme", 3),
    ("more'n", 4),
    ("wanna", 3),
    ("d'ye", 1),
    ("'tis", 2),
    ("'twas", 2),
];

const ANY_CASE_ENDINGS: &[&str] = &["'s", "'m", "'d"];
const SAME_CASE_ENDINGS: &[&str] = &["'ll", "'LL", "'re", "'RE", "'ve", "'VE", "n't", "N'T"];

/// A piece and the contraction NLTK splits off its end, if any.
fn split_contractions(piece: &str) -> Vec<&str> {
    let lower = piece.to_lowercase();
    if lower.len() == piece.len() {
        for &(word, at) in WHOLE_WORD_SPLITS {
            if lower == word {
                return vec![&piece[..at], &piece[at..]];
            }
        }
    }
    // `([^' ])('[sS]|'[mM]|'[dD]|') ` and `([^' ])('ll|'LL|...|N'T) `: the ending needs a
    // character before it that is not an apostrophe.
    let split_at = |cut: usize| cut > 0 && !piece[..cut].ends_with('\'');
    for e in SAME_CASE_ENDINGS {
        if let Some(head) = piece.strip_suffix(e)
            && split_at(head.len())
        {
            return vec![head, &piece[head.len()..]];
        }
    }
    let n = piece.len();
    if n >= 2 && piece.is_char_boundary(n - 2) {
        let tail = &piece[n - 2..];
        if ANY_CASE_ENDINGS
            .iter()
            .any(|e| tail.eq_ignore_ascii_case(e))
            && split_at(n - 2)
        {
            return vec![&piece[..n - 2], tail];
        }
    }
    if piece.ends_with('\'') && split_at(n - 1) {
        return vec![&piece[..n - 1]];
    }
    vec![piece]
}

#[cfg(test)]
mod tests {
    use super::count_upper_words as n;

    #[test]
    fn counts_as_nltk_word_tokenize_then_isupper() {
        // nltk.word_tokenize + isupper, worked out from the Treebank rules:
        assert_eq!(n("HELLO world, THIS is A test."), 3); // HELLO THIS A
        assert_eq!(n("I DON'T KNOW"), 4); // I DO N'T KNOW
        assert_eq!(n("IT'S NASA's job"), 3); // IT 'S NASA ('s is lowercase)
        assert_eq!(n("AT&T and U.S. FOO-BAR"), 4); // AT T U.S. FOO-BAR
        assert_eq!(n("WE CANNOT STOP"), 4); // WE CAN NOT STOP
        assert_eq!(n("\"QUOTED\" (PAREN) **BOLD**"), 3);
        assert_eq!(n("A,B 1,000 10:30 X:Y"), 4); // A B X Y; digits are uncased
        assert_eq!(n("DON’T"), 2); // curly apostrophe is a quote to NLTK: DON ’ T
        assert_eq!(n("123 ... -- ???"), 0);
        assert_eq!(n(""), 0);
    }
}
