//! The name server against hostile input: garbage, truncated and oversized packets, a flood
//! from one container, idle TCP connections; and forwarding of other names to the host's
//! resolver (the lab's, in the outside namespace). Each case prints a `HOSTILE|…` line once
//! its assertions held (docs/security.md's table, scripts/security-table).

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::dns::*;
use common::TestLab;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use vxnet::lab::hosts::OUTSIDE_RESOLVER;

/// A resolver for the lab's "outside": answers every A question with 203.0.113.80, over UDP
/// and TCP, on OUTSIDE_RESOLVER:53 in the outside namespace, until the test ends.
fn outside_resolver(lab: &TestLab) {
    let outside = lab.lab.outside().unwrap();
    let at = SocketAddr::from((OUTSIDE_RESOLVER, 53));
    let (udp, tcp) = outside
        .run(move || Ok((UdpSocket::bind(at)?, std::net::TcpListener::bind(at)?)))
        .expect("bind the outside resolver");
    let answer = |q: &[u8]| -> Option<Vec<u8>> {
        let q = Message::from_vec(q).ok()?;
        let mut r = Message::response(q.metadata.id, q.metadata.op_code);
        r.metadata.recursion_available = true;
        for question in &q.queries {
            r.add_query(question.clone());
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                question.name().clone(),
                60,
                RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(203, 0, 113, 80))),
            ));
        }
        r.to_vec().ok()
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            if let Some(a) = answer(&buf[..n]) {
                let _ = udp.send_to(&a, from);
            }
        }
    });
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in tcp.incoming().flatten() {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            if s.read_exact(&mut q).is_err() {
                continue;
            }
            if let Some(a) = answer(&q) {
                let mut out = (a.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&a);
                let _ = s.write_all(&out);
            }
        }
    });
}

