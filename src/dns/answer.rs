//! One query in, one decision out: an answer from the view, a forward, or nothing.
//!
//! Pure (no sockets, no clocks), so every hostile packet is a unit test. The wire format is
//! hickory-proto's; nothing here parses bytes by hand beyond reading the 2-byte ID and the
//! QR bit of a message hickory refused, to say FORMERR to the right query.

use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use crate::model::{Endpoint, NetworkId};
use crate::view::ClusterView;

/// What to do with one datagram or TCP message.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back.
    Answer(Vec<u8>),
    /// Not a name of the asker's networks: ask the host's resolvers. Carries the query's ID
    /// so that a failure can be answered SERVFAIL.
    Forward { id: u16 },
    /// Say nothing (a response, a runt, an unknown source): answering would help a reflection.
    Drop,
}

/// Payload size for UDP answers without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;
/// The largest UDP answer sent even when the client offers more (the DNS flag day 2020
/// figure: no IP fragmentation on common paths).
pub const MAX_UDP: usize = 1232;
/// A TCP message's largest size (its 2-byte length prefix).
pub const MAX_TCP: usize = u16::MAX as usize;

/// How the question reached us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Who asks: the endpoint the query came from (already checked to be a local one) and the
/// networks its container is on, which are the only ones whose names it may see.
pub struct Asker<'a> {
    pub endpoint: &'a Endpoint,
    pub scope: &'a [NetworkId],
}

/// Decides what to answer to `packet`. `turn` rotates the order of several addresses.
pub fn decide(
    view: &ClusterView,
    asker: &Asker<'_>,
    packet: &[u8],
    transport: Transport,
    turn: usize,
) -> Decision {
    let query = match Message::from_vec(packet) {
        Ok(q) => q,
        Err(_) => return malformed(packet),
    };
    if query.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    let id = query.metadata.id;
    if query.metadata.op_code != OpCode::Query {
        return error(&query, ResponseCode::NotImp);
    }
    let [question] = query.queries.as_slice() else {
        return error(&query, ResponseCode::FormErr);
    };
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        return Decision::Forward { id };
    }
    let qname = question.name();
    let name = qname.to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let found = match question.query_type() {
        RecordType::PTR => reverse(view, asker, qname),
        _ => forward_lookup(view, asker, name),
    };
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    if query.edns.is_some() {
        let mut ours = Edns::new();
        ours.set_max_payload(MAX_UDP as u16);
        reply.set_edns(ours);
    }
    match found {
        Found::NotOurs => return Decision::Forward { id },
        Found::NoSuchName => {
            reply.metadata.authoritative = true;
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        Found::Addresses(mut ips) => {
            reply.metadata.authoritative = true;
            if matches!(question.query_type(), RecordType::A | RecordType::ANY) {
                if !ips.is_empty() {
                    let k = turn % ips.len();
                    ips.rotate_left(k);
                }
                for ip in ips {
                    reply.add_answer(Record::from_rdata(qname.clone(), 0, RData::A(A(ip))));
                }
            }
            // AAAA and every other type: the name exists, with no data of that type
            // (NOERROR, empty) — until the overlay has IPv6.
        }
        Found::Pointer(target) => {
            reply.metadata.authoritative = true;
            reply.add_answer(Record::from_rdata(
                qname.clone(),
                0,
                RData::PTR(PTR(target)),
            ));
        }
    }
    let limit = match transport {
        Transport::Tcp => MAX_TCP,
        Transport::Udp => query.edns.as_ref().map_or(CLASSIC_UDP, |e| {
            (e.max_payload() as usize).clamp(CLASSIC_UDP, MAX_UDP)
        }),
    };
    encode(reply, limit)
}

/// What the view says about a name.
enum Found {
    /// Not a name of the asker's networks.
    NotOurs,
    /// In a zone we own (`<x>.<network>`, a reverse address in a subnet of the asker's
    /// networks) and absent.
    NoSuchName,
    Addresses(Vec<Ipv4Addr>),
    Pointer(Name),
}

fn forward_lookup(view: &ClusterView, asker: &Asker<'_>, name: &str) -> Found {
    let mut ips = Vec::new();
    for net in asker.scope {
        ips.extend(view.endpoints_named(net, name).map(|e| e.ip));
    }
    if ips.is_empty() {
        // `c3.my-net`: the name qualified by one of the asker's networks.
        if let Some((head, tail)) = name.rsplit_once('.') {
            let qualified = asker.scope.iter().find(|net| {
                view.networks
                    .get(*net)
                    .is_some_and(|n| n.network.name.eq_ignore_ascii_case(tail))
            });
            if let Some(net) = qualified {
                ips.extend(view.endpoints_named(net, head).map(|e| e.ip));
                if ips.is_empty() {
                    return Found::NoSuchName;
                }
            }
        }
    }
    if ips.is_empty() {
        return Found::NotOurs;
    }
    ips.sort_unstable();
    ips.dedup();
    Found::Addresses(ips)
}

