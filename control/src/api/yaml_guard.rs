//! A linear pre-scan of a YAML request body that refuses flow-nesting bombs before the parser
//! sees them. libyaml (under serde_yaml) spends time quadratic in the flow depth (`'a: ' +
//! '['*200_000`, 400 KB, took 40 s of one core) and serde_yaml only refuses the depth
//! ("recursion limit exceeded", its limit is 128) after the whole parse. kube-apiserver's YAML
//! decoder (sigs.k8s.io/yaml over go-yaml) likewise bounds nesting; here the bound is checked
//! first, in one pass.
//!
//! The scan is not a full YAML lexer, so it refuses only well past serde_yaml's limit, at
//! [`MAX_FLOW_DEPTH`]: quoted scalars, comments, block scalars (`|`, `>`) and plain scalars in
//! block context are skipped as text, and where the scan cannot be sure (e.g. a plain scalar
//! continued on a more indented line that starts with `[`) it may count a bracket that YAML
//! reads as text. Valid YAML needs over a hundred such unbalanced brackets to be refused, and a
//! body below the bound costs at most its size times 256.

use super::ApiError;

/// Refused past this many open flow collections (`[`, `{`). serde_yaml refuses anything past
/// 128 nesting levels itself, but only after parsing the whole body; twice that leaves room for
/// the scan's inexactness (see above). A 3 MiB body of collections nested 250 deep still costs
/// libyaml in the order of a second of one core (measured: 0.4 s per 200 KB in a debug build),
/// bounded by the body limit and spent on the blocking pool, not on an async worker.
pub const MAX_FLOW_DEPTH: usize = 256;

/// Ok when the body's flow nesting stays within [`MAX_FLOW_DEPTH`]; otherwise the 400 serde_yaml
/// would have given after its long parse ("recursion limit exceeded"), naming where.
pub fn check(body: &[u8]) -> Result<(), ApiError> {
    match deepest(body, MAX_FLOW_DEPTH) {
        None => Ok(()),
        Some((line, column)) => Err(ApiError::bad_request(format!(
            "the request body is not valid YAML: recursion limit exceeded: more than \
             {MAX_FLOW_DEPTH} nested flow collections at line {line} column {column}"
        ))),
    }
}

/// Where (1-based line and column) the flow depth first exceeds `limit`, if it does.
fn deepest(body: &[u8], limit: usize) -> Option<(usize, usize)> {
    let mut scan = Scan {
        body,
        at: 0,
        line: 1,
        line_start: 0,
    };
    let mut depth = 0usize;
    // Block context: at the start of a node (after indentation, `- `, `? `, `: `, properties).
    let mut token_start = true;
    while let Some(c) = scan.peek() {
        if depth == 0 {
            match c {
                b'\n' => {
                    scan.bump();
                    token_start = true;
                }
                b' ' | b'\t' | b'\r' => scan.bump(),
                b'#' if scan.after_space() => scan.skip_line(),
                b'"' | b'\'' if token_start => {
                    scan.skip_quoted(c);
                    token_start = false;
                }
                b'[' | b'{' if token_start => {
                    scan.bump();
                    depth = 1;
                    token_start = true;
                }
                b'|' | b'>' if token_start => scan.skip_block_scalar(),
                b'-' | b'?' | b':' if scan.indicator() => {
                    scan.bump();
                    token_start = true;
                }
                b'&' | b'!' | b'*' if token_start => scan.skip_word(),
                b'%' if scan.column() == 0 => scan.skip_line(),
                b'-' | b'.' if scan.document_marker() => {
                    scan.at += 3;
                    token_start = true;
                }
                _ if !token_start => scan.skip_plain_block(),
                _ => {
                    token_start = false;
                    scan.skip_plain_block();
                }
            }
            continue;
        }
        // Flow context: every bracket outside quotes and comments is an indicator (flow plain
        // scalars may not contain them).
        match c {
            b'[' | b'{' => {
                scan.bump();
                depth += 1;
                if depth > limit {
                    return Some((scan.line, scan.column()));
                }
                token_start = true;
            }
            b']' | b'}' => {
                scan.bump();
                depth -= 1;
                // After a collection: a `:` may follow, never a new node.
                token_start = false;
            }
            b',' | b':' | b'?' => {
                scan.bump();
                token_start = true;
            }
            b'\n' | b' ' | b'\t' | b'\r' => scan.bump(),
            b'#' if scan.after_space() => scan.skip_line(),
            b'"' | b'\'' if token_start => {
                scan.skip_quoted(c);
                token_start = false;
            }
            _ => {
                token_start = false;
                scan.bump();
            }
        }
    }
    None
}

