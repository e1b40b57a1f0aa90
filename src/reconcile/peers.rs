//! Remote endpoints as FDB/neighbour entries: what one network's sandbox should hold, and
//! the plan (removals, then additions) that takes it there from what it holds. Pure, apart
//! from `apply_plan`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::dataplane::{self, Peer, Sandbox};
use crate::error::Error;
use crate::model::{Endpoint, NetworkId, NodeId};
use crate::view::{ClusterView, PeerChanges};

/// Remote endpoints of one network by overlay address: the kernel's own key for the
/// neighbour entry, and unique per network (IPAM).
pub type PeerMap = HashMap<Ipv4Addr, Peer>;

/// The FDB/neighbour entries `ep` needs on this host, if any: none for this host's own
/// endpoints, nor for one whose node is unknown (yet) or has no IPv4 VTEP.
fn peer_of(view: &ClusterView, me: &NodeId, ep: &Endpoint) -> Option<Peer> {
    if &ep.node_id == me {
        return None;
    }
    let IpAddr::V4(vtep) = view.nodes.get(&ep.node_id)?.advertise_addr else {
        return None;
    };
    Some(Peer {
        ip: ep.ip,
        mac: ep.mac,
        vtep,
    })
}

/// Every remote endpoint of `net`, from the whole view.
pub fn desired_peers(view: &ClusterView, me: &NodeId, net: &NetworkId) -> PeerMap {
    view.endpoints_of(net)
        .filter_map(|e| peer_of(view, me, e))
        .map(|p| (p.ip, p))
        .collect()
}

/// What to change in one sandbox: entries to remove, then entries to add (or replace).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    pub stale: Vec<Peer>,
    pub fresh: Vec<Peer>,
}

impl PeerPlan {
    pub fn is_empty(&self) -> bool {
        self.stale.is_empty() && self.fresh.is_empty()
    }

    /// `have` → `want`, address by address.
    pub fn diff(have: &PeerMap, want: &PeerMap) -> PeerPlan {
        let mut plan = PeerPlan::default();
        for (ip, old) in have {
            plan.step(Some(*old), want.get(ip).copied());
        }
        for (ip, new) in want {
            if !have.contains_key(ip) {
                plan.step(None, Some(*new));
            }
        }
        plan
    }

    fn step(&mut self, have: Option<Peer>, want: Option<Peer>) {
        if have == want {
            return;
        }
        if let Some(old) = have {
            // Same address and MAC at another VTEP (the container's host changed): the
            // add replaces both entries in place, so nothing is removed and no packet
            // finds the address missing meanwhile.
            if want.is_none_or(|new| new.mac != old.mac) {
                self.stale.push(old);
            }
        }
        if let Some(new) = want {
            self.fresh.push(new);
        }
    }

    /// Updates the record of what is programmed once the plan has been applied.
    pub fn record(&self, programmed: &mut PeerMap) {
        for p in &self.stale {
            if programmed.get(&p.ip) == Some(p) {
                programmed.remove(&p.ip);
            }
        }
        for p in &self.fresh {
            programmed.insert(p.ip, *p);
        }
    }
}

/// The plan that brings `programmed` (one network's) in line with the view: for the
/// addresses in `changes`, or for the whole network when `changes.all` is set.
pub fn plan_peers(
    view: &ClusterView,
    me: &NodeId,
    net: &NetworkId,
    programmed: &PeerMap,
    changes: &PeerChanges,
) -> PeerPlan {
    if changes.all {
        return PeerPlan::diff(programmed, &desired_peers(view, me, net));
    }
    let mut plan = PeerPlan::default();
    for ip in changes.addrs.get(net).into_iter().flatten() {
        let want = view
            .endpoint_at(net, *ip)
            .and_then(|e| peer_of(view, me, e));
        plan.step(programmed.get(ip).copied(), want);
    }
    plan
}