fn reverse(view: &ClusterView, asker: &Asker<'_>, qname: &Name) -> Found {
    let Ok(net) = qname.parse_arpa_name() else {
        return Found::NotOurs;
    };
    let ipnet::IpNet::V4(v4) = net else {
        return Found::NotOurs;
    };
    if v4.prefix_len() != 32 {
        return Found::NotOurs;
    }
    let ip = v4.addr();
    let mut ours = false;
    for net in asker.scope {
        let Some(stored) = view.networks.get(net) else {
            continue;
        };
        if let Some(ep) = view.endpoint_at(net, ip) {
            let target = Name::from_ascii(format!("{}.{}.", ep.name, stored.network.name));
            if let Ok(target) = target {
                return Found::Pointer(target);
            }
        }
        ours |= stored.network.subnet.contains(&ip);
    }
    if ours {
        Found::NoSuchName
    } else {
        Found::NotOurs
    }
}

/// A message hickory could not read: FORMERR to a query whose header is whole, else nothing.
fn malformed(packet: &[u8]) -> Decision {
    let (Some(id), Some(flags)) = (packet.get(0..2), packet.get(2)) else {
        return Decision::Drop;
    };
    if packet.len() < 12 || flags & 0x80 != 0 {
        return Decision::Drop;
    }
    let id = u16::from_be_bytes([id[0], id[1]]);
    let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
    encode(reply, CLASSIC_UDP)
}

fn error(query: &Message, code: ResponseCode) -> Decision {
    let mut reply = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    encode(reply, CLASSIC_UDP)
}

/// An answer that does not fit goes out truncated (no records, TC set): the client asks
/// again over TCP.
fn encode(mut reply: Message, limit: usize) -> Decision {
    match reply.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Decision::Answer(bytes),
        Ok(_) => {
            reply.answers.clear();
            reply.metadata.truncation = true;
            reply.to_vec().map_or(Decision::Drop, Decision::Answer)
        }
        Err(_) => Decision::Drop,
    }
}

