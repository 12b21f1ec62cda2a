//! Does Python's `json.loads` accept this text? The IFEval `json_format` check is exactly
//! that question, and Python's answer differs from serde_json's: it accepts `NaN`,
//! `Infinity`, `-Infinity` and lone surrogate escapes (`"\ud800"`). A validator (no values
//! are built) written to CPython's `json.decoder` grammar.

/// Nesting deeper than this is refused (CPython raises RecursionError near 1000 levels).
const MAX_DEPTH: usize = 900;

pub fn python_json_loads_accepts(s: &str) -> bool {
    let b = s.as_bytes();
    let mut p = Parser { b, i: 0 };
    p.ws();
    if !p.value(0) {
        return false;
    }
    p.ws();
    p.i == b.len()
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// JSON whitespace only: `[ \t\n\r]`.
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &[u8]) -> bool {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => self.string(),
            Some(b'n') => self.lit(b"null"),
            Some(b't') => self.lit(b"true"),
            Some(b'f') => self.lit(b"false"),
            Some(b'N') => self.lit(b"NaN"),
            Some(b'I') => self.lit(b"Infinity"),
            Some(b'-') if self.b[self.i..].starts_with(b"-Infinity") => self.lit(b"-Infinity"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => false,
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    /// `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`; a fraction or exponent that does not complete
    /// is left unread (Python then fails on "extra data", as the caller will).
    fn number(&mut self) -> bool {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return false,
        }
        if self.peek() == Some(b'.') && matches!(self.b.get(self.i + 1), Some(b'0'..=b'9')) {
            self.i += 1;
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            let save = self.i;
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                self.i = save;
            }
        }
        true
    }

    /// Strict mode: no raw control characters; escapes `"\/bfnrt` and `uXXXX` (any four hex
    /// digits, surrogates alone included).
    fn string(&mut self) -> bool {
        self.i += 1;
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(c) if c < 0x20 => return false,
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            let hex = self.b.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return false;
                            }
                            self.i += 5;
                        }
                        _ => return false,
                    }
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn array(&mut self, depth: usize) -> bool {
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return true;
        }
        loop {
            self.ws();
            if !self.value(depth + 1) {
                return false;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return true;
                }
                _ => return false,
            }
        }
    }

    fn object(&mut self, depth: usize) -> bool {
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return true;
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') || !self.string() {
                return false;
            }
            self.ws();
            if self.peek() != Some(b':') {
                return false;
            }
            self.i += 1;
            self.ws();
            if !self.value(depth + 1) {
                return false;
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return true;
                }
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::python_json_loads_accepts as ok;

    #[test]
    fn accepts_what_python_accepts() {
        // Each verified with CPython 3.11 json.loads.
        for s in [
            r#"{"a": [1, 2.5e-3, -0, true, null], "b": {"c": "\u00e9\ud800\n"}}"#,
            "[NaN, Infinity, -Infinity]",
            "5",
            r#""just a string""#,
            " \n{}\r\t",
            "[]",
            "-1E+9",
        ] {
            assert!(ok(s), "{s}");
        }
    }

    #[test]
    fn refuses_what_python_refuses() {
        for s in [
            "",
            "{'a': 1}",
            r#"{"a": 1,}"#,
            "[1,]",
            "01",
            "1.",
            ".5",
            "-",
            "\u{feff}{}",
            "{\"a\": \"tab\there\"}",
            r#""bad \x escape""#,
            r#""\u12g4""#,
            "nul",
            "{} {}",
            "{\"a\" 1}",
            "[1 2]",
            "\u{a0}{}", // not JSON whitespace (the check strips it first, as Python's strip does)
        ] {
            assert!(!ok(s), "{s:?}");
        }
        assert!(!ok(&"[".repeat(2000)));
    }
}
