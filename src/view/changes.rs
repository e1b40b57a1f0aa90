//! The cluster events the view derives from what it applies (see `crate::events`).
//!
//! Off by default: only the daemon's watcher turns recording on, so the view's users that
//! never stream events (unit tests, benches, the reconciler's scratch views) pay one
//! untaken branch per record. When on, a change costs its attribute strings; the IDs are
//! shared text (`model::Id`), and the pending list is swapped with the watcher's between
//! batches, so its buffer is reused rather than grown each time.

use crate::events::{Action, Actor, Attributes, Change, EventType};
use crate::model::{Endpoint, Network, Node, NodeId};
use crate::validate::RecordKind;

use super::ClusterView;

/// What the view held of a record before a put of it.
pub(super) enum Was {
    Absent,
    Different,
    Same,
}

impl Was {
    pub(super) fn of<T: PartialEq>(old: Option<&T>, new: &T) -> Was {
        match old {
            None => Was::Absent,
            Some(old) if old != new => Was::Different,
            Some(_) => Was::Same,
        }
    }

    /// The event a put is: `appeared` when new, `update` when changed, none when the same.
    fn action(self, appeared: Action) -> Option<Action> {
        match self {
            Was::Absent => Some(appeared),
            Was::Different => Some(Action::Update),
            Was::Same => None,
        }
    }
}

/// The changes applied since the watcher last took them.
#[derive(Debug, Default, Clone)]
pub(super) struct ChangeLog {
    on: bool,
    pending: Vec<Change>,
    /// Nodes deleted since the last take, by ID: a lease's expiry deletes a node and its
    /// endpoints in one revision, in no promised order, and each endpoint's `down` still
    /// names its host.
    departed: Vec<(NodeId, String)>,
}

impl ClusterView {
    /// Records a change for every record applied from now on (the daemon's watcher).
    pub fn record_changes(&mut self, on: bool) {
        self.changes.on = on;
    }

    pub(super) fn recording_changes(&self) -> bool {
        self.changes.on
    }

    /// Swaps the recorded changes into `out` (which should be empty; its buffer becomes
    /// the next batch's).
    pub fn take_changes(&mut self, out: &mut Vec<Change>) {
        out.clear();
        std::mem::swap(&mut self.changes.pending, out);
        self.changes.departed.clear();
    }

    fn note(
        &mut self,
        kind: EventType,
        action: Action,
        id: &str,
        attributes: Attributes,
        rev: i64,
    ) {
        self.changes.pending.push(Change {
            kind,
            action,
            actor: Actor {
                id: id.to_string(),
                attributes,
            },
            revision: rev,
        });
    }

    fn host_name(&self, node: &NodeId) -> Option<String> {
        self.nodes.get(node).map(|n| n.name.clone()).or_else(|| {
            self.changes
                .departed
                .iter()
                .find(|(id, _)| id == node)
                .map(|(_, name)| name.clone())
        })
    }

    fn network_attributes(&self, n: &Network) -> Attributes {
        Attributes {
            name: Some(n.name.clone()),
            subnet: Some(n.subnet),
            vni: Some(n.vni),
            host: self.host_name(&n.created_by),
            node_id: Some(n.created_by.clone()),
            ..Default::default()
        }
    }

    fn endpoint_attributes(&self, ep: &Endpoint) -> Attributes {
        Attributes {
            name: Some(ep.name.clone()),
            network: self
                .networks
                .get(&ep.network_id)
                .map(|n| n.network.name.clone()),
            network_id: Some(ep.network_id.clone()),
            ip: Some(ep.ip),
            host: self.host_name(&ep.node_id),
            node_id: Some(ep.node_id.clone()),
            ..Default::default()
        }
    }

    fn node_attributes(n: &Node) -> Attributes {
        Attributes {
            name: Some(n.name.clone()),
            address: Some(n.advertise_addr),
            ..Default::default()
        }
    }

    /// A network record admitted; `old` is the version the view held before.
    pub(super) fn network_put(&mut self, was: Was, new: &Network, rev: i64) {
        let Some(action) = was.action(Action::Create) else {
            return;
        };
        let attrs = self.network_attributes(new);
        self.note(EventType::Network, action, new.id.as_str(), attrs, rev);
    }

    pub(super) fn network_removed(&mut self, old: &Network, rev: i64) {
        let attrs = self.network_attributes(old);
        self.note(EventType::Network, Action::Rm, old.id.as_str(), attrs, rev);
    }

    pub(super) fn endpoint_put(&mut self, was: Was, new: &Endpoint, rev: i64) {
        let Some(action) = was.action(Action::Up) else {
            return;
        };
        let attrs = self.endpoint_attributes(new);
        self.note(EventType::Endpoint, action, new.id.as_str(), attrs, rev);
    }

