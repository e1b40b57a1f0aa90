//! Admission of records read from the cluster store: every node, network and endpoint is
//! checked here before the view holds it.
//!
//! A record in etcd was written by another host, or by anyone who reached etcd. One that is
//! malformed or contradicts the cluster (a multicast MAC, an address outside its subnet, a
//! second owner of an address) must not reach the kernel, where it would fail or mislead
//! every host's programming of that network. What fails a check is refused here, once, with
//! the reason; everything else goes on as if the record did not exist.
//!
//! Checks that need other records (an endpoint's network, the holder of its address) are
//! made by the view, which knows them; the ones here look at one record and its key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::de::DeserializeOwned;

use crate::cluster::validate_name;
use crate::ipam::{self, AddressPool};
use crate::model::{Endpoint, Id, Mac, Network, Node};

/// Why a record was refused. Shown in `vxnet info` and logged once per record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the key's {what} {value:?} is not a 64-character lowercase hex ID")]
    BadKeyId { what: &'static str, value: String },
    #[error("not a readable {kind} record: {reason}")]
    Unreadable { kind: RecordKind, reason: String },
    #[error(
        "fields this vxnet does not know: {fields} (written by a newer version? upgrade this \
         host; until then the record is ignored rather than half understood)"
    )]
    UnknownFields { fields: String },
    #[error("the body's {field} {body} does not match the key's {key}")]
    KeyMismatch {
        field: &'static str,
        body: String,
        key: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("network {network} is not known to this host (endpoint written without its network?)")]
    UnknownNetwork { network: String },
    #[error("address {ip} already belongs to endpoint {holder} of this network")]
    AddressTaken { ip: Ipv4Addr, holder: String },
    #[error("VNI {vni} already belongs to network {holder}")]
    VniTaken { vni: u32, holder: String },
}

/// What kind of record a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    Node,
    Network,
    Endpoint,
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Node => "node",
            RecordKind::Network => "network",
            RecordKind::Endpoint => "endpoint",
        })
    }
}

/// Parses a record's JSON, refusing fields this version does not know: a newer writer's
/// field may change what the record means (an encrypted network read as a plain one), and
/// a silent downgrade is worse than a record ignored with a reason.
pub fn parse<T: DeserializeOwned>(kind: RecordKind, value: &[u8]) -> Result<T, Rejection> {
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(value);
    let parsed: Result<T, _> = serde_ignored::deserialize(&mut de, |path| {
        unknown.push(path.to_string());
    });
    let parsed = parsed
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| Rejection::Unreadable {
            kind,
            reason: e.to_string(),
        })?;
    if !unknown.is_empty() {
        return Err(Rejection::UnknownFields {
            fields: unknown.join(", "),
        });
    }
    Ok(parsed)
}

/// A key's ID segment, which must be a full ID.
pub fn key_id(what: &'static str, value: &str) -> Result<Id, Rejection> {
    value.parse().map_err(|_| Rejection::BadKeyId {
        what,
        value: value.chars().take(80).collect(),
    })
}

fn same_id(field: &'static str, body: &Id, key: &Id) -> Result<(), Rejection> {
    if body == key {
        return Ok(());
    }
    Err(Rejection::KeyMismatch {
        field,
        body: body.short().to_string(),
        key: key.short().to_string(),
    })
}