/// Removals first: an address whose MAC changed must lose its old entries before the new
/// ones go in (the removal checks what it deletes, but by MAC and address, not by owner).
pub(super) async fn apply_plan(sandbox: &Sandbox, plan: &PeerPlan) -> Result<(), Error> {
    if plan.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let applied = async {
        if !plan.stale.is_empty() {
            dataplane::remove_peers(sandbox, &plan.stale).await?;
        }
        if !plan.fresh.is_empty() {
            dataplane::add_peers(sandbox, &plan.fresh).await?;
        }
        Ok(())
    }
    .await;
    crate::metrics::peers_programmed(started.elapsed());
    applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Mac, Node};
    use crate::store::{KeyValue, Keys, WatchEvent};

    struct World {
        keys: Keys,
        view: ClusterView,
        net: NetworkId,
        nodes: Vec<NodeId>,
        me: NodeId,
        /// Endpoint IDs that exist, with their address.
        live: Vec<(Id, Ipv4Addr)>,
        seed: u64,
    }

    impl World {
        fn rand(&mut self, n: usize) -> usize {
            // A fixed LCG: the sequence (and so any failure) is the same on every run.
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.seed >> 33) as usize) % n
        }

        fn put(&mut self, key: String, value: Vec<u8>) {
            let kv = KeyValue {
                key,
                value,
                create_revision: 1,
                mod_revision: 1,
                lease: 0,
            };
            self.view.apply(&self.keys, &WatchEvent::Put(kv));
        }

        fn put_node(&mut self, id: &NodeId, vtep: Ipv4Addr) {
            let node = Node {
                id: id.clone(),
                name: "n".into(),
                advertise_addr: IpAddr::V4(vtep),
                advertise_port: None,
                started: String::new(),
                version: String::new(),
            };
            let key = self.keys.node(id);
            self.put(key, serde_json::to_vec(&node).unwrap());
        }

        fn put_endpoint(&mut self, id: &Id, ip: Ipv4Addr, node: &NodeId) {
            let ep = Endpoint {
                id: id.clone(),
                network_id: self.net.clone(),
                name: "e".into(),
                node_id: node.clone(),
                ip,
                mac: Mac::from_ipv4(ip),
                created: String::new(),
                aliases: Vec::new(),
            };
            let key = self.keys.endpoint(&self.net, id);
            self.put(key, serde_json::to_vec(&ep).unwrap());
        }

        fn delete(&mut self, key: String) {
            self.view.apply(
                &self.keys,
                &WatchEvent::Delete {
                    key,
                    mod_revision: 1,
                },
            );
        }

        fn free_ip(&mut self) -> Ipv4Addr {
            loop {
                let ip = Ipv4Addr::new(10, 0, 0, 2 + self.rand(60) as u8);
                if self.live.iter().all(|(_, l)| *l != ip) {
                    return ip;
                }
            }
        }

        /// One random change, as the watch would deliver it.
        fn step(&mut self) {
            let n = self.rand(self.nodes.len());
            let node = self.nodes[n].clone();
            match self.rand(10) {
                0..=3 if self.live.len() < 40 => {
                    let (id, ip) = (Id::random(), self.free_ip());
                    self.put_endpoint(&id, ip, &node);
                    self.live.push((id, ip));
                }
                0..=5 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let (id, _) = self.live.swap_remove(i);
                    let key = self.keys.endpoint(&self.net, &id);
                    self.delete(key);
                }
                // The endpoint's container moved to another host.
                6 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let (id, ip) = self.live[i].clone();
                    self.put_endpoint(&id, ip, &node);
                }
                // The endpoint was re-put with another address.
                7 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let ip = self.free_ip();
                    let id = self.live[i].0.clone();
                    self.put_endpoint(&id, ip, &node);
                    self.live[i].1 = ip;
                }
                // A host changed its VTEP, or went and came back.
                8 => {
                    let vtep = Ipv4Addr::new(192, 0, 2, 10 + self.rand(5) as u8);
                    self.put_node(&node, vtep);
                }
                9 => {
                    let key = self.keys.node(&node);
                    self.delete(key);
                }
                _ => {}
            }
        }
    }

    /// The incremental path (changed addresses only) must land where the full
    /// recomputation does, after every burst of adds, removes, moves, re-addressing and node
    /// changes.
    #[test]
    fn incremental_peer_sync_matches_full_recomputation() {
        let keys = Keys::new("/t/");
        let net = Id::random();
        let me = Id::random();
        let nodes = vec![me.clone(), Id::random(), Id::random(), Id::random()];
        let mut w = World {
            view: ClusterView::from_kvs(&keys, &[], 1),
            keys,
            net,
            nodes: nodes.clone(),
            me,
            live: Vec::new(),
            seed: 7,
        };
        for (i, n) in nodes.iter().enumerate() {
            w.put_node(n, Ipv4Addr::new(192, 0, 2, 10 + i as u8));
        }
        let mut programmed = PeerMap::new();
        let mut incremental_runs = 0;
        for round in 0..400 {
            let burst = 1 + w.rand(6);
            for _ in 0..burst {
                w.step();
            }
            let changes = w.view.take_peer_changes();
            incremental_runs += usize::from(!changes.all);
            let plan = plan_peers(&w.view, &w.me, &w.net, &programmed, &changes);
            // Applying the plan to a copy of the programmed set stands in for the kernel.
            plan.record(&mut programmed);
            let full = desired_peers(&w.view, &w.me, &w.net);
            assert_eq!(programmed, full, "round {round}");
        }
        assert!(
            incremental_runs > 100,
            "the incremental path was hardly exercised"
        );
    }

    #[test]
    fn a_move_to_another_host_replaces_without_removing() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let at = |vtep: [u8; 4]| Peer {
            ip,
            mac: Mac::from_ipv4(ip),
            vtep: Ipv4Addr::from(vtep),
        };
        let have = PeerMap::from([(ip, at([192, 0, 2, 1]))]);
        let want = PeerMap::from([(ip, at([192, 0, 2, 2]))]);
        let plan = PeerPlan::diff(&have, &want);
        assert_eq!(plan.stale, vec![]);
        assert_eq!(plan.fresh, vec![at([192, 0, 2, 2])]);
        let gone = PeerPlan::diff(&have, &PeerMap::new());
        assert_eq!(gone.stale, vec![at([192, 0, 2, 1])]);
    }
}