    pub(super) fn endpoint_removed(&mut self, old: &Endpoint, rev: i64) {
        let attrs = self.endpoint_attributes(old);
        self.note(
            EventType::Endpoint,
            Action::Down,
            old.id.as_str(),
            attrs,
            rev,
        );
    }

    pub(super) fn node_put(&mut self, was: Was, new: &Node, rev: i64) {
        let Some(action) = was.action(Action::Join) else {
            return;
        };
        self.note(
            EventType::Node,
            action,
            new.id.as_str(),
            Self::node_attributes(new),
            rev,
        );
    }

    pub(super) fn node_removed(&mut self, old: &Node, rev: i64) {
        self.changes
            .departed
            .push((old.id.clone(), old.name.clone()));
        self.note(
            EventType::Node,
            Action::Leave,
            old.id.as_str(),
            Self::node_attributes(old),
            rev,
        );
    }

    pub(super) fn record_rejected(
        &mut self,
        key: &str,
        kind: RecordKind,
        reason: String,
        rev: i64,
    ) {
        let attrs = Attributes {
            kind: Some(kind.to_string()),
            reason: Some(reason),
            ..Default::default()
        };
        self.note(EventType::Record, Action::Rejected, key, attrs, rev);
    }

    /// What a re-list found changed since the view it replaces (`self`): the watch missed
    /// those changes (their revisions were compacted away), so they are told as the events
    /// they amount to, all at the listing's revision. Nodes before networks before
    /// endpoints on the way in, the reverse on the way out, as they would have happened.
    pub fn changes_to(&self, new: &ClusterView) -> Vec<Change> {
        let rev = new.revision;
        let mut out = ClusterView {
            nodes: self.nodes.clone(),
            changes: ChangeLog {
                on: true,
                ..Default::default()
            },
            ..Default::default()
        };
        // `out` is a scratch view that names hosts and networks as the old view knew them,
        // joined by the new view's.
        out.networks = self.networks.clone();
        for (net, eps) in &self.endpoints {
            for (id, ep) in eps {
                if new.endpoints.get(net).and_then(|e| e.get(id)).is_none() {
                    out.endpoint_removed(ep, rev);
                }
            }
        }
        for (id, old) in &self.networks {
            if !new.networks.contains_key(id) {
                out.network_removed(&old.network, rev);
            }
        }
        for (id, old) in &self.nodes {
            if !new.nodes.contains_key(id) {
                out.node_removed(old, rev);
            }
        }
        out.nodes = new.nodes.clone();
        out.networks = new.networks.clone();
        for (id, n) in &new.nodes {
            out.node_put(Was::of(self.nodes.get(id), n), n, rev);
        }
        for (id, n) in &new.networks {
            let old = self.networks.get(id).map(|o| &o.network);
            out.network_put(Was::of(old, &n.network), &n.network, rev);
        }
        for (net, eps) in &new.endpoints {
            for (id, ep) in eps {
                let old = self.endpoints.get(net).and_then(|e| e.get(id));
                out.endpoint_put(Was::of(old, ep), ep, rev);
            }
        }
        for (key, r) in &new.rejected {
            if !self.rejected.contains_key(key) {
                out.record_rejected(key, r.kind, r.reason.to_string(), r.mod_revision);
            }
        }
        out.changes.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Mac};
    use crate::store::{KeyValue, Keys, WatchEvent};
    use std::net::Ipv4Addr;