/// SERVFAIL for query `id` (the resolvers did not answer).
pub fn server_failure(id: u16) -> Vec<u8> {
    let mut reply = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
    reply.metadata.recursion_available = true;
    reply.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Mac, Network};
    use crate::store::{KeyValue, Keys};
    use hickory_proto::op::Query;

    struct Lab {
        view: ClusterView,
        n1: Network,
        n2: Network,
        asker: Endpoint,
    }

    fn network(name: &str, subnet: &str, vni: u32) -> Network {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        Network {
            id: Id::random(),
            name: name.into(),
            driver: "overlay".into(),
            subnet,
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            ip_range: None,
            vni,
            mtu: None,
            labels: Default::default(),
            internal: false,
            created: String::new(),
            created_by: Id::random(),
        }
    }

    fn endpoint(net: &Network, name: &str, ip: [u8; 4], aliases: &[&str]) -> Endpoint {
        let ip = Ipv4Addr::from(ip);
        Endpoint {
            id: Id::random(),
            network_id: net.id.clone(),
            name: name.into(),
            node_id: Id::random(),
            ip,
            mac: Mac::from_ipv4(ip),
            created: String::new(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn kv(key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    /// n1 (the asker's): c2 (asker), c3, two holders of alias "db"; n2 (not the asker's):
    /// secret, and a c3 of its own.
    fn lab() -> Lab {
        let keys = Keys::new("/t/");
        let n1 = network("n1", "10.0.4.0/24", 4096);
        let n2 = network("n2", "10.0.5.0/24", 4097);
        let asker = endpoint(&n1, "c2", [10, 0, 4, 2], &[]);
        let eps = [
            asker.clone(),
            endpoint(&n1, "c3", [10, 0, 4, 3], &[]),
            endpoint(&n1, "db1", [10, 0, 4, 4], &["db"]),
            endpoint(&n1, "db2", [10, 0, 4, 5], &["DB", "primary.db"]),
            endpoint(&n2, "secret", [10, 0, 5, 2], &[]),
            endpoint(&n2, "c3", [10, 0, 5, 3], &[]),
        ];
        let mut kvs = vec![
            kv(keys.network(&n1.id), serde_json::to_vec(&n1).unwrap()),
            kv(keys.network(&n2.id), serde_json::to_vec(&n2).unwrap()),
        ];
        for ep in &eps {
            kvs.push(kv(
                keys.endpoint(&ep.network_id, &ep.id),
                serde_json::to_vec(ep).unwrap(),
            ));
        }
        let view = ClusterView::from_kvs(&keys, &kvs, 2);
        assert!(view.rejected().is_empty(), "{:?}", view.rejected());
        Lab {
            view,
            n1,
            n2,
            asker,
        }
    }

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        q.to_vec().unwrap()
    }

    fn ask(lab: &Lab, scope: &[NetworkId], packet: &[u8], t: Transport, turn: usize) -> Decision {
        let asker = Asker {
            endpoint: &lab.asker,
            scope,
        };
        decide(&lab.view, &asker, packet, t, turn)
    }

    fn answer(d: Decision) -> Message {
        match d {
            Decision::Answer(bytes) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_of_the_askers_networks_answer_with_ttl_zero_in_any_case() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        for name in ["c3.", "C3.", "c3.n1.", "C3.N1."] {
            let m = answer(ask(
                &lab,
                &scope,
                &query(name, RecordType::A),
                Transport::Udp,
                0,
            ));
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(m.metadata.authoritative);
            assert_eq!(addresses(&m), vec![Ipv4Addr::new(10, 0, 4, 3)], "{name}");
            assert!(m.answers.iter().all(|r| r.ttl == 0));
        }
        // No IPv6 yet: the name exists, with no AAAA.
        let m = answer(ask(
            &lab,
            &scope,
            &query("c3.", RecordType::AAAA),
            Transport::Udp,
            0,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn an_alias_answers_with_every_holder_rotated_per_answer() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        let q = query("db.", RecordType::A);
        let first = addresses(&answer(ask(&lab, &scope, &q, Transport::Udp, 0)));
        let second = addresses(&answer(ask(&lab, &scope, &q, Transport::Udp, 1)));
        let (a, b) = (Ipv4Addr::new(10, 0, 4, 4), Ipv4Addr::new(10, 0, 4, 5));
        assert_eq!(first, vec![a, b]);
        assert_eq!(second, vec![b, a]);
        let dotted = answer(ask(
            &lab,
            &scope,
            &query("primary.db.", RecordType::A),
            Transport::Udp,
            0,
        ));
        assert_eq!(addresses(&dotted), vec![b]);
    }

    #[test]
    fn names_of_other_networks_are_never_answered() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        // Not ours for this asker: forwarded, where the host's resolvers know nothing of it.
        assert!(matches!(
            ask(
                &lab,
                &scope,
                &query("secret.", RecordType::A),
                Transport::Udp,
                0
            ),
            Decision::Forward { .. }
        ));
        assert!(matches!(
            ask(
                &lab,
                &scope,
                &query("secret.n2.", RecordType::A),
                Transport::Udp,
                0
            ),
            Decision::Forward { .. }
        ));
        // c3 exists in both networks: only n1's address.
        let m = answer(ask(
            &lab,
            &scope,
            &query("c3.", RecordType::A),
            Transport::Udp,
            0,
        ));
        assert_eq!(addresses(&m), vec![Ipv4Addr::new(10, 0, 4, 3)]);
        // n2's reverse is not ours either.
        assert!(matches!(
            ask(
                &lab,
                &scope,
                &query("2.5.0.10.in-addr.arpa.", RecordType::PTR),
                Transport::Udp,
                0
            ),
            Decision::Forward { .. }
        ));
        // A container on both sees both.
        let both = [lab.n1.id.clone(), lab.n2.id.clone()];
        let m = answer(ask(
            &lab,
            &both,
            &query("secret.", RecordType::A),
            Transport::Udp,
            0,
        ));
        assert_eq!(addresses(&m), vec![Ipv4Addr::new(10, 0, 5, 2)]);
    }

    #[test]
    fn a_missing_name_in_a_network_zone_is_nxdomain_and_others_are_forwarded() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        let m = answer(ask(
            &lab,
            &scope,
            &query("nobody.n1.", RecordType::A),
            Transport::Udp,
            0,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(
            ask(
                &lab,
                &scope,
                &query("example.org.", RecordType::A),
                Transport::Udp,
                0
            ),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn reverse_lookups_answer_name_dot_network() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        let m = answer(ask(
            &lab,
            &scope,
            &query("3.4.0.10.in-addr.arpa.", RecordType::PTR),
            Transport::Udp,
            0,
        ));
        let target = m.answers.iter().find_map(|r| match &r.data {
            RData::PTR(p) => Some(p.0.to_ascii()),
            _ => None,
        });
        assert_eq!(target.as_deref(), Some("c3.n1."));
        let m = answer(ask(
            &lab,
            &scope,
            &query("99.4.0.10.in-addr.arpa.", RecordType::PTR),
            Transport::Udp,
            0,
        ));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(
            ask(
                &lab,
                &scope,
                &query("8.8.8.8.in-addr.arpa.", RecordType::PTR),
                Transport::Udp,
                0
            ),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn hostile_packets_get_formerr_notimp_or_nothing() {
        let lab = lab();
        let scope = [lab.n1.id.clone()];
        let code = |d: Decision| answer(d).metadata.response_code;
        // Shorter than a header: nothing to answer to.
        assert_eq!(
            ask(&lab, &scope, &[0x12], Transport::Udp, 0),
            Decision::Drop
        );
        assert_eq!(ask(&lab, &scope, &[], Transport::Udp, 0), Decision::Drop);
        // A header and garbage.
        let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 40]);
        let m = answer(ask(&lab, &scope, &garbage, Transport::Udp, 0));
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(m.metadata.id, 0xabcd);
        // The same garbage marked as a response: never answered (no reflection loops).
        garbage[2] |= 0x80;
        assert_eq!(
            ask(&lab, &scope, &garbage, Transport::Udp, 0),
            Decision::Drop
        );
        // A truncated query: the header says one question, the bytes end inside its name.
        let q = query("c3.", RecordType::A);
        assert_eq!(
            code(ask(&lab, &scope, &q[..q.len() - 3], Transport::Udp, 0)),
            ResponseCode::FormErr
        );
        // A well-formed response to us: dropped.
        let mut resp = Message::from_vec(&q).unwrap();
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(
            ask(&lab, &scope, &resp.to_vec().unwrap(), Transport::Udp, 0),
            Decision::Drop
        );
        // Two questions, and none.
        let mut two = Message::from_vec(&q).unwrap();
        two.add_query(Query::query(
            Name::from_ascii("c2.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            code(ask(&lab, &scope, &two.to_vec().unwrap(), Transport::Udp, 0)),
            ResponseCode::FormErr
        );
        let mut none = Message::from_vec(&q).unwrap();
        none.queries.clear();
        assert_eq!(
            code(ask(
                &lab,
                &scope,
                &none.to_vec().unwrap(),
                Transport::Udp,
                0
            )),
            ResponseCode::FormErr
        );
        // An UPDATE.
        let mut update = Message::from_vec(&q).unwrap();
        update.metadata.op_code = OpCode::Update;
        assert_eq!(
            code(ask(
                &lab,
                &scope,
                &update.to_vec().unwrap(),
                Transport::Udp,
                0
            )),
            ResponseCode::NotImp
        );
        // Random datagrams never panic and never get more than a FORMERR.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            match ask(&lab, &scope, &bytes, Transport::Udp, 0) {
                Decision::Answer(b) => assert!(b.len() <= MAX_UDP),
                Decision::Forward { .. } | Decision::Drop => {}
            }
        }
    }

    #[test]
    fn an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() {
        let keys = Keys::new("/t/");
        let net = network("big", "10.1.0.0/16", 5000);
        let mut kvs = vec![kv(keys.network(&net.id), serde_json::to_vec(&net).unwrap())];
        let mut asker = None;
        for i in 0..200u32 {
            let ip = (u32::from(Ipv4Addr::new(10, 1, 0, 10)) + i).to_be_bytes();
            let ep = endpoint(&net, &format!("w{i}"), ip, &["web"]);
            asker.get_or_insert(ep.clone());
            kvs.push(kv(
                keys.endpoint(&net.id, &ep.id),
                serde_json::to_vec(&ep).unwrap(),
            ));
        }
        let view = ClusterView::from_kvs(&keys, &kvs, 2);
        let asker = asker.unwrap();
        let scope = [net.id.clone()];
        let who = Asker {
            endpoint: &asker,
            scope: &scope,
        };
        let q = query("web.", RecordType::A);
        let udp = answer(decide(&view, &who, &q, Transport::Udp, 0));
        assert!(udp.metadata.truncation);
        assert!(udp.answers.is_empty());
        let tcp = answer(decide(&view, &who, &q, Transport::Tcp, 0));
        assert!(!tcp.metadata.truncation);
        assert_eq!(tcp.answers.len(), 200);
    }
}
