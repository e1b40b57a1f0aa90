//! Docker's legacy remote plugin protocols, served by the daemon: vxnet as a Docker network
//! driver and IPAM driver, so `docker run --network` on several hosts puts containers on
//! one vxnet overlay (what Docker 23 removed with `--cluster-store`).
//!
//! `protocol.rs` has the messages, `plugin.rs` maps each call onto vxnet's cluster
//! operations and data plane, `state.rs` keeps what must survive a daemon restart, and
//! `server.rs` serves it all on the plugin socket Docker discovers.

pub mod names;
pub mod plugin;
pub mod protocol;
pub mod server;
pub mod state;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use plugin::DockerPlugin;
pub use state::PluginState;

/// The plugin's name: `docker network create -d vxnet`, `--ipam-driver vxnet`.
pub const PLUGIN_NAME: &str = "vxnet";
/// Where Docker discovers a plugin named vxnet by its socket.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/vxnet.sock";

/// Which kind of Docker engine the plugin serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Engines without a cluster store (Docker 23+, or 20.10 without `--cluster-store`):
    /// every host creates its Docker network and binds it to the vxnet network by name.
    Local,
    /// Engines started with `--cluster-store` (Docker ≤ 20.10, the seed's set-up): one
    /// `docker network create` is seen by every engine.
    Global,
}

impl Scope {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Scope::Local),
            "global" => Ok(Scope::Global),
            _ => Err(format!(
                "{s:?} is not a scope: use local (engines without --cluster-store) or global"
            )),
        }
    }
}

/// How often a plugin call was served and how long it took (from request to answer, µs).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallStats {
    pub count: u64,
    pub total_us: u64,
    pub max_us: u64,
}

/// The largest request body the plugin socket accepts (Docker's requests are a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// `vxnet daemon --docker-plugin`.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    pub socket: PathBuf,
    pub scope: Scope,
    /// The local engine's API socket, where containers' names are learned (`--docker-host`).
    pub engine: PathBuf,
}
