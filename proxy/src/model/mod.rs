//! The proxy's model of the cluster, pure: Services and EndpointSlices in, a [`ProxyState`]
//! snapshot and the [`Changes`] since the previous one out. No I/O here.

pub mod endpoints;
pub mod frontend;
pub mod refuse;
pub mod service;
pub mod state;
pub mod tracker;

pub use endpoints::{Endpoint, Selected};
pub use refuse::{Protected, Refusal};
pub use service::{NamespacedName, Protocol, ServicePort, ServicePortName, Skipped};
pub use state::{Changes, ConntrackCleanup, ProxyState, ServiceEntry};
pub use tracker::ChangeTracker;
