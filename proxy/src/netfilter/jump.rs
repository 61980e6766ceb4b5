//! Jumps from the kernel's built-in chains into a mode's own chains, as data (kube-proxy's
//! `iptablesJumpChains` in `pkg/proxy/iptables/proxier.go`): how one is written, and how it is
//! found in what `iptables-save` or `iptables -S` prints.

/// A jump from a built-in chain. It is put in place first in line (`-I FROM 1`), through
/// restore in the same transaction as the rules (or `iptables -I`), and found again by its
/// comment and target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    /// Extra match arguments before `-j`.
    pub matches: &'static [&'static str],
    pub comment: &'static str,
}

impl Jump {
    /// The rule as `iptables-save` prints it, after `-A FROM ` / `-I FROM 1 `.
    pub fn spec(&self) -> String {
        let mut spec = String::new();
        for m in self.matches {
            spec.push_str(m);
            spec.push(' ');
        }
        spec.push_str(&format!(
            "-m comment --comment \"{}\" -j {}",
            self.comment, self.to
        ));
        spec
    }

    /// The restore line that puts this jump first in its chain.
    pub fn insert_line(&self) -> String {
        format!("-I {} 1 {}", self.from, self.spec())
    }

    /// Whether `saved` (an `iptables-save -t TABLE` or `iptables -S CHAIN` output) holds this
    /// jump.
    pub fn present_in(&self, saved: &str) -> bool {
        let prefix = format!("-A {} ", self.from);
        saved.lines().any(|l| {
            l.starts_with(&prefix)
                && l.contains(&format!("--comment \"{}\"", self.comment))
                && l.ends_with(&format!("-j {}", self.to))
        })
    }
}

/// The jumps of `jumps` that are missing, given each table's saved text (`saved("nat")`).
pub fn missing<'a>(jumps: &[Jump], saved: impl Fn(&str) -> &'a str) -> Vec<Jump> {
    jumps
        .iter()
        .filter(|j| !j.present_in(saved(j.table)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const J: Jump = Jump {
        table: "filter",
        from: "INPUT",
        to: "X-SERVICES",
        matches: &["-m", "conntrack", "--ctstate", "NEW"],
        comment: "x service portals",
    };

    #[test]
    fn a_jump_is_found_in_the_form_save_prints_it() {
        let saved = format!("*filter\n-A INPUT {}\nCOMMIT\n", J.spec());
        assert!(J.present_in(&saved));
        assert_eq!(
            J.insert_line(),
            "-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment \"x service portals\" -j X-SERVICES"
        );
        // Same target, another comment: someone else's rule, not ours.
        assert!(!J.present_in("-A INPUT -m comment --comment \"other\" -j X-SERVICES\n"));
        assert_eq!(missing(&[J], |_| saved.as_str()), vec![]);
        assert_eq!(missing(&[J], |_| ""), vec![J]);
    }
}
