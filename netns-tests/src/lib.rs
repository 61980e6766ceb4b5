//! kpx-lab: a kpx cluster inside network namespaces. Filled by the proxy and lab issues (the
//! namespace harness, the scenario tests and `kpx-lab bench`); empty until then.
