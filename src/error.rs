//! The errors of cluster operations, as the API reports them.
//!
//! Each variant says what was wrong and, where there is one, what to do. `kind()` maps them
//! to the API's status codes, so the CLI and the Docker plugin can report them faithfully.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or out-of-range input.
    #[error("{0}")]
    Invalid(String),
    /// A conflict not covered by a more specific variant.
    #[error("{0}")]
    Conflict(String),
    #[error("network {0} not found: `vxnet network ls` lists the networks")]
    NetworkNotFound(String),
    #[error(
        "network name {0:?} matches more than one network ID prefix: use more characters of the ID"
    )]
    AmbiguousNetwork(String),
    #[error("endpoint {0} not found")]
    EndpointNotFound(String),
    #[error(
        "endpoint {endpoint} belongs to host {owner}: disconnect it on that host, or delete it with ?force=true (the other host's container loses its address claim)"
    )]
    ForeignEndpoint { endpoint: String, owner: String },
    #[error("network with name {0} already exists")]
    NetworkNameInUse(String),
    #[error(
        "subnet {subnet} overlaps subnet {other_subnet} of network {other}: choose another subnet"
    )]
    SubnetOverlap {
        subnet: Ipv4Net,
        other: String,
        other_subnet: Ipv4Net,
    },
    #[error("VNI {0} is already used by network {1}: choose another --vni or leave it out")]
    VniInUse(u32, String),
    #[error("no free VNI left in {0}..{1}")]
    VnisExhausted(u32, u32),
    #[error(
        "network {name} has {count} active endpoint(s) ({list}): disconnect or remove them first"
    )]
    NetworkInUse {
        name: String,
        count: usize,
        list: String,
    },
    #[error("address {ip} is already in use on network {network}")]
    AddressInUse { ip: Ipv4Addr, network: String },
    #[error(
        "no address left in {range} on network {network}: all {capacity} addresses are in use"
    )]
    SubnetExhausted {
        network: String,
        range: Ipv4Net,
        capacity: u64,
    },
    #[error("cluster store busy: {0} did not settle after repeated retries; try again")]
    Contention(String),
    #[error(
        "this daemon has not joined the cluster yet (node lease not registered); try again shortly"
    )]
    NotRegistered,
    #[error(
        "this daemon has not read the cluster store yet, so there is nothing to compare the \
         kernel with; try again shortly (`vxnet info` shows the view revision)"
    )]
    NotSynced,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt record in the cluster store at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("programming the kernel failed: {0}")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error("no such container: {0} (`vxnet ps -a` lists them)")]
    ContainerNotFound(String),
    #[error("container name {0:?} is already in use on this host: choose another --name or remove that container")]
    ContainerNameInUse(String),
    #[error("container {0} is not running")]
    ContainerNotRunning(String),
    #[error("container {0} is running: stop it first, or remove it with -f")]
    ContainerRunning(String),
    #[error("container {container} is already connected to network {network}")]
    AlreadyConnected { container: String, network: String },
    #[error("container {container} is not connected to network {network}")]
    NotConnected { container: String, network: String },
    #[error(
        "port {port} is already published on this host by container {by}: choose another host port"
    )]
    PortInUse { port: String, by: String },
    #[error("firewall: {0}")]
    Firewall(#[from] crate::firewall::FirewallError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Coarse classes of [`Error`], one per API status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    NotFound,
    Conflict,
    Unavailable,
    Internal,
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) | Error::AmbiguousNetwork(_) => ErrorKind::Invalid,
            Error::NetworkNotFound(_)
            | Error::EndpointNotFound(_)
            | Error::ContainerNotFound(_) => ErrorKind::NotFound,
            Error::Conflict(_)
            | Error::NetworkNameInUse(_)
            | Error::SubnetOverlap { .. }
            | Error::VniInUse(..)
            | Error::VnisExhausted(..)
            | Error::NetworkInUse { .. }
            | Error::AddressInUse { .. }
            | Error::SubnetExhausted { .. }
            | Error::ContainerNameInUse(_)
            | Error::ContainerNotRunning(_)
            | Error::ContainerRunning(_)
            | Error::ForeignEndpoint { .. }
            | Error::AlreadyConnected { .. }
            | Error::PortInUse { .. }
            | Error::NotConnected { .. } => ErrorKind::Conflict,
            // A name in the container (or host) that is someone else's: the caller's to fix.
            Error::Dataplane(crate::dataplane::DataplaneError::NameTaken { .. }) => {
                ErrorKind::Conflict
            }
            Error::Contention(_) | Error::NotRegistered | Error::NotSynced => {
                ErrorKind::Unavailable
            }
            Error::Store(
                StoreError::Unreachable { .. }
                | StoreError::Tls { .. }
                | StoreError::BadCredentials { .. }
                | StoreError::AuthRequired { .. },
            ) => ErrorKind::Unavailable,
            Error::Store(_)
            | Error::Corrupt { .. }
            | Error::Dataplane(_)
            | Error::Firewall(_)
            | Error::Io { .. } => ErrorKind::Internal,
        }
    }
}
