//! kpx-control: a Kubernetes-compatible API server and its client.
//!
//! - [`store`]: a revisioned key-value store with etcd semantics (embedded: redb).
//! - [`api`]: the served resources, validation and defaulting, selectors, patches, OpenAPI.
//! - [`apiserver`]: the HTTP API (axum): CRUD, watch, discovery, errors as `Status`.
//! - [`client`]: a typed client, a kubeconfig reader and a reflector.
//! - [`serve`]: the HTTP serving loop with kube-apiserver's connection bounds.

pub mod api;
pub mod apiserver;
pub mod client;
pub mod controllers;
pub mod daemon;
pub mod kubelet;
pub mod netns;
pub mod serve;
pub mod store;