    fn kv(key: String, value: Vec<u8>, rev: i64) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: rev,
            mod_revision: rev,
            lease: 0,
        }
    }

    fn node(name: &str) -> Node {
        Node {
            id: Id::random(),
            name: name.into(),
            advertise_addr: "192.0.2.3".parse().unwrap(),
            advertise_port: None,
            started: String::new(),
            version: "0".into(),
        }
    }

    fn network(created_by: &Node) -> Network {
        Network {
            id: Id::random(),
            name: "blue".into(),
            driver: "overlay".into(),
            subnet: "10.0.4.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 4, 1),
            ip_range: None,
            vni: 4096,
            mtu: None,
            labels: Default::default(),
            internal: false,
            created: String::new(),
            created_by: created_by.id.clone(),
        }
    }

    fn endpoint(net: &Network, on: &Node) -> Endpoint {
        let ip = Ipv4Addr::new(10, 0, 4, 2);
        Endpoint {
            id: Id::random(),
            network_id: net.id.clone(),
            name: "web".into(),
            node_id: on.id.clone(),
            ip,
            mac: Mac::from_ipv4(ip),
            created: String::new(),
            aliases: Vec::new(),
        }
    }

    fn put(key: String, v: &impl serde::Serialize, rev: i64) -> WatchEvent {
        WatchEvent::Put(kv(key, serde_json::to_vec(v).unwrap(), rev))
    }

    fn summary(changes: &[Change]) -> Vec<(EventType, Action, Option<String>)> {
        changes
            .iter()
            .map(|c| (c.kind, c.action, c.actor.attributes.host.clone()))
            .collect()
    }

    #[test]
    fn applied_records_become_events_and_re_puts_of_the_same_record_do_not() {
        let keys = Keys::new("/t/");
        let vm3 = node("vm3");
        let net = network(&vm3);
        let ep = endpoint(&net, &vm3);
        let mut view = ClusterView::from_kvs(&keys, &[], 1);
        view.record_changes(true);
        view.apply(&keys, &put(keys.node(&vm3.id), &vm3, 2));
        view.apply(&keys, &put(keys.network(&net.id), &net, 3));
        view.apply(&keys, &put(keys.endpoint(&net.id, &ep.id), &ep, 4));
        view.apply(&keys, &put(keys.endpoint(&net.id, &ep.id), &ep, 5));
        view.apply(
            &keys,
            &WatchEvent::Put(kv(keys.network(&Id::random()), b"{oops".to_vec(), 6)),
        );
        // A lease's expiry: the node before its endpoint (the order etcd does not promise).
        view.apply(
            &keys,
            &WatchEvent::Delete {
                key: keys.node(&vm3.id),
                mod_revision: 7,
            },
        );
        view.apply(
            &keys,
            &WatchEvent::Delete {
                key: keys.endpoint(&net.id, &ep.id),
                mod_revision: 7,
            },
        );
        let mut got = Vec::new();
        view.take_changes(&mut got);
        let host = Some("vm3".to_string());
        assert_eq!(
            summary(&got),
            vec![
                (EventType::Node, Action::Join, None),
                (EventType::Network, Action::Create, host.clone()),
                (EventType::Endpoint, Action::Up, host.clone()),
                (EventType::Record, Action::Rejected, None),
                (EventType::Node, Action::Leave, None),
                (EventType::Endpoint, Action::Down, host.clone()),
            ]
        );
        let up = &got[2].actor.attributes;
        assert_eq!(up.network.as_deref(), Some("blue"));
        assert_eq!(up.ip, Some(ep.ip));
        assert_eq!(got[2].revision, 4);
        assert!(got[3].actor.attributes.reason.is_some());
        assert_eq!(got[5].actor.attributes.network.as_deref(), Some("blue"));
        // Taken: the next batch starts empty.
        view.take_changes(&mut got);
        assert!(got.is_empty());
    }

    #[test]
    fn a_view_that_does_not_record_keeps_nothing() {
        let keys = Keys::new("/t/");
        let vm3 = node("vm3");
        let mut view = ClusterView::from_kvs(&keys, &[], 1);
        view.apply(&keys, &put(keys.node(&vm3.id), &vm3, 2));
        let mut got = Vec::new();
        view.take_changes(&mut got);
        assert!(got.is_empty());
    }

    #[test]
    fn a_re_list_tells_what_it_found_changed() {
        let keys = Keys::new("/t/");
        let vm2 = node("vm2");
        let vm3 = node("vm3");
        let gone = network(&vm2);
        let mut kept = network(&vm3);
        kept.vni = 4097;
        kept.subnet = "10.0.5.0/24".parse().unwrap();
        kept.gateway = Ipv4Addr::new(10, 0, 5, 1);
        let ep = endpoint(&gone, &vm2);
        let old = ClusterView::from_kvs(
            &keys,
            &[
                kv(keys.node(&vm2.id), serde_json::to_vec(&vm2).unwrap(), 1),
                kv(
                    keys.network(&gone.id),
                    serde_json::to_vec(&gone).unwrap(),
                    1,
                ),
                kv(
                    keys.network(&kept.id),
                    serde_json::to_vec(&kept).unwrap(),
                    1,
                ),
                kv(
                    keys.endpoint(&gone.id, &ep.id),
                    serde_json::to_vec(&ep).unwrap(),
                    1,
                ),
            ],
            1,
        );
        let new = ClusterView::from_kvs(
            &keys,
            &[
                kv(keys.node(&vm3.id), serde_json::to_vec(&vm3).unwrap(), 9),
                kv(
                    keys.network(&kept.id),
                    serde_json::to_vec(&kept).unwrap(),
                    1,
                ),
            ],
            9,
        );
        assert_eq!(
            summary(&old.changes_to(&new)),
            vec![
                (EventType::Endpoint, Action::Down, Some("vm2".into())),
                (EventType::Network, Action::Rm, Some("vm2".into())),
                (EventType::Node, Action::Leave, None),
                (EventType::Node, Action::Join, None),
            ]
        );
    }
}
