//! Python's `str` semantics where the IFEval reference relies on them: what `strip()` and
//! `split()` call whitespace, `isupper()` / `islower()` (cased characters, titlecase), and
//! `\w` of Python's `re` (which is narrower than the regex crate's: no combining marks).

/// `str.isspace()`: Unicode White_Space plus the four separators U+001C..U+001F, which
/// CPython counts as whitespace and Rust does not.
pub fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()`.
pub fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// `str.split()` without arguments: runs of whitespace separate, none at the ends.
pub fn split_whitespace(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_space).filter(|w| !w.is_empty())
}

/// General category Lt (titlecase letters): `isupper()` and `islower()` both refuse them.
fn is_titlecase(c: char) -> bool {
    matches!(c,
        '\u{1c5}' | '\u{1c8}' | '\u{1cb}' | '\u{1f2}'
        | '\u{1f88}'..='\u{1f8f}' | '\u{1f98}'..='\u{1f9f}' | '\u{1fa8}'..='\u{1faf}'
        | '\u{1fbc}' | '\u{1fcc}' | '\u{1ffc}')
}

/// `str.isupper()`: at least one cased character and no lowercase or titlecase one.
/// CPython's flags come from the same derived properties (Uppercase, Lowercase) as Rust's.
pub fn is_upper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_lowercase() || is_titlecase(c) {
            return false;
        }
        cased |= c.is_uppercase();
    }
    cased
}

/// `str.islower()`.
pub fn is_lower(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_uppercase() || is_titlecase(c) {
            return false;
        }
        cased |= c.is_lowercase();
    }
    cased
}

/// A character `\w` matches in Python's `re` on `str`: `isalnum()` (letters of categories
/// L*, numbers N*) or `_`. The regex crate's `\w` also takes combining marks, which would
/// split Hindi or Tamil words differently from the reference.
pub const PY_WORD_CLASS: &str = r"[\p{L}\p{N}_]";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_predicates_follow_python() {
        // Values from CPython 3.11: "ABC 1".isupper() True, "123".isupper() False, ...
        assert!(is_upper("ABC 1"));
        assert!(!is_upper("123"));
        assert!(!is_upper("ABc"));
        assert!(is_upper("ÉTÉ!"));
        assert!(!is_upper("\u{1c5}A")); // titlecase Dž
        assert!(is_lower("abc, def 9"));
        assert!(!is_lower("abc D"));
        assert!(!is_lower(""));
        assert!(!is_lower("हिन्दी")); // uncased script: no cased character
    }

    #[test]
    fn strip_takes_what_python_calls_whitespace() {
        assert_eq!(strip("\u{1f} a b\u{a0}\n"), "a b");
        assert_eq!(
            split_whitespace(" a\u{2003}b  c ").collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }
}
