//! What every netfilter-based mode shares, whatever its chains are called: running
//! iptables/ip6tables (and `-save`/`-restore`) of either flavour, the jumps from the kernel's
//! built-in chains as data, the canary check for flushed tables, a restore writer, and the
//! cleanup of a chain prefix. The iptables backend uses it with `KPX-`; the IPVS backend's
//! small iptables part will use it with its own prefix, so the prefix is always a parameter.

pub mod canary;
pub mod cleanup;
pub mod exec;
pub mod jump;
pub mod restore;

pub use cleanup::{Leftovers, ToolCleanup};
pub use exec::{Flavour, Tool};
pub use jump::Jump;
pub use restore::RestoreWriter;
