//! The nftables backend (the lead's module; this worktree holds only the test interpreter).

#[cfg(test)]
pub mod trace;
