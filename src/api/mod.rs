//! The daemon's API: HTTP/1.1 + JSON on a unix socket. `server.rs` serves it, `client.rs`
//! is what the CLI (and tests) use, `types.rs` holds the shapes both sides share.
//! docs/api.md documents every route; keep it in step with `server::router`.

pub mod client;
pub mod server;
pub mod types;

/// The API version prefix of every route.
pub const API_PREFIX: &str = "/v1";
/// Where the daemon listens and the CLI connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vxnet/vxnet.sock";
