//! Every network's endpoints by DNS name (their name and their aliases), for the name server.
//!
//! Kept beside the view's other indexes and updated with them, so a name resolves as soon as
//! the watch brings its endpoint and stops when the endpoint goes: no store traffic, no cache.
//! Names are matched without regard to ASCII case (DNS's rule). The index holds a hash of each
//! lowercased name, not the name: at tens of thousands of endpoints a second copy of every
//! name would cost more than the index itself. A lookup checks each candidate's own name, so
//! two names with one hash never answer for each other.

use std::collections::hash_map::{Entry, HashMap, RandomState};
use std::hash::{BuildHasher, Hasher};

use crate::model::{Endpoint, EndpointId, NetworkId};

/// The endpoints answering to one name hash in one network: nearly always one.
#[derive(Debug, Clone)]
enum Holders {
    One(EndpointId),
    Many(Vec<EndpointId>),
}

impl Holders {
    fn as_slice(&self) -> &[EndpointId] {
        match self {
            Holders::One(id) => std::slice::from_ref(id),
            Holders::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct NameIndex {
    /// Keyed per index (not per process) so that names written by whoever reaches the store
    /// cannot be chosen to collide on every host.
    hasher: RandomState,
    by_name: HashMap<NetworkId, HashMap<u64, Holders>>,
}

/// The names an endpoint answers to: its own and its aliases.
fn names_of(ep: &Endpoint) -> impl Iterator<Item = &str> {
    std::iter::once(ep.name.as_str()).chain(ep.aliases.iter().map(String::as_str))
}

/// Whether `ep` answers to `name` (ASCII case-insensitive).
pub fn answers_to(ep: &Endpoint, name: &str) -> bool {
    names_of(ep).any(|n| n.eq_ignore_ascii_case(name))
}

impl NameIndex {
    fn hash(&self, name: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        for b in name.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
        // The terminator keeps "ab"+"c" apart from "a"+"bc" were names ever hashed in parts.
        h.write_u8(0xff);
        h.finish()
    }

    /// Adds `ep`'s names (call after the endpoint is in the view).
    pub fn insert(&mut self, net: &NetworkId, ep: &Endpoint) {
        let mut hashes: Vec<u64> = names_of(ep).map(|n| self.hash(n)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        let names = match self.by_name.get_mut(net) {
            Some(names) => names,
            None => self.by_name.entry(net.clone()).or_default(),
        };
        for h in hashes {
            match names.entry(h) {
                Entry::Vacant(v) => {
                    v.insert(Holders::One(ep.id.clone()));
                }
                Entry::Occupied(mut o) => {
                    let holders = o.get_mut();
                    if holders.as_slice().contains(&ep.id) {
                        continue;
                    }
                    match holders {
                        Holders::One(first) => {
                            *holders = Holders::Many(vec![first.clone(), ep.id.clone()]);
                        }
                        Holders::Many(ids) => ids.push(ep.id.clone()),
                    }
                }
            }
        }
    }

    /// Drops `ep`'s names (the version of the endpoint that was indexed).
    pub fn remove(&mut self, net: &NetworkId, ep: &Endpoint) {
        let hashes: Vec<u64> = names_of(ep).map(|n| self.hash(n)).collect();
        let Some(names) = self.by_name.get_mut(net) else {
            return;
        };
        for h in hashes {
            let Entry::Occupied(mut o) = names.entry(h) else {
                continue;
            };
            let empty = match o.get_mut() {
                Holders::One(id) => id == &ep.id,
                Holders::Many(ids) => {
                    ids.retain(|id| id != &ep.id);
                    if ids.len() == 1 {
                        let last = ids[0].clone();
                        *o.get_mut() = Holders::One(last);
                    }
                    false
                }
            };
            if empty {
                o.remove();
            }
        }
        if names.is_empty() {
            self.by_name.remove(net);
        }
    }

    /// The IDs of the endpoints of `net` that may answer to `name` (check with
    /// [`answers_to`]), in the order they were added.
    pub fn candidates(&self, net: &NetworkId, name: &str) -> &[EndpointId] {
        self.by_name
            .get(net)
            .and_then(|names| names.get(&self.hash(name)))
            .map_or(&[], Holders::as_slice)
    }

    /// How many distinct (network, name) entries the index holds.
    pub fn entries(&self) -> usize {
        self.by_name.values().map(HashMap::len).sum()
    }
}
