//! Deleting stale conntrack entries (UDP has no connection end, so a flow keeps going to an
//! endpoint that is gone until its entry is deleted). Uses the `conntrack` tool.

use std::net::IpAddr;
use std::process::Command;

use crate::backend::BackendError;
use crate::iptables::exec::output;
use crate::model::ConntrackCleanup;

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// The `conntrack -D` arguments for one cleanup.
pub fn arguments(cleanup: &ConntrackCleanup) -> Vec<String> {
    let (vip, port, protocol, endpoint) = match cleanup {
        ConntrackCleanup::Endpoint {
            vip,
            port,
            protocol,
            endpoint,
        } => (vip, port, protocol, Some(endpoint)),
        ConntrackCleanup::Service {
            vip,
            port,
            protocol,
        } => (vip, port, protocol, None),
    };
    let mut args: Vec<String> = vec![
        "-D".into(),
        "-f".into(),
        family(vip).into(),
        "-p".into(),
        protocol.lower().into(),
        "--orig-dst".into(),
        vip.to_string(),
        "--orig-port-dst".into(),
        port.to_string(),
    ];
    // Only the flows that were DNATed to that endpoint.
    if let Some(endpoint) = endpoint {
        args.extend(["--dst-nat".into(), endpoint.to_string()]);
    }
    args
}

/// Deletes the entries; "0 flow entries" (conntrack exits 1) is not an error.
pub fn clear(cleanups: impl IntoIterator<Item = ConntrackCleanup>) -> Result<usize, BackendError> {
    let mut deleted = 0;
    for cleanup in cleanups {
        let args = arguments(&cleanup);
        let name = format!("conntrack {}", args.join(" "));
        match output(Command::new("conntrack").args(&args), &name) {
            Ok(_) => deleted += 1,
            Err(BackendError::Command { stderr, .. }) if stderr.contains("0 flow entries") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
