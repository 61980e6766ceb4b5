//! The eBPF backend's control-plane figures (root needed: it loads the maps):
//! - full sync of N Services × 10 endpoints: the frontends wanted, the ordered map plan and
//!   its writes into freshly loaded maps, against the same writes alone (the loader's floor);
//! - one endpoint changed among N: the partial sync, and how many map writes it makes.
//!
//! The backend's sync is exactly these steps (`kpx_proxy::ebpf::backend`); the kernel side is
//! the `bpf(BPF_MAP_UPDATE_ELEM)` per write, nothing is attached, so the run needs no
//! namespace.
//!
//! Run: `cargo bench -p kpx-lab --bench ebpf_sync` (`KPX_BENCH_SCALES=1,1000,10000`).

mod fixtures;

use std::time::Instant;

use aya::Ebpf;
use fixtures::{median, service, slice, ENDPOINTS};
use kpx_ebpf::apply::apply;
use kpx_ebpf::objects::{self, Capacity};
use kpx_ebpf::plan::{plan, plan_keys, Programmed};
use kpx_proxy::ebpf::wanted::{NodeConfigs, WantedTable};
use kpx_proxy::model::{ChangeTracker, ProxyState};

const ROUNDS: usize = 3;
const CHANGES: usize = 21;

fn load(services: usize) -> Ebpf {
    let n = (services as u32).max(1);
    let capacity = Capacity {
        entries: vec![
            ("kpx_services", n * 2),
            ("kpx_rev_nat", n * 2),
            ("kpx_slots", n * ENDPOINTS as u32 * 2),
            ("kpx_backends", n * ENDPOINTS as u32 * 2),
        ],
    };
    objects::load(objects::TC_LB, None, &capacity)
        .expect("load the maps (root, clang-built objects)")
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn scale(services: usize) {
    let mut tracker = ChangeTracker::new("bench-node");
    for i in 0..services {
        tracker.apply_service(service(i));
        tracker.apply_slice(slice(i, 0));
    }
    let (state, _) = tracker.snapshot(&ProxyState::default());

    let (mut full, mut alone) = (Vec::new(), Vec::new());
    let mut writes = 0;
    for _ in 0..ROUNDS {
        // kpx: wanted → plan → apply, as a first sync does.
        let mut ebpf = load(services);
        let start = Instant::now();
        let (ops, _) = plan(
            &WantedTable::full(&state, NodeConfigs::default()).wanted,
            &Programmed::default(),
        );
        apply(&mut ebpf, &ops).expect("apply");
        full.push(ms(start));
        writes = ops.len();
        drop(ebpf);
        // The floor: the same writes, already computed.
        let mut ebpf = load(services);
        let start = Instant::now();
        apply(&mut ebpf, &ops).expect("apply");
        alone.push(ms(start));
    }

    // One endpoint of one Service changes, again and again: a partial sync each time, as
    // the backend makes it (the frontends of the changed Service port, their plan, writes).
    let mut ebpf = load(services);
    let mut table = WantedTable::full(&state, NodeConfigs::default());
    let (ops, mut programmed) = plan(&table.wanted, &Programmed::default());
    apply(&mut ebpf, &ops).expect("apply");
    let mut previous = state;
    let (mut change, mut change_writes) = (Vec::new(), 0);
    for round in 0..CHANGES {
        let i = (round * 7919) % services;
        tracker.apply_slice(slice(i, round % 2 + 1));
        let (next, changes) = tracker.snapshot(&previous);
        let start = Instant::now();
        let touched = table.update(&next, &changes);
        let ops = plan_keys(&table.wanted, &mut programmed, &touched);
        apply(&mut ebpf, &ops).expect("apply");
        change.push(ms(start));
        change_writes = ops.len();
        previous = next;
    }
    let (full_ms, alone_ms) = (median(&mut full), median(&mut alone));
    println!(
        "ebpf {services:>6} x {ENDPOINTS}: full sync {full_ms:.1} ms ({:.1}-{:.1}), map writes alone {alone_ms:.1} ms -> {:.2}x (medians of {ROUNDS}), {writes} map writes | one endpoint changed: {:.2} ms median ({:.2}-{:.2}, {CHANGES} changes), {change_writes} map writes",
        full[0],
        full[ROUNDS - 1],
        full_ms / alone_ms,
        median(&mut change),
        change[0],
        change[CHANGES - 1],
    );
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the eBPF benchmark needs root (it loads BPF maps)");
        return;
    }
    let scales: Vec<usize> = std::env::var("KPX_BENCH_SCALES")
        .unwrap_or_else(|_| "1,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("eBPF backend benchmark (control plane: wanted frontends, map plan, map writes)");
    for services in scales {
        scale(services);
    }
}
