//! DNS helpers for the name-server tests: queries from inside a container's namespace.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::{wait_until, TestLab};
use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, RecordType};
use vxnet::dns::LISTEN_ADDR;
use vxnet::netns::NetNs;

pub const SERVER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(LISTEN_ADDR, 53));

pub fn query_bytes(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).unwrap(),
        qtype,
    ));
    q.to_vec().unwrap()
}

/// Sends `packet` from inside `ns` and waits up to `wait` for one answer.
pub fn udp_exchange(ns: &NetNs, packet: Vec<u8>, wait: Duration) -> std::io::Result<Vec<u8>> {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(SERVER)?;
        s.set_read_timeout(Some(wait))?;
        s.send(&packet)?;
        let mut buf = vec![0u8; 65535];
        let n = s.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })
}

/// One question over UDP, asked as a stub resolver does: again after 2 s without an answer
/// (three tries; UDP may drop a datagram on a loaded machine).
pub fn ask(ns: &NetNs, name: &str, qtype: RecordType) -> Message {
    let mut last = None;
    for _ in 0..3 {
        match udp_exchange(ns, query_bytes(name, qtype), Duration::from_secs(2)) {
            Ok(bytes) => return Message::from_vec(&bytes).unwrap(),
            Err(e) => last = Some(e),
        }
    }
    panic!("no answer for {name} {qtype} in three tries: {last:?}")
}

pub fn ask_tcp(ns: &NetNs, name: &str, qtype: RecordType) -> Message {
    use std::io::{Read, Write};
    let q = query_bytes(name, qtype);
    let bytes = ns
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&SERVER, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut out = (q.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&q);
            s.write_all(&out)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut answer)?;
            Ok(answer)
        })
        .unwrap_or_else(|e| panic!("no TCP answer for {name}: {e}"));
    Message::from_vec(&bytes).unwrap()
}

pub fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// `getent ARGS` in container `name` on `host`: (success, stdout).
pub fn getent(lab: &TestLab, host: &str, name: &str, args: &[&str]) -> (bool, String) {
    let mut argv = vec!["vxnet", "exec", name, "--", "getent"];
    argv.extend_from_slice(args);
    let out = lab.sh(host, &argv);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Polls `f` every 50 ms for up to `limit` (a bound against hangs, not a timing assertion).
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn internal_network(lab: &TestLab, name: &str, subnet: &str) {
    let id = lab
        .vx(
            "vm2",
            &["network", "create", "--internal", "--subnet", subnet, name],
        )
        .trim()
        .to_string();
    for h in ["vm2", "vm3"] {
        wait_until(|| {
            lab.vx(h, &["network", "ls", "-q", "--no-trunc"])
                .contains(&id)
        });
    }
}