struct Scan<'a> {
    body: &'a [u8],
    at: usize,
    line: usize,
    line_start: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.at).copied()
    }

    fn bump(&mut self) {
        if self.peek() == Some(b'\n') {
            self.line += 1;
            self.line_start = self.at + 1;
        }
        self.at += 1;
    }

    fn column(&self) -> usize {
        self.at - self.line_start
    }

    /// At the start of a line or after whitespace: where `#` starts a comment.
    fn after_space(&self) -> bool {
        self.at == 0 || matches!(self.body[self.at - 1], b' ' | b'\t' | b'\n' | b'\r')
    }

    /// `-`, `?` or `:` followed by whitespace or the end: a block indicator, not text.
    fn indicator(&self) -> bool {
        matches!(
            self.body.get(self.at + 1),
            None | Some(b' ' | b'\t' | b'\n' | b'\r')
        )
    }

    /// `---` or `...` at the start of a line, followed by whitespace or the end.
    fn document_marker(&self) -> bool {
        let rest = &self.body[self.at..];
        self.column() == 0
            && (rest.starts_with(b"---") || rest.starts_with(b"..."))
            && matches!(rest.get(3), None | Some(b' ' | b'\t' | b'\n' | b'\r'))
    }

    fn skip_line(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'\n' {
                return;
            }
            self.bump();
        }
    }

    fn skip_word(&mut self) {
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return;
            }
            self.bump();
        }
    }

    /// A quoted scalar (it may span lines): `\` escapes in `"…"`, `''` in `'…'`.
    fn skip_quoted(&mut self, quote: u8) {
        self.bump();
        while let Some(c) = self.peek() {
            self.bump();
            if quote == b'"' && c == b'\\' {
                self.bump();
            } else if c == quote {
                if quote == b'\'' && self.peek() == Some(b'\'') {
                    self.bump();
                } else {
                    return;
                }
            }
        }
    }

    /// A plain scalar in block context: text up to the end of the line, a ` #` comment or a
    /// `: ` mapping indicator (brackets inside it are text).
    fn skip_plain_block(&mut self) {
        while let Some(c) = self.peek() {
            match c {
                b'\n' => return,
                b'#' if self.after_space() => return,
                b':' if self.indicator() => return,
                _ => self.bump(),
            }
        }
    }

    /// A block scalar: its header line, then every line that is blank or indented deeper than
    /// the line holding the indicator (or as deep, when the indicator starts its line, as a
    /// top-level `|` may have content at column 0), up to a document marker.
    fn skip_block_scalar(&mut self) {
        let indent = self.body[self.line_start..self.at]
            .iter()
            .take_while(|&&c| c == b' ')
            .count();
        let first_on_line = self.body[self.line_start..self.at]
            .iter()
            .all(|&c| c == b' ' || c == b'-' || c == b'\t');
        self.skip_line();
        while self.peek() == Some(b'\n') {
            let next = self.at + 1;
            let rest = &self.body[next..];
            let spaces = rest.iter().take_while(|&&c| c == b' ').count();
            let blank = matches!(rest.get(spaces), None | Some(b'\n' | b'\r'));
            let marker = rest.starts_with(b"---") || rest.starts_with(b"...");
            let inside = blank || spaces > indent || (first_on_line && spaces == indent);
            if marker || !inside {
                return;
            }
            self.bump();
            self.skip_line();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_bombs_are_refused_and_text_is_not_counted() {
        let bomb = format!("a: {}", "[".repeat(200_000));
        let err = check(bomb.as_bytes()).expect_err("refused");
        assert_eq!(err.code, 400);
        assert!(
            err.message.contains("recursion limit exceeded"),
            "{}",
            err.message
        );
        assert!(check(format!("a: {}", "{".repeat(257)).as_bytes()).is_err());
        assert!(check(format!("- {}", "[".repeat(257)).as_bytes()).is_err());
        // At the bound: left to serde_yaml (which refuses past 128 itself, cheaply).
        assert!(check(format!("a: {}", "[".repeat(256)).as_bytes()).is_ok());
        let text = "[".repeat(5000);
        for valid in [
            format!("a: \"{text}\"\n"),
            format!("a: '{text}''x'\n"),
            format!("a: b {text}\n"),
            format!("# {text}\na: 1\n"),
            format!("a: 1 # {text}\n"),
            format!("a: |\n  {text}\n  more {text}\nb: 1\n"),
            format!("- >-\n  {text}\n\n  {text}\n"),
            format!("--- |\n  {text}\n"),
            format!("a: [\"{text}\", '{text}', x # {text}\n ]\n"),
        ] {
            assert!(
                check(valid.as_bytes()).is_ok(),
                "refused valid YAML: {valid:.40}"
            );
            // And it is valid YAML indeed.
            serde_yaml::from_str::<serde_yaml::Value>(&valid)
                .unwrap_or_else(|e| panic!("{e}: {valid:.60}"));
        }
    }
}
