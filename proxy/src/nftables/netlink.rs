//! nf_tables over netlink (placeholder until the netlink module lands: names through `nft -t`,
//! no generation, no element batches — the backend then takes the `nft -f` path).

use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ip,
    Ip6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{0}")]
    Unsupported(String),
}

pub struct Nft;

pub enum ElementOp {
    Add {
        set: String,
        key: Vec<u8>,
        data: Option<Vec<u8>>,
    },
    Delete {
        set: String,
        key: Vec<u8>,
    },
}

fn list(family: Family, table: &str) -> Result<String, NlError> {
    super::nft_output(&["-t", "list", "table", family.name(), table])
        .map_err(|e| NlError::Unsupported(e.to_string()))
}

fn names(text: &str, kinds: &[&str]) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let kind = words.next()?;
            let name = words.next()?;
            (kinds.contains(&kind) && l.trim_end().ends_with('{')).then(|| name.to_string())
        })
        .collect()
}

impl Nft {
    pub fn open() -> Result<Self, NlError> {
        Ok(Nft)
    }

    pub fn generation(&mut self) -> Result<u32, NlError> {
        Err(NlError::Unsupported("generation".into()))
    }

    pub fn table(&mut self, family: Family, table: &str) -> Result<Option<u64>, NlError> {
        let tables = super::nft_output(&["list", "tables", family.name()])
            .map_err(|e| NlError::Unsupported(e.to_string()))?;
        Ok(tables
            .lines()
            .any(|l| l.trim() == format!("table {} {table}", family.name()))
            .then_some(0))
    }

    pub fn chains(&mut self, family: Family, table: &str) -> Result<Vec<String>, NlError> {
        Ok(names(&list(family, table)?, &["chain"]))
    }

    pub fn sets(&mut self, family: Family, table: &str) -> Result<Vec<String>, NlError> {
        Ok(names(&list(family, table)?, &["set", "map"]))
    }

    pub fn rule_counts(
        &mut self,
        _family: Family,
        _table: &str,
    ) -> Result<BTreeMap<String, usize>, NlError> {
        Err(NlError::Unsupported("rule counts".into()))
    }

    pub fn commit_elements(
        &mut self,
        _family: Family,
        _table: &str,
        _ops: &[ElementOp],
    ) -> Result<u32, NlError> {
        Err(NlError::Unsupported("element batches".into()))
    }
}

pub fn slot_key(slot: u32) -> Vec<u8> {
    slot.to_ne_bytes().to_vec()
}

pub fn endpoint_data(ip: IpAddr, port: u16) -> Vec<u8> {
    let mut out = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    out.extend(port.to_be_bytes());
    out.extend([0, 0]);
    out
}

pub fn address_pair_key(a: IpAddr, b: IpAddr) -> Vec<u8> {
    let mut out = Vec::new();
    for ip in [a, b] {
        match ip {
            IpAddr::V4(v4) => out.extend(v4.octets()),
            IpAddr::V6(v6) => out.extend(v6.octets()),
        }
    }
    out
}
