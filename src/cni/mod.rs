//! vxnet as a CNI plugin (`vxnet-cni`, `"type": "vxnet"` in a conflist): containerd, Podman
//! and other CNI runtimes attach their containers to vxnet networks through it.
//!
//! `spec.rs` is the CNI protocol, `plugin.rs` the executable (a thin, stateless client of
//! the local daemon), `requests.rs` what it asks the daemon. The daemon's side, records,
//! addresses, interfaces and the namespace watch, is in `container/cni.rs`.

pub mod plugin;
pub mod requests;
pub mod spec;