fn daemon_rss_kb(lab: &TestLab, host: &str) -> u64 {
    let pid = lab
        .lab
        .host(host)
        .unwrap()
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .map(|p| p.pid)
        .expect("daemon process");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn info_dns(lab: &TestLab, host: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&lab.vx(host, &["info", "--format", "json"])).unwrap();
    info["dns"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_and_hostile_queries_stay_contained() {
    let lab = TestLab::up(3).await;
    outside_resolver(&lab);
    let web = lab.network("web", "10.0.32.0/24");
    let target = lab.container("vm3", "target", "web");
    lab.container("vm2", "bad", "web");
    lab.container("vm2", "good", "web");
    let bad = lab.container_ns("vm2", "bad");
    let good = lab.container_ns("vm2", "good");

    // Forwarded to the host's resolver (the lab's, in the outside namespace), UDP and TCP.
    let (ok, out) = getent(&lab, "vm2", "good", &["hosts", "www.example.test"]);
    assert!(ok && out.starts_with("203.0.113.80 "), "forwarded: {out}");
    let tcp = ask_tcp(&good, "www.example.test.", RecordType::A);
    assert_eq!(a_records(&tcp), vec![Ipv4Addr::new(203, 0, 113, 80)]);
    let dns = info_dns(&lab, "vm2");
    assert_eq!(
        dns["upstreams"][0],
        format!("{OUTSIDE_RESOLVER}:53"),
        "{dns}"
    );

    // Garbage with a whole header: FORMERR, to that query's ID.
    let mut garbage = vec![0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    garbage.extend(std::iter::repeat_n(0xffu8, 64));
    let m =
        Message::from_vec(&udp_exchange(&bad, garbage.clone(), Duration::from_secs(2)).unwrap())
            .unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0xbeef, ResponseCode::FormErr)
    );
    println!("HOSTILE|DNS: a malformed query (a header, then 64 bytes of 0xff)|FORMERR to that query's ID");
    // A truncated query.
    let q = query_bytes("target.", RecordType::A);
    let cut = Message::from_vec(
        &udp_exchange(&bad, q[..q.len() - 3].to_vec(), Duration::from_secs(2)).unwrap(),
    )
    .unwrap();
    assert_eq!(cut.metadata.response_code, ResponseCode::FormErr);
    println!("HOSTILE|DNS: a truncated query (cut inside its question)|FORMERR");
    // Runts, responses and an oversized datagram: no answer at all (no reflection).
    let mut response = garbage.clone();
    response[2] |= 0x80;
    for (what, packet) in [
        ("a 3-byte runt", vec![1, 2, 3]),
        ("a packet marked as a response", response),
        ("a 9,000-byte datagram", vec![0u8; 9000]),
    ] {
        let got = udp_exchange(&bad, packet, Duration::from_millis(500));
        if what.starts_with("a 9,000") {
            // Cut to the server's buffer: read as a malformed query or ignored, never answered
            // with more than a header's worth.
            if let Ok(b) = &got {
                assert!(b.len() <= 512, "{what}: {} bytes back", b.len());
            }
        } else {
            assert!(got.is_err(), "{what} was answered");
        }
        println!("HOSTILE|DNS: {what}|not answered (or FORMERR); the server goes on");
    }

    // A flood from one container: held to its rate; another container is answered throughout.
    let rss_before = daemon_rss_kb(&lab, "vm2");
    let flood = {
        let bad = lab.container_ns("vm2", "bad");
        std::thread::spawn(move || {
            bad.run(|| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(SERVER)?;
                s.set_nonblocking(true)?;
                let q = query_bytes("target.", RecordType::A);
                let t0 = Instant::now();
                let mut sent = 0u64;
                let mut buf = [0u8; 2048];
                while t0.elapsed() < Duration::from_secs(3) {
                    if s.send(&q).is_ok() {
                        sent += 1;
                    }
                    while s.recv(&mut buf).is_ok() {}
                }
                Ok(sent)
            })
        })
    };
    let mut answered = 0;
    for _ in 0..30 {
        let m = ask(&good, "target.web.", RecordType::A);
        if a_records(&m) == vec![ip(&target)] {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = flood.join().unwrap().unwrap();
    assert_eq!(
        answered, 30,
        "another container was not answered during the flood"
    );
    let dns = info_dns(&lab, "vm2");
    println!("flood: {sent} queries in 3 s; name server: {dns}");
    // Bounded work: what got through to the server is the rate, not the flood.
    let answered = dns["answered"].as_u64().unwrap();
    let limit = vxnet::dns::limit::PER_SOURCE_RATE as u64;
    assert!(
        answered < limit * 5 + 1000,
        "{answered} answered of {sent} sent: {dns}"
    );
    let table = lab.in_sandbox("vm2", &web, &["nft", "list", "table", "inet", "vxnet_dns"]);
    println!("{table}");
    assert!(table.contains("limit rate over 2000/second"), "{table}");
    // Many idle TCP connections: at most 64 are kept; UDP and new clients are still answered.
    let holders: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| {
            bad.run(|| std::net::TcpStream::connect_timeout(&SERVER, Duration::from_secs(1)))
                .ok()
        })
        .collect();
    assert_eq!(
        a_records(&ask(&good, "target.", RecordType::A)),
        vec![ip(&target)]
    );
    drop(holders);
    // The server sees them close (EOF) and frees their places.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        a_records(&ask_tcp(&good, "target.", RecordType::A)),
        vec![ip(&target)]
    );
    let rss_after = daemon_rss_kb(&lab, "vm2");
    println!("daemon RSS: {rss_before} kB before the flood, {rss_after} kB after");
    assert!(
        rss_after < rss_before + 20 * 1024,
        "the flood grew the daemon by {} kB",
        rss_after - rss_before
    );
    println!("HOSTILE|DNS: a flood of queries from one container ({sent} in 3 s) and 100 idle TCP connections|held to {limit}/s in the sandbox's nftables before the shared socket ({answered} answered); TCP capped at 64 connections per network; another container answered 30 of 30 times; daemon RSS +{} kB", rss_after.saturating_sub(rss_before));
}
