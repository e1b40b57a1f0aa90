//! vxnet: multi-host container networking over kernel VXLAN, with etcd as the cluster store.
//!
//! docs/architecture.md is the map; each module's doc comment says what it owns.

pub mod api;
pub mod backoff;
pub mod cli;
pub mod cluster;
pub mod cni;
pub mod config;
pub mod container;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod docker;
pub mod error;
pub mod events;
pub mod firewall;
pub mod format;
pub mod health;
pub mod ipam;
pub mod lab;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod node;
pub mod reconcile;
pub mod registry;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod validate;
pub mod view;
