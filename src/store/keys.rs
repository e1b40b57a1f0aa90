//! The key layout under the cluster prefix (default `/vxnet/`). docs/architecture.md has the
//! same table; keep the two in step.
//!
//! | key                                   | value            | lease      |
//! |---------------------------------------|------------------|------------|
//! | `nodes/<node-id>`                     | `Node` JSON      | the node's |
//! | `networks/<network-id>`               | `Network` JSON   | none       |
//! | `network-names/<name>`                | network ID       | none       |
//! | `vnis/<vni>`                          | network ID       | none       |
//! | `endpoints/<network-id>/<endpoint-id>`| `Endpoint` JSON  | the node's |
//! | `ipam/<network-id>/addrs/<ip>`        | endpoint or reservation ID | the node's |
//! | `ipam/<network-id>/cursor`            | last given IP    | none       |
//! | `health/<node-id>`                    | `HealthRecord` JSON | none (outlives the node, to show it down) |
//!
//! Endpoints and their address claims carry the lease of the node that owns them, so a host
//! that dies takes its endpoints and addresses with it when its lease expires.

use std::net::Ipv4Addr;

use crate::model::{EndpointId, NetworkId, NodeId};

pub const DEFAULT_PREFIX: &str = "/vxnet/";

/// Builds and parses keys under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What a key under the prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Node(NodeId),
    Network(NetworkId),
    Endpoint(NetworkId, EndpointId),
    /// The allocation cursor of a network's IPAM.
    Cursor(NetworkId),
    /// A key in the nodes, networks or endpoints directory that does not name a record the
    /// way vxnet writes them (an ID that is not 64 lowercase hex, a path too deep): refused
    /// and reported by the view rather than ignored unseen.
    Malformed {
        /// "node", "network" or "endpoint".
        record: &'static str,
        /// The part of the key after the prefix.
        rest: String,
    },
    /// Anything else under the prefix (names, VNIs, IPAM): not part of the view.
    Other,
}

impl Keys {
    /// `prefix` gets a trailing `/` if it lacks one.
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }
    pub fn node(&self, id: &NodeId) -> String {
        format!("{}nodes/{id}", self.prefix)
    }
    /// Every host's published health (`vxnet node ls`).
    pub fn healths(&self) -> String {
        format!("{}health/", self.prefix)
    }
    pub fn health(&self, id: &NodeId) -> String {
        format!("{}health/{id}", self.prefix)
    }
    pub fn networks(&self) -> String {
        format!("{}networks/", self.prefix)
    }
    pub fn network(&self, id: &NetworkId) -> String {
        format!("{}networks/{id}", self.prefix)
    }
    pub fn network_name(&self, name: &str) -> String {
        format!("{}network-names/{name}", self.prefix)
    }
    pub fn vni(&self, vni: u32) -> String {
        format!("{}vnis/{vni}", self.prefix)
    }
    /// Every network's endpoints.
    pub fn all_endpoints(&self) -> String {
        format!("{}endpoints/", self.prefix)
    }
    pub fn endpoints(&self, net: &NetworkId) -> String {
        format!("{}endpoints/{net}/", self.prefix)
    }
    pub fn endpoint(&self, net: &NetworkId, id: &EndpointId) -> String {
        format!("{}endpoints/{net}/{id}", self.prefix)
    }
    pub fn ipam(&self, net: &NetworkId) -> String {
        format!("{}ipam/{net}/", self.prefix)
    }
    pub fn addrs(&self, net: &NetworkId) -> String {
        format!("{}ipam/{net}/addrs/", self.prefix)
    }
    pub fn addr(&self, net: &NetworkId, ip: Ipv4Addr) -> String {
        format!("{}ipam/{net}/addrs/{ip}", self.prefix)
    }
    pub fn cursor(&self, net: &NetworkId) -> String {
        format!("{}ipam/{net}/cursor", self.prefix)
    }

    /// Classifies a key read from the store. Malformed keys are `Other`, never an error:
    /// a stray key someone wrote by hand must not stop the daemon.
    pub fn classify(&self, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return KeyKind::Other;
        };
        let malformed = |record| KeyKind::Malformed {
            record,
            rest: rest.chars().take(200).collect(),
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("nodes"), Some(id), None, None) => {
                id.parse().map(KeyKind::Node).unwrap_or(malformed("node"))
            }
            (Some("nodes"), ..) => malformed("node"),
            (Some("networks"), Some(id), None, None) => id
                .parse()
                .map(KeyKind::Network)
                .unwrap_or(malformed("network")),
            (Some("networks"), ..) => malformed("network"),
            (Some("ipam"), Some(net), Some("cursor"), None) => {
                net.parse().map(KeyKind::Cursor).unwrap_or(KeyKind::Other)
            }
            (Some("endpoints"), Some(net), Some(ep), None) => match (net.parse(), ep.parse()) {
                (Ok(net), Ok(ep)) => KeyKind::Endpoint(net, ep),
                _ => malformed("endpoint"),
            },
            (Some("endpoints"), ..) => malformed("endpoint"),
            _ => KeyKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Id;

    #[test]
    fn keys_round_trip_through_classify() {
        let keys = Keys::new("/test");
        let net = Id::random();
        let ep = Id::random();
        let node = Id::random();
        assert_eq!(keys.prefix(), "/test/");
        assert_eq!(keys.classify(&keys.node(&node)), KeyKind::Node(node));
        assert_eq!(
            keys.classify(&keys.network(&net)),
            KeyKind::Network(net.clone())
        );
        assert_eq!(
            keys.classify(&keys.endpoint(&net, &ep)),
            KeyKind::Endpoint(net.clone(), ep)
        );
        assert_eq!(
            keys.classify(&keys.cursor(&net)),
            KeyKind::Cursor(net.clone())
        );
        assert_eq!(keys.classify(&keys.network_name("x")), KeyKind::Other);
        assert_eq!(
            keys.classify(&keys.addr(&net, Ipv4Addr::new(10, 0, 0, 2))),
            KeyKind::Other
        );
        assert_eq!(
            keys.classify("/test/networks/not-an-id"),
            KeyKind::Malformed {
                record: "network",
                rest: "networks/not-an-id".into()
            }
        );
        assert!(matches!(
            keys.classify(&format!("{}/extra", keys.endpoint(&net, &Id::random()))),
            KeyKind::Malformed {
                record: "endpoint",
                ..
            }
        ));
        assert_eq!(keys.classify("/test/network-names/x/y"), KeyKind::Other);
        assert_eq!(keys.classify("/other/networks/x"), KeyKind::Other);
    }
}
