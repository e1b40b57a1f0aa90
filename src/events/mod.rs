//! Cluster events (`vxnet events`): what changed in the cluster, as this daemon's one watch
//! saw it.
//!
//! The view (`crate::view`) derives a [`Change`] from each record it admits or drops while
//! applying a watch batch; the watcher hands them to the [`EventHub`], which stamps them with
//! the local receive time, keeps the recent ones for `--since` and broadcasts them to the
//! live `GET /v1/events` streams. The initial listing is state, not events; a re-list after
//! a compaction yields the difference between the old and the new view (see
//! `view::changes`).

mod filter;
mod hub;
mod stream;
mod time;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::model::Id;

pub use filter::{decode_query, EventFilter, FilterError, FILTER_KEYS};
pub use hub::{EventHub, Subscription, BUFFERED_EVENTS, LIVE_BACKLOG};
pub use stream::ndjson;
pub use time::{nanos_to_query, parse_time, unix_nanos, TimeError};

/// What an event is about (Docker's `Type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Network,
    Endpoint,
    Node,
    /// A store record this daemon refused (see `crate::validate`).
    Record,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::Network,
        EventType::Endpoint,
        EventType::Node,
        EventType::Record,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Network => "network",
            EventType::Endpoint => "endpoint",
            EventType::Node => "node",
            EventType::Record => "record",
        }
    }
}

/// What happened (Docker's `Action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A network appeared.
    Create,
    /// A network, endpoint or node record changed (re-puts of the same record are not one).
    Update,
    /// A network went.
    Rm,
    /// An endpoint appeared.
    Up,
    /// An endpoint went.
    Down,
    /// A node registered.
    Join,
    /// A node's record went (its lease ran out or was revoked).
    Leave,
    /// A record was refused.
    Rejected,
}

impl Action {
    pub const ALL: [Action; 8] = [
        Action::Create,
        Action::Update,
        Action::Rm,
        Action::Up,
        Action::Down,
        Action::Join,
        Action::Leave,
        Action::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Rm => "rm",
            Action::Up => "up",
            Action::Down => "down",
            Action::Join => "join",
            Action::Leave => "leave",
            Action::Rejected => "rejected",
        }
    }
}

/// What an event is about, as far as the view knew it. Absent fields were not known (an
/// endpoint whose host has no node record, a network created by a host that left).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    /// The network's, endpoint's or node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Net>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    /// An endpoint's network, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<Id>,
    /// An endpoint's overlay address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The host's node name: an endpoint's host, a network's creator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Id>,
    /// A node's VXLAN tunnel endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// A refused record's kind (node, network, endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Why a record was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Attributes {
    /// `name=blue, subnet=10.0.0.0/24, host=vm3`: the text line's attributes. The IDs
    /// (`network_id`, `node_id`) are left to the JSON form: the names beside them say the
    /// same to a reader, and 64 characters each would bury them.
    fn write_text(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut pair = |f: &mut fmt::Formatter<'_>, k: &str, v: &dyn fmt::Display| {
            let sep = if first { "" } else { ", " };
            first = false;
            write!(f, "{sep}{k}={v}")
        };
        if let Some(v) = &self.name {
            pair(f, "name", v)?;
        }
        if let Some(v) = &self.subnet {
            pair(f, "subnet", v)?;
        }
        if let Some(v) = &self.vni {
            pair(f, "vni", v)?;
        }
        if let Some(v) = &self.network {
            pair(f, "network", v)?;
        }
        if let Some(v) = &self.ip {
            pair(f, "ip", v)?;
        }
        if let Some(v) = &self.host {
            pair(f, "host", v)?;
        }
        if let Some(v) = &self.address {
            pair(f, "address", v)?;
        }
        if let Some(v) = &self.kind {
            pair(f, "kind", v)?;
        }
        // Last: a reason is free text, and may hold commas.
        if let Some(v) = &self.reason {
            pair(f, "reason", v)?;
        }
        Ok(())
    }
}

/// The thing an event is about (Docker's `Actor`): a network, endpoint or node ID, or the
/// store key of a refused record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub id: String,
    pub attributes: Attributes,
}

/// One change the view applied, before the hub stamps it with a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub kind: EventType,
    pub action: Action,
    pub actor: Actor,
    /// The store revision of the change (the record's mod revision, or the re-list's).
    pub revision: i64,
}

/// One cluster event as `GET /v1/events` streams it (one JSON object a line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub action: Action,
    pub actor: Actor,
    /// When this daemon's watch received it: RFC 3339, UTC, microseconds.
    pub time: String,
    /// The same, in nanoseconds since the Unix epoch (what `--since` and `--until` compare).
    pub time_nano: i64,
    /// The store revision of the change.
    pub revision: i64,
}

/// `docker events`'s line: `TIME TYPE ACTION ID (k=v, …)`.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} (",
            self.time,
            self.kind.as_str(),
            self.action.as_str(),
            self.actor.id
        )?;
        self.actor.attributes.write_text(f)?;
        f.write_str(")")
    }
}

/// One line of the event stream: an event, or word that this reader fell behind and
/// `missed` events were dropped for it (the stream goes on after it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamLine {
    Event(Box<Event>),
    Missed { missed: u64, message: String },
}

impl StreamLine {
    pub fn missed(n: u64) -> StreamLine {
        StreamLine::Missed {
            missed: n,
            message: format!(
                "missed {n} events: this reader fell behind the daemon's live stream \
                 (read faster, or narrow it with --filter)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            kind: EventType::Network,
            action: Action::Create,
            actor: Actor {
                id: "ab".repeat(32),
                attributes: Attributes {
                    name: Some("blue".into()),
                    subnet: Some("10.0.0.0/24".parse().unwrap()),
                    vni: Some(256),
                    host: Some("vm3".into()),
                    node_id: Some("cd".repeat(32).parse().unwrap()),
                    ..Default::default()
                },
            },
            time: "2026-12-04T19:00:00.123456Z".into(),
            time_nano: 1_796_410_800_123_456_000,
            revision: 7,
        }
    }

    #[test]
    fn the_text_line_reads_like_docker_events() {
        assert_eq!(
            event().to_string(),
            format!(
                "2026-12-04T19:00:00.123456Z network create {} \
                 (name=blue, subnet=10.0.0.0/24, vni=256, host=vm3)",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn stream_lines_round_trip_through_json() {
        for line in [StreamLine::Event(Box::new(event())), StreamLine::missed(3)] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(serde_json::from_str::<StreamLine>(&text).unwrap(), line);
        }
        let text = serde_json::to_string(&event()).unwrap();
        assert!(text.contains(r#""type":"network""#), "{text}");
        assert!(text.contains(r#""action":"create""#), "{text}");
    }
}
