//! kpx-lab: a kpx cluster on one machine.
//!
//! Today it runs the control plane demo ([`demo`]); the proxy and lab issues add the network
//! namespace topology, the scenario tests and `kpx-lab bench`.

pub mod control_plane;
pub mod demo;
pub mod lab;
pub mod netns;
pub mod traffic;
