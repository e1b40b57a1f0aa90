//! Which events a stream carries: Docker's `--filter KEY=VALUE` keys, and `--since` /
//! `--until`, as the query of `GET /v1/events`.
//!
//! Filtering is the daemon's (server-side): a reader watching one network of a busy
//! cluster is not sent every endpoint of the others. Repeating a key widens it (either
//! value), different keys narrow each other, as with `docker events`.

use std::time::SystemTime;

use super::{parse_time, Action, Event, EventType, TimeError};
use crate::model::Id;

/// The `--filter` keys, in the order the error lists them.
pub const FILTER_KEYS: [&str; 4] = ["type", "event", "network", "node"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("invalid filter {0:?}: use KEY=VALUE, e.g. type=network")]
    NotKeyValue(String),
    #[error("unknown filter key {0:?}: use one of type, event, network, node")]
    UnknownKey(String),
    #[error("invalid filter {key}={value:?}: use one of {allowed}")]
    BadValue {
        key: &'static str,
        value: String,
        allowed: String,
    },
    #[error("invalid --{which}: {source}")]
    Time {
        which: &'static str,
        source: TimeError,
    },
    #[error("unknown query parameter {0:?}: use since, until, type, event, network or node")]
    UnknownParameter(String),
    #[error("--until is before --since: nothing can match")]
    Empty,
}

/// A stream's selection: times in Unix nanoseconds, filters as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub types: Vec<EventType>,
    pub actions: Vec<Action>,
    /// Network names or IDs (or ID prefixes).
    pub networks: Vec<String>,
    /// Node names or IDs (or ID prefixes).
    pub nodes: Vec<String>,
}

impl EventFilter {
    /// Adds one `KEY=VALUE` filter (the CLI's `--filter` and the query's pairs alike).
    pub fn add(&mut self, key: &str, value: &str) -> Result<(), FilterError> {
        match key {
            "type" => self.types.push(
                EventType::ALL
                    .into_iter()
                    .find(|t| t.as_str() == value)
                    .ok_or_else(|| FilterError::BadValue {
                        key: "type",
                        value: value.to_string(),
                        allowed: names(EventType::ALL.map(EventType::as_str)),
                    })?,
            ),
            "event" => self.actions.push(
                Action::ALL
                    .into_iter()
                    .find(|a| a.as_str() == value)
                    .ok_or_else(|| FilterError::BadValue {
                        key: "event",
                        value: value.to_string(),
                        allowed: names(Action::ALL.map(Action::as_str)),
                    })?,
            ),
            "network" | "node" if value.is_empty() => {
                return Err(FilterError::BadValue {
                    key: if key == "node" { "node" } else { "network" },
                    value: String::new(),
                    allowed: "a name or an ID".into(),
                })
            }
            "network" => self.networks.push(value.to_string()),
            "node" => self.nodes.push(value.to_string()),
            other => return Err(FilterError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    /// Adds a `KEY=VALUE` argument.
    pub fn add_arg(&mut self, arg: &str) -> Result<(), FilterError> {
        let (k, v) = arg
            .split_once('=')
            .ok_or_else(|| FilterError::NotKeyValue(arg.to_string()))?;
        self.add(k.trim(), v.trim())
    }

    /// Reads `GET /v1/events`'s query (already split and decoded).
    pub fn from_query(pairs: &[(String, String)], now: SystemTime) -> Result<Self, FilterError> {
        let mut f = EventFilter::default();
        for (k, v) in pairs {
            match k.as_str() {
                "since" => {
                    f.since = Some(parse_time(v, now).map_err(|source| FilterError::Time {
                        which: "since",
                        source,
                    })?)
                }
                "until" => {
                    f.until = Some(parse_time(v, now).map_err(|source| FilterError::Time {
                        which: "until",
                        source,
                    })?)
                }
                k if FILTER_KEYS.contains(&k) => f.add(k, v)?,
                other => return Err(FilterError::UnknownParameter(other.to_string())),
            }
        }
        if let (Some(s), Some(u)) = (f.since, f.until) {
            if u < s {
                return Err(FilterError::Empty);
            }
        }
        Ok(f)
    }

    /// The query's pairs (to be percent-encoded) that [`EventFilter::from_query`] reads back.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs: Vec<(&'static str, String)> = Vec::new();
        if let Some(s) = self.since {
            pairs.push(("since", super::time::nanos_to_query(s)));
        }
        if let Some(u) = self.until {
            pairs.push(("until", super::time::nanos_to_query(u)));
        }
        pairs.extend(self.types.iter().map(|t| ("type", t.as_str().to_string())));
        pairs.extend(
            self.actions
                .iter()
                .map(|a| ("event", a.as_str().to_string())),
        );
        pairs.extend(self.networks.iter().map(|n| ("network", n.clone())));
        pairs.extend(self.nodes.iter().map(|n| ("node", n.clone())));
        pairs
    }

    /// Whether `e` passes the filters (times are the stream's to check).
    pub fn matches(&self, e: &Event) -> bool {
        (self.types.is_empty() || self.types.contains(&e.kind))
            && (self.actions.is_empty() || self.actions.contains(&e.action))
            && (self.networks.is_empty() || self.networks.iter().any(|n| on_network(e, n)))
            && (self.nodes.is_empty() || self.nodes.iter().any(|n| on_node(e, n)))
    }
}

fn names<const N: usize>(all: [&str; N]) -> String {
    all.join(", ")
}

/// `reference` names `id`: the whole ID, or a prefix of it, as Docker accepts.
fn id_matches(id: &str, reference: &str) -> bool {
    Id::looks_like_prefix(reference) && id.starts_with(reference)
}

/// A network's own events, and its endpoints'.
fn on_network(e: &Event, reference: &str) -> bool {
    let a = &e.actor.attributes;
    match e.kind {
        EventType::Network => {
            id_matches(&e.actor.id, reference) || a.name.as_deref() == Some(reference)
        }
        EventType::Endpoint => {
            a.network.as_deref() == Some(reference)
                || a.network_id
                    .as_ref()
                    .is_some_and(|id| id_matches(id.as_str(), reference))
        }
        EventType::Node | EventType::Record => false,
    }
}

/// A node's own events, its endpoints', and the networks it created.
fn on_node(e: &Event, reference: &str) -> bool {
    let a = &e.actor.attributes;
    match e.kind {
        EventType::Node => {
            id_matches(&e.actor.id, reference) || a.name.as_deref() == Some(reference)
        }
        EventType::Endpoint | EventType::Network => {
            a.host.as_deref() == Some(reference)
                || a.node_id
                    .as_ref()
                    .is_some_and(|id| id_matches(id.as_str(), reference))
        }
        EventType::Record => false,
    }
}

/// Splits a query string into decoded pairs (`+` is a space, `%XX` a byte). Repeated keys
/// are kept, in order.
pub fn decode_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Actor, Attributes};

