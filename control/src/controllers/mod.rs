//! Controllers, each a watcher of the API like kube-controller-manager's: a pure decision
//! (`reconcile`) and a loop that feeds it from reflectors and writes its result through the API.

pub mod cache;
pub mod deployment;
pub mod deployment_sync;
pub mod endpointslice;
pub mod endpointslice_sync;
pub mod garbagecollector;
pub mod garbagecollector_sync;
pub mod nodelifecycle;
pub mod nodelifecycle_sync;
pub mod queue;
pub mod replicaset;
pub mod replicaset_sync;
pub mod scheduler;
pub mod scheduler_sync;
pub mod topologycache;
