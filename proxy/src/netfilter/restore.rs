//! A small writer of `iptables-restore` input: per table, `*TABLE`, the chains it declares
//! (`:CHAIN - [0:0]`, which also flushes them under `--noflush`), its rules, `COMMIT`.

use std::fmt::Write as _;

#[derive(Debug, Default)]
pub struct RestoreWriter {
    out: String,
    /// The table being written, if `COMMIT` is still due.
    open: bool,
    rules: usize,
}

impl RestoreWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `table` (committing the one before, if any).
    pub fn table(&mut self, table: &str) -> &mut Self {
        self.commit();
        let _ = writeln!(self.out, "*{table}");
        self.open = true;
        self
    }

    /// Declares `chain`: created if missing, flushed if present.
    pub fn chain(&mut self, chain: &str) -> &mut Self {
        let _ = writeln!(self.out, ":{chain} - [0:0]");
        self
    }

    /// One rule line (`-A …`, `-I …`, `-D …`) or `-X CHAIN`.
    pub fn line(&mut self, line: &str) -> &mut Self {
        self.out.push_str(line);
        self.out.push('\n');
        self.rules += 1;
        self
    }

    fn commit(&mut self) {
        if self.open {
            self.out.push_str("COMMIT\n");
            self.open = false;
        }
    }

    /// Lines written with [`line`](Self::line).
    pub fn lines(&self) -> usize {
        self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// The whole input, every table committed.
    pub fn finish(mut self) -> String {
        self.commit();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_committed_in_turn() {
        let mut w = RestoreWriter::new();
        w.table("nat").chain("X-A").line("-A X-A -j RETURN");
        w.table("filter").line("-X X-B");
        assert_eq!(w.lines(), 2);
        assert_eq!(
            w.finish(),
            "*nat\n:X-A - [0:0]\n-A X-A -j RETURN\nCOMMIT\n*filter\n-X X-B\nCOMMIT\n"
        );
        assert_eq!(RestoreWriter::new().finish(), "");
    }
}