    fn endpoint_event() -> Event {
        Event {
            kind: EventType::Endpoint,
            action: Action::Up,
            actor: Actor {
                id: "ee".repeat(32),
                attributes: Attributes {
                    name: Some("web".into()),
                    network: Some("blue".into()),
                    network_id: Some("ab".repeat(32).parse().unwrap()),
                    host: Some("vm3".into()),
                    node_id: Some("cd".repeat(32).parse().unwrap()),
                    ..Default::default()
                },
            },
            time: String::new(),
            time_nano: 0,
            revision: 1,
        }
    }

    #[test]
    fn filters_narrow_across_keys_and_widen_within_one() {
        let e = endpoint_event();
        let f = |args: &[&str]| {
            let mut f = EventFilter::default();
            for a in args {
                f.add_arg(a).unwrap();
            }
            f.matches(&e)
        };
        assert!(f(&[]));
        assert!(f(&["type=endpoint", "event=up"]));
        assert!(f(&["event=down", "event=up"]));
        assert!(!f(&["type=endpoint", "event=down"]));
        assert!(f(&["network=blue"]));
        assert!(f(&["network=abab"]));
        assert!(!f(&["network=red"]));
        assert!(f(&["node=vm3"]));
        assert!(f(&["node=cdcd", "network=blue"]));
        assert!(!f(&["node=vm2"]));
    }

    #[test]
    fn bad_filters_say_what_was_wrong() {
        let mut f = EventFilter::default();
        assert_eq!(
            f.add_arg("colour=red"),
            Err(FilterError::UnknownKey("colour".into()))
        );
        assert!(f
            .add_arg("type=container")
            .unwrap_err()
            .to_string()
            .contains("network, endpoint, node, record"));
        assert_eq!(
            f.add_arg("type"),
            Err(FilterError::NotKeyValue("type".into()))
        );
    }

    #[test]
    fn the_query_round_trips() {
        let mut f = EventFilter {
            since: Some(1_796_410_800_000_000_001),
            until: Some(1_796_410_900_000_000_000),
            ..Default::default()
        };
        for a in ["type=network", "event=rm", "network=a b&c=d", "node=vm3"] {
            f.add_arg(a).unwrap();
        }
        let pairs: Vec<(String, String)> = f
            .query_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let back = EventFilter::from_query(&pairs, SystemTime::now()).unwrap();
        assert_eq!(back, f);
        assert_eq!(
            decode_query("network=a%20b%26c%3Dd&node=vm+3&x"),
            vec![
                ("network".to_string(), "a b&c=d".to_string()),
                ("node".to_string(), "vm 3".to_string()),
                ("x".to_string(), String::new()),
            ]
        );
        assert_eq!(
            EventFilter::from_query(&decode_query("colour=red"), SystemTime::now()),
            Err(FilterError::UnknownParameter("colour".into()))
        );
    }
}