/// An address a host may be reached at: one unicast address (not unspecified, multicast
/// or broadcast). Loopback is allowed: daemons sharing one machine (the test clusters)
/// advertise it, and elsewhere it only points traffic back at its sender.
fn check_vtep(addr: IpAddr) -> Result<(), Rejection> {
    let bad = match addr {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if bad {
        return Err(Rejection::Invalid(format!(
            "advertise address {addr} cannot be a VTEP (unspecified, multicast or broadcast)"
        )));
    }
    Ok(())
}

pub fn check_node(key: &Id, node: &Node) -> Result<(), Rejection> {
    same_id("id", &node.id, key)?;
    check_vtep(node.advertise_addr)
}

pub fn check_network(key: &Id, net: &Network) -> Result<(), Rejection> {
    same_id("id", &net.id, key)?;
    validate_name("network", &net.name).map_err(|e| Rejection::Invalid(e.to_string()))?;
    ipam::validate_vni(net.vni).map_err(|e| Rejection::Invalid(e.to_string()))?;
    AddressPool::new(net.subnet, Some(net.gateway), net.ip_range)
        .map_err(|e| Rejection::Invalid(e.to_string()))?;
    if let Some(mtu) = net.mtu {
        if !(crate::cluster::MTU_MIN..=crate::cluster::MTU_MAX).contains(&mtu) {
            return Err(Rejection::Invalid(format!(
                "MTU {mtu} is out of range {}..{}",
                crate::cluster::MTU_MIN,
                crate::cluster::MTU_MAX
            )));
        }
    }
    Ok(())
}

/// A MAC a host may program as a static FDB entry: unicast and not all zero (the kernel
/// refuses a multicast one, and all-zero is the flood entry).
pub fn check_mac(mac: Mac) -> Result<(), Rejection> {
    if mac.0[0] & 1 == 1 {
        return Err(Rejection::Invalid(format!(
            "MAC {mac} is a multicast address: an endpoint needs a unicast MAC"
        )));
    }
    if mac.0 == [0; 6] {
        return Err(Rejection::Invalid(format!(
            "MAC {mac} is all zero: an endpoint needs a unicast MAC"
        )));
    }
    Ok(())
}

/// One endpoint against its key and its network (when the network is known).
pub fn check_endpoint(
    key_net: &Id,
    key_ep: &Id,
    ep: &Endpoint,
    net: &Network,
) -> Result<(), Rejection> {
    same_id("id", &ep.id, key_ep)?;
    same_id("network_id", &ep.network_id, key_net)?;
    check_mac(ep.mac)?;
    check_dns_names(ep)?;
    if !net.subnet.contains(&ep.ip) {
        return Err(Rejection::Invalid(format!(
            "address {} is outside the network's subnet {}",
            ep.ip, net.subnet
        )));
    }
    if ep.ip == net.gateway {
        return Err(Rejection::Invalid(format!(
            "address {} is the network's gateway",
            ep.ip
        )));
    }
    if ep.ip == net.subnet.network() || ep.ip == net.subnet.broadcast() {
        return Err(Rejection::Invalid(format!(
            "address {} is the network or broadcast address of {}",
            ep.ip, net.subnet
        )));
    }
    Ok(())
}

/// The most aliases one endpoint may carry: each is an entry in every host's name index.
pub const MAX_ALIASES: usize = 16;

/// An endpoint's name and aliases become DNS answers on every host: each must be a name
/// Docker would accept (which also keeps it one or more valid DNS labels' worth of bytes).
fn check_dns_names(ep: &Endpoint) -> Result<(), Rejection> {
    validate_name("endpoint", &ep.name).map_err(|e| Rejection::Invalid(e.to_string()))?;
    check_aliases(&ep.aliases).map_err(|e| Rejection::Invalid(e.to_string()))
}

/// A request's or a record's aliases: few enough, each a valid name.
pub fn check_aliases(aliases: &[String]) -> Result<(), crate::error::Error> {
    if aliases.len() > MAX_ALIASES {
        return Err(crate::error::Error::invalid(format!(
            "{} aliases given: at most {MAX_ALIASES} per network",
            aliases.len()
        )));
    }
    aliases.iter().try_for_each(|a| validate_alias(a))
}

/// Docker's rule for names, plus what DNS needs: labels of 1 to 63 characters.
pub fn validate_alias(alias: &str) -> Result<(), crate::error::Error> {
    validate_name("alias", alias)?;
    if alias.split('.').any(|l| l.is_empty() || l.len() > 63) {
        return Err(crate::error::Error::invalid(format!(
            "invalid alias {alias:?}: each dot-separated part must be 1 to 63 characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> Network {
        Network {
            id: Id::random(),
            name: "n1".into(),
            driver: "overlay".into(),
            subnet: "10.0.4.0/24".parse().unwrap(),
            gateway: "10.0.4.1".parse().unwrap(),
            ip_range: None,
            vni: 4096,
            mtu: None,
            labels: Default::default(),
            internal: false,
            created: String::new(),
            created_by: Id::random(),
        }
    }

    fn endpoint(net: &Network, ip: &str, mac: Option<Mac>) -> Endpoint {
        let ip: Ipv4Addr = ip.parse().unwrap();
        Endpoint {
            id: Id::random(),
            network_id: net.id.clone(),
            name: "e".into(),
            node_id: Id::random(),
            ip,
            mac: mac.unwrap_or(Mac::from_ipv4(ip)),
            created: String::new(),
            aliases: Vec::new(),
        }
    }

    #[test]
    fn endpoints_are_checked_against_key_and_network() {
        let net = network();
        let ok = endpoint(&net, "10.0.4.2", None);
        assert_eq!(check_endpoint(&net.id, &ok.id, &ok, &net), Ok(()));
        for (ep, what) in [
            (
                endpoint(&net, "10.0.4.2", Some(Mac([1, 0, 0x5e, 0, 0, 1]))),
                "multicast",
            ),
            (endpoint(&net, "10.0.4.2", Some(Mac([0; 6]))), "all zero"),
            (endpoint(&net, "10.0.5.2", None), "outside"),
            (endpoint(&net, "10.0.4.1", None), "gateway"),
            (endpoint(&net, "10.0.4.255", None), "broadcast"),
        ] {
            let e = check_endpoint(&net.id, &ep.id, &ep, &net).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let other = Id::random();
        let e = check_endpoint(&net.id, &other, &ok, &net).unwrap_err();
        assert!(
            matches!(e, Rejection::KeyMismatch { field: "id", .. }),
            "{e}"
        );
        let e = check_endpoint(&other, &ok.id, &ok, &net).unwrap_err();
        assert!(
            matches!(
                e,
                Rejection::KeyMismatch {
                    field: "network_id",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_short_ids_and_bad_json_are_refused() {
        let net = network();
        let mut v = serde_json::to_value(&net).unwrap();
        assert_eq!(
            parse::<Network>(RecordKind::Network, v.to_string().as_bytes()),
            Ok(net.clone())
        );
        v["encrypted"] = serde_json::Value::Bool(true);
        let e = parse::<Network>(RecordKind::Network, v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("encrypted"), "{e}");
        let mut v = serde_json::to_value(&net).unwrap();
        v["id"] = serde_json::Value::String("abc".into());
        assert!(matches!(
            parse::<Network>(RecordKind::Network, v.to_string().as_bytes()),
            Err(Rejection::Unreadable { .. })
        ));
        assert!(parse::<Network>(RecordKind::Network, b"{not json").is_err());
        assert!(parse::<Network>(RecordKind::Network, b"{} trailing").is_err());
        assert!(key_id("network ID", "abc").is_err());
        assert!(key_id("network ID", &"A".repeat(64)).is_err());
        // A key segment of any length or bytes is refused without slicing it.
        assert!(key_id("network ID", &"é".repeat(70)).is_err());
    }

    #[test]
    fn networks_and_nodes_are_checked() {
        let net = network();
        assert_eq!(check_network(&net.id, &net), Ok(()));
        let mut bad = net.clone();
        bad.gateway = "10.0.5.1".parse().unwrap();
        assert!(check_network(&net.id, &bad).is_err());
        let mut bad = net.clone();
        bad.vni = 1 << 24;
        assert!(check_network(&net.id, &bad).is_err());
        let mut bad = net.clone();
        bad.mtu = Some(100);
        assert!(check_network(&net.id, &bad).is_err());
        let mut bad = net.clone();
        bad.name = "../x".into();
        assert!(check_network(&net.id, &bad).is_err());
        let node = Node {
            id: Id::random(),
            name: "vm2".into(),
            advertise_addr: "224.0.0.1".parse().unwrap(),
            advertise_port: None,
            started: String::new(),
            version: String::new(),
        };
        assert!(check_node(&node.id, &node).is_err());
        let mut good = node.clone();
        good.advertise_addr = "192.0.2.6".parse().unwrap();
        assert_eq!(check_node(&good.id, &good), Ok(()));
        assert!(check_node(&Id::random(), &good).is_err());
    }
}
