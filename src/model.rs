//! The cluster's records: what is stored in etcd and shown by the API.
//!
//! These are plain serde types shared by the store layer, the daemon, the API and the CLI.
//! Field names are stable: they are the JSON stored in etcd and returned by the API.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// A 64-hex-character random identifier, Docker style (shown shortened to 12).
///
/// Shared text: a clone is a reference count, so the view can hold one ID in several
/// places (map key, record field) for the price of one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(Arc<str>);

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-character lowercase hex ID")
            }
            // Strict: an ID read from the store, a file or a request is well-formed or the
            // whole record is refused, so every `Id` in the program can be cut to a prefix.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Id, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl Id {
    pub const LEN: usize = 64;
    pub const SHORT_LEN: usize = 12;

    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Id(Arc::from(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first `n` characters (all of them when shorter): interface and namespace names.
    pub fn prefix(&self, n: usize) -> &str {
        self.0.get(..n).unwrap_or(&self.0)
    }

    /// The 12-character form `network ls` shows.
    pub fn short(&self) -> &str {
        &self.0[..Self::SHORT_LEN.min(self.0.len())]
    }

    /// True for a full 64-hex ID or a prefix of one (at least 1 hex char), as Docker accepts.
    pub fn looks_like_prefix(s: &str) -> bool {
        !s.is_empty() && s.len() <= Self::LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl FromStr for Id {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == Self::LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Id(Arc::from(s)))
        } else {
            Err(format!("{s:?} is not a 64-character lowercase hex ID"))
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

pub type NetworkId = Id;
pub type EndpointId = Id;
pub type NodeId = Id;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Docker's rule: 02:42 followed by the four bytes of the IPv4 address. Deriving the MAC
    /// from the IP means a reused address comes back with the same MAC, so a peer holding a
    /// stale ARP entry for that IP still reaches the right container.
    pub fn from_ipv4(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A container port reachable on its host's addresses (`run -p HOSTPORT:PORT[/PROTO]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublishedPort {
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

impl FromStr for PublishedPort {
    type Err = String;
    /// Docker's short form: `8080:80`, `8080:80/tcp`, `53:53/udp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid port mapping {s:?}: use HOSTPORT:CONTAINERPORT[/tcp|udp]");
        let (ports, proto) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (s, Proto::Tcp),
        };
        let (host, container) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(PublishedPort {
            host_port: port(host)?,
            container_port: port(container)?,
            proto,
        })
    }
}

impl fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// The only driver today; kept as a field so `network ls` reads like Docker's.
pub const DRIVER_OVERLAY: &str = "overlay";
/// vxnet networks exist on every host of the cluster.
pub const SCOPE_GLOBAL: &str = "global";

/// A global overlay network, as stored under `networks/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: NetworkId,
    pub name: String,
    pub driver: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Dynamic allocation is limited to this range (inside `subnet`) when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Ipv4Net>,
    pub vni: u32,
    /// Overlay MTU when the user fixed it; otherwise each host uses its underlay MTU - 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Internal networks reach nothing outside the overlay: their containers get no gateway
    /// bridge interface (Docker's `--internal`).
    #[serde(default)]
    pub internal: bool,
    /// RFC 3339, UTC.
    pub created: String,
    /// The node whose daemon created it (for `inspect`; not used for ownership).
    pub created_by: NodeId,
}

/// A container's attachment to a network, as stored under `endpoints/<network>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    pub network_id: NetworkId,
    /// A user-facing name (the container name), unique per network only by convention.
    pub name: String,
    pub node_id: NodeId,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub created: String,
    /// More names the endpoint answers to in the network's DNS (`--alias`, Docker's
    /// `--network-alias`); several endpoints may share one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// A host running a vxnet daemon, as stored under `nodes/<id>` with the node's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// The address peers use to reach this host: the VXLAN tunnel endpoint.
    pub advertise_addr: IpAddr,
    /// The port given with `--cluster-advertise IP:PORT`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_port: Option<u16>,
    pub started: String,
    pub version: String,
}

/// The current time as RFC 3339 UTC with microseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_derived_from_ip_like_docker() {
        let mac = Mac::from_ipv4("10.0.4.2".parse().unwrap());
        assert_eq!(mac.to_string(), "02:42:0a:00:04:02");
        assert_eq!("02:42:0a:00:04:02".parse::<Mac>().unwrap(), mac);
        assert!("02:42:0a:00:04".parse::<Mac>().is_err());
        assert!("02:42:0a:00:04:02:01".parse::<Mac>().is_err());
    }

    #[test]
    fn port_mappings_parse_like_docker() {
        let p: PublishedPort = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.proto),
            (8080, 80, Proto::Tcp)
        );
        let p: PublishedPort = "53:5353/udp".parse().unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.proto),
            (53, 5353, Proto::Udp)
        );
        assert_eq!(p.to_string(), "53:5353/udp");
        for bad in [
            "80",
            "0:80",
            "80:0",
            "80:80/sctp",
            "a:80",
            "70000:80",
            ":80",
        ] {
            assert!(bad.parse::<PublishedPort>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_64_hex_and_shorten_to_12() {
        let id = Id::random();
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(id.short().len(), 12);
        assert!(id.as_str().parse::<Id>().is_ok());
        assert!("xyz".parse::<Id>().is_err());
        assert_ne!(Id::random(), Id::random());
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |secs: u64, micros: u64| {
            humantime::format_rfc3339_micros(
                std::time::UNIX_EPOCH + std::time::Duration::from_micros(secs * 1_000_000 + micros),
            )
            .to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_000_000, 5), "2026-11-18T11:06:40.000005Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
        assert_eq!(now_rfc3339().len(), "2000-02-29T00:00:00.000000Z".len());
    }
}
