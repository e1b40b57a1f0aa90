//! The nf_tables netlink backend: rules built with libnftnl (`nftnl`), sent as one batch
//! (one transaction) on a libmnl socket (`mnl`) opened in the calling thread's namespace.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::time::Duration;

use std::net::Ipv4Addr;

use nftnl::expr::{
    Bitwise, Cmp, CmpOp, Conntrack, ConntrackStatus, Counter, Expression, Immediate,
    Ipv4HeaderField, Lookup, Masquerade, Meta, Nat, NatType, NetworkHeaderField, Payload, Register,
    States, TcpHeaderField, TransportHeaderField, UdpHeaderField, Verdict,
};
use nftnl::nftnl_sys as sys;
use nftnl::set::Set;
use nftnl::{Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule};
use nftnl::{NlMsg, Table};

use super::{
    DnsGuard, Firewall, FirewallError, PortMapping, Proto, Ruleset, DNS_TABLE, DOCKER_BRIDGE,
    TABLE, VTEP_SET,
};

/// nftables' named priorities (`nft` prints these names back).
const PRIO_DSTNAT: i32 = -100;
const PRIO_FILTER: i32 = 0;
const PRIO_SRCNAT: i32 = 100;

// From linux/netfilter/nf_tables.h and linux/rtnetlink.h (not in the libc crate).
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
const RTN_LOCAL: u32 = 2;

/// How long to wait for the kernel's acknowledgements (it answers in microseconds; this is
/// only so that a lost answer is an error, not a hang).
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The nf_tables netlink backend. Acts on the calling thread's network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct Nftables;

impl Nftables {
    /// The whole `inet vxnet` table for `ruleset` as one replace: what `apply` sends, and
    /// what `readback::desired_shape` reads the wanted table from.
    fn messages(ruleset: &Ruleset) -> Result<Messages, FirewallError> {
        ruleset.validate()?;
        let name = table_name();
        let table = Table::new(&name, ProtoFamily::Inet);
        let mut b = Messages::new();
        replace_table(&mut b, &table, TABLE);

        let bridge = ifname(&ruleset.bridge);

        let mut post = Chain::new(c"postrouting", &table);
        post.set_type(ChainType::Nat);
        post.set_hook(Hook::PostRouting, PRIO_SRCNAT);
        post.set_policy(Policy::Accept);
        b.add(&post, MsgType::Add, "add chain postrouting (nat)");
        // ip saddr <subnet> oifname != "<bridge>" masquerade
        let mut r = Rule::new(&post);
        match_ipv4(&mut r);
        r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
            Ipv4HeaderField::Saddr,
        )));
        let prefix = ruleset.subnet.prefix_len();
        if prefix < 32 {
            let mask = ruleset.subnet.netmask().octets();
            r.add_expr(&Bitwise::new(&mask[..], &[0u8; 4][..]));
        }
        let net = ruleset.subnet.network().octets();
        r.add_expr(&Cmp::new(CmpOp::Eq, &net[..]));
        r.add_expr(&Meta::OifName);
        r.add_expr(&Cmp::new(CmpOp::Neq, &bridge[..]));
        r.add_expr(&Masquerade);
        b.add(
            &r,
            MsgType::Add,
            "add the masquerade rule in chain postrouting",
        );

        let ports = ruleset.sorted_ports();
        for (chain_name, hook) in [(c"prerouting", Hook::PreRouting), (c"output", Hook::Out)] {
            let mut chain = Chain::new(chain_name, &table);
            chain.set_type(ChainType::Nat);
            chain.set_hook(hook, PRIO_DSTNAT);
            chain.set_policy(Policy::Accept);
            let label = chain_name.to_string_lossy();
            b.add(&chain, MsgType::Add, format!("add chain {label} (nat)"));
            // The host's own connections to 127.0.0.0/8 stay local: DNAT'd to a container they
            // would be dropped as martians (Docker excludes loopback the same way).
            let from_host = hook == Hook::Out;
            for p in &ports {
                let r = dnat_rule(&chain, p, from_host);
                b.add(&r, MsgType::Add, format!("add rule {p} in chain {label}"));
            }
        }

        let mut fwd = Chain::new(c"forward", &table);
        fwd.set_type(ChainType::Filter);
        fwd.set_hook(Hook::Forward, PRIO_FILTER);
        fwd.set_policy(Policy::Accept);
        b.add(&fwd, MsgType::Add, "add chain forward (filter)");
        // iifname "<bridge>" oifname "<bridge>" drop
        let mut r = Rule::new(&fwd);
        r.add_expr(&Meta::IifName);
        r.add_expr(&Cmp::new(CmpOp::Eq, &bridge[..]));
        r.add_expr(&Meta::OifName);
        r.add_expr(&Cmp::new(CmpOp::Eq, &bridge[..]));
        r.add_expr(&Verdict::Drop);
        b.add(
            &r,
            MsgType::Add,
            "add the bridge isolation rule in chain forward",
        );
        // A vxnet host routes no VXLAN and no store traffic for anyone: a container that could
        // would inject frames into any overlay with this host's (trusted) VTEP address.
        let r = vxlan_rule(&fwd, ruleset.vxlan_port, None);
        b.add(&r, MsgType::Add, "add the VXLAN drop rule in chain forward");
        for (addr, port) in store_ports(ruleset) {
            let r = store_rule(&fwd, None, addr, port);
            b.add(
                &r,
                MsgType::Add,
                format!("add the store drop rule for {addr}:{port} in chain forward"),
            );
        }
        // Into the bridge only replies and published ports (DNATed): a route to the gateway
        // subnet via this host must not reach a container's unpublished ports.
        let est = (States::ESTABLISHED | States::RELATED).bits();
        let r = into_bridge_if_ct(&fwd, &bridge, Conntrack::State, est);
        b.add(
            &r,
            MsgType::Add,
            "add the established rule in chain forward",
        );
        let dnat = ConntrackStatus::DST_NAT.bits();
        let r = into_bridge_if_ct(&fwd, &bridge, Conntrack::Status, dnat);
        b.add(
            &r,
            MsgType::Add,
            "add the published-ports rule in chain forward",
        );
        let mut r = Rule::new(&fwd);
        r.add_expr(&Meta::OifName);
        r.add_expr(&Cmp::new(CmpOp::Eq, &bridge[..]));
        r.add_expr(&Verdict::Drop);
        b.add(
            &r,
            MsgType::Add,
            "add the bridge ingress drop rule in chain forward",
        );

        let mut vteps = Set::<Ipv4Addr>::new_named(c"vteps", 1, &table, ProtoFamily::Inet);
        let mut sorted = ruleset.vteps.clone();
        sorted.sort();
        sorted.dedup();
        for v in &sorted {
            vteps.add(v);
        }
        b.add(&vteps, MsgType::Add, format!("add set {VTEP_SET}"));
        for elems in vteps.elems_iter() {
            b.add(
                &elems,
                MsgType::Add,
                format!("add the elements of set {VTEP_SET}"),
            );
        }

        let mut input = Chain::new(c"input", &table);
        input.set_type(ChainType::Filter);
        input.set_hook(Hook::In, PRIO_FILTER);
        input.set_policy(Policy::Accept);
        b.add(&input, MsgType::Add, "add chain input (filter)");
        // udp dport 4789 ip saddr != @vteps counter drop
        let mut r = Rule::new(&input);
        match_ipv4(&mut r);
        match_dport(&mut r, Proto::Udp, ruleset.vxlan_port);
        r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
            Ipv4HeaderField::Saddr,
        )));
        r.add_expr(&LookupNot::new(&vteps));
        r.add_expr(&Counter);
        r.add_expr(&Verdict::Drop);
        b.add(&r, MsgType::Add, "add the VTEP filter rule in chain input");
        // Nor this host's own VXLAN socket or store member, from a container.
        for from in [ruleset.bridge.as_str(), DOCKER_BRIDGE] {
            let from = ifname(from);
            let r = vxlan_rule(&input, ruleset.vxlan_port, Some(&from));
            b.add(&r, MsgType::Add, "add the VXLAN drop rule in chain input");
            for (addr, port) in store_ports(ruleset) {
                let r = store_rule(&input, Some(&from), addr, port);
                b.add(
                    &r,
                    MsgType::Add,
                    format!("add the store drop rule for {addr}:{port} in chain input"),
                );
            }
            // Nor vxnet's own services (metrics: no authentication), on any address here.
            for port in &ruleset.host_services {
                let mut r = Rule::new(&input);
                r.add_expr(&Meta::IifName);
                r.add_expr(&Cmp::new(CmpOp::Eq, &from[..]));
                match_dport(&mut r, Proto::Tcp, *port);
                r.add_expr(&Verdict::Drop);
                b.add(
                    &r,
                    MsgType::Add,
                    format!("add the host service drop rule for port {port} in chain input"),
                );
            }
        }
        // Nor those of the other member hosts, through this one (after the set it names).
        for port in &ruleset.host_services {
            let mut r = Rule::new(&fwd);
            match_ipv4(&mut r);
            r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
                Ipv4HeaderField::Daddr,
            )));
            r.add_expr(&Lookup::new(&vteps));
            match_dport(&mut r, Proto::Tcp, *port);
            r.add_expr(&Verdict::Drop);
            b.add(
                &r,
                MsgType::Add,
                format!("add the member service drop rule for port {port} in chain forward"),
            );
        }

        Ok(b)
    }
}

impl Firewall for Nftables {
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError> {
        Self::messages(ruleset)?.send()
    }

    fn guard_dns(&self, guard: &DnsGuard) -> Result<(), FirewallError> {
        let name = CString::new(DNS_TABLE).unwrap_or_default();
        let table = Table::new(&name, ProtoFamily::Inet);
        let mut b = Messages::new();
        replace_table(&mut b, &table, DNS_TABLE);
        // set askers { type ipv4_addr; size N; flags dynamic,timeout; timeout 60s }
        let askers = Set::<Ipv4Addr>::new_named(c"askers", 1, &table, ProtoFamily::Inet);
        // SAFETY: the set is live; these setters copy integers into it.
        unsafe {
            let s = askers.as_ptr().as_ptr();
            sys::nftnl_set_set_u32(
                s,
                sys::NFTNL_SET_FLAGS as u16,
                (libc::NFT_SET_EVAL | libc::NFT_SET_TIMEOUT) as u32,
            );
            sys::nftnl_set_set_u64(s, sys::NFTNL_SET_TIMEOUT as u16, ASKER_TIMEOUT_MS);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, guard.sources);
        }
        b.add(&askers, MsgType::Add, "add set askers");
        let mut input = Chain::new(c"input", &table);
        input.set_type(ChainType::Filter);
        input.set_hook(Hook::In, PRIO_FILTER);
        input.set_policy(Policy::Accept);
        b.add(&input, MsgType::Add, "add chain input (filter)");
        // ip daddr L udp dport 53 update @askers { ip saddr limit rate over R/second } drop
        let mut r = Rule::new(&input);
        match_ipv4(&mut r);
        r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
            Ipv4HeaderField::Daddr,
        )));
        r.add_expr(&Cmp::new(CmpOp::Eq, &guard.listen.octets()[..]));
        match_dport(&mut r, Proto::Udp, guard.port);
        r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
            Ipv4HeaderField::Saddr,
        )));
        r.add_expr(&UpdateWithLimit {
            set_name: askers.get_name().to_owned(),
            set_id: askers.get_id(),
            rate: u64::from(guard.rate),
            burst: guard.rate,
        });
        r.add_expr(&Counter);
        r.add_expr(&Verdict::Drop);
        b.add(&r, MsgType::Add, "add the per-source query limit rule");
        b.send()
    }

    fn remove(&self) -> Result<(), FirewallError> {
        let table = Table::new(table_name(), ProtoFamily::Inet);
        let mut b = Messages::new();
        // Adding first makes the delete succeed whether or not the table was there.
        b.add(&table, MsgType::Add, "add table inet vxnet (if missing)");
        b.add(&table, MsgType::Del, "delete table inet vxnet");
        b.send()
    }
}

/// The batch `apply` sends for `ruleset`, finalized but not sent (read back by
/// `readback::desired_shape`).
pub(super) fn build(ruleset: &Ruleset) -> Result<FinalizedBatch, FirewallError> {
    Ok(Nftables::messages(ruleset)?.batch.finalize())
}

/// Makes sure the table exists so that the delete cannot fail, deletes it (and with it every
/// chain, set and rule in it), then adds it anew for the rest of the batch: one transaction,
/// so packets see either the old table or the new one.
fn replace_table(b: &mut Messages, table: &Table, name: &str) {
    b.add(
        table,
        MsgType::Add,
        format!("add table inet {name} (if missing)"),
    );
    b.add(table, MsgType::Del, format!("delete table inet {name}"));
    b.add(table, MsgType::Add, format!("add table inet {name}"));
}

fn table_name() -> CString {
    // TABLE is a constant without NUL bytes.
    CString::new(TABLE).unwrap_or_default()
}

/// An interface name as nft compares it: the name, NUL-padded to IFNAMSIZ (16) bytes.
/// The ruleset was validated: at most 15 bytes.
fn ifname(name: &str) -> [u8; 16] {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

/// `meta nfproto ipv4`: an IPv4 header follows (the table is `inet`).
fn match_ipv4(r: &mut Rule<'_>) {
    r.add_expr(&Meta::NfProto);
    r.add_expr(&Cmp::new(CmpOp::Eq, libc::NFPROTO_IPV4 as u8));
}

/// `[ip daddr != 127.0.0.0/8] fib daddr type local <proto> dport <host_port> dnat ip to <ip>:<port>`.
fn dnat_rule<'a>(chain: &'a Chain<'_>, p: &PortMapping, skip_loopback: bool) -> Rule<'a> {
    let mut r = Rule::new(chain);
    if skip_loopback {
        match_ipv4(&mut r);
        r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
            Ipv4HeaderField::Daddr,
        )));
        r.add_expr(&Bitwise::new(&[255u8, 0, 0, 0][..], &[0u8; 4][..]));
        r.add_expr(&Cmp::new(CmpOp::Neq, &[127u8, 0, 0, 0][..]));
    }
    r.add_expr(&FibDaddrType);
    r.add_expr(&Cmp::new(CmpOp::Eq, RTN_LOCAL));
    match_dport(&mut r, p.proto, p.host_port);
    r.add_expr(&Immediate::new(p.container_ip.octets(), Register::Reg1));
    r.add_expr(&Immediate::new(
        p.container_port.to_be_bytes(),
        Register::Reg2,
    ));
    r.add_expr(&Nat {
        nat_type: NatType::DNat,
        family: ProtoFamily::Ipv4,
        ip_register: Register::Reg1,
        port_register: Some(Register::Reg2),
    });
    r
}

/// Each store member's client port and, after it, its peer port (etcd's convention:
/// 2379/2380).
fn store_ports(ruleset: &Ruleset) -> Vec<(Ipv4Addr, u16)> {
    let mut out = Vec::new();
    for s in &ruleset.store {
        out.push((*s.ip(), s.port()));
        if let Some(peer) = s.port().checked_add(1) {
            out.push((*s.ip(), peer));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `oifname <bridge> ct <state|status> & <bits> != 0 accept`.
fn into_bridge_if_ct<'a>(
    chain: &'a Chain<'_>,
    bridge: &[u8; 16],
    key: Conntrack,
    bits: u32,
) -> Rule<'a> {
    let mut r = Rule::new(chain);
    r.add_expr(&Meta::OifName);
    r.add_expr(&Cmp::new(CmpOp::Eq, &bridge[..]));
    r.add_expr(&key);
    r.add_expr(&Bitwise::new(bits, 0u32));
    r.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
    r.add_expr(&Verdict::Accept);
    r
}

/// `meta l4proto <proto> <proto> dport <port>`.
fn match_dport(r: &mut Rule<'_>, proto: Proto, port: u16) {
    let (l4, dport) = match proto {
        Proto::Tcp => (
            libc::IPPROTO_TCP as u8,
            TransportHeaderField::Tcp(TcpHeaderField::Dport),
        ),
        Proto::Udp => (
            libc::IPPROTO_UDP as u8,
            TransportHeaderField::Udp(UdpHeaderField::Dport),
        ),
    };
    r.add_expr(&Meta::L4Proto);
    r.add_expr(&Cmp::new(CmpOp::Eq, l4));
    r.add_expr(&Payload::Transport(dport));
    r.add_expr(&Cmp::new(CmpOp::Eq, &port.to_be_bytes()[..]));
}

/// `[iifname <from>] udp dport <port> drop`.
fn vxlan_rule<'a>(chain: &'a Chain<'_>, port: u16, from: Option<&[u8; 16]>) -> Rule<'a> {
    let mut r = Rule::new(chain);
    if let Some(from) = from {
        r.add_expr(&Meta::IifName);
        r.add_expr(&Cmp::new(CmpOp::Eq, &from[..]));
    }
    match_dport(&mut r, Proto::Udp, port);
    r.add_expr(&Verdict::Drop);
    r
}

/// `[iifname <from>] ip daddr <addr> tcp dport <port> drop`.
fn store_rule<'a>(
    chain: &'a Chain<'_>,
    from: Option<&[u8; 16]>,
    addr: Ipv4Addr,
    port: u16,
) -> Rule<'a> {
    let mut r = Rule::new(chain);
    if let Some(from) = from {
        r.add_expr(&Meta::IifName);
        r.add_expr(&Cmp::new(CmpOp::Eq, &from[..]));
    }
    match_ipv4(&mut r);
    r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(
        Ipv4HeaderField::Daddr,
    )));
    r.add_expr(&Cmp::new(CmpOp::Eq, &addr.octets()[..]));
    match_dport(&mut r, Proto::Tcp, port);
    r.add_expr(&Verdict::Drop);
    r
}

/// `!= @set`: nftnl's `Lookup` cannot invert (its flag is commented out), this one does.
struct LookupNot {
    set_name: CString,
    set_id: u32,
}

impl LookupNot {
    fn new<K>(set: &Set<'_, K>) -> Self {
        LookupNot {
            set_name: set.get_name().to_owned(),
            set_id: set.get_id(),
        }
    }
}

impl Expression for LookupNot {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: as for FibDaddrType; the set name is a live NUL-terminated string that
        // libnftnl copies.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"lookup".as_ptr())) else {
                std::process::abort();
            };
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(
                e,
                sys::NFTNL_EXPR_LOOKUP_SREG as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_str(e, sys::NFTNL_EXPR_LOOKUP_SET as u16, self.set_name.as_ptr());
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, self.set_id);
            sys::nftnl_expr_set_u32(
                e,
                sys::NFTNL_EXPR_LOOKUP_FLAGS as u16,
                libc::NFT_LOOKUP_F_INV as u32,
            );
            expr
        }
    }
}

/// How long a source's bucket is kept after its last query.
const ASKER_TIMEOUT_MS: u64 = 60_000;

/// `update @set { <key in reg 1> limit rate over <rate>/second burst <burst> packets }`: one
/// token bucket per key, made on its first packet (nft's `meter`). nftnl 0.9 has neither the
/// dynset nor the limit expression; these are libnftnl's.
struct UpdateWithLimit {
    set_name: CString,
    set_id: u32,
    rate: u64,
    burst: u32,
}

impl Expression for UpdateWithLimit {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: as for FibDaddrType. The limit expression is handed to the dynset, which
        // owns (and frees) it from then on; the set name is copied.
        unsafe {
            let (Some(limit), Some(dynset)) = (
                NonNull::new(sys::nftnl_expr_alloc(c"limit".as_ptr())),
                NonNull::new(sys::nftnl_expr_alloc(c"dynset".as_ptr())),
            ) else {
                std::process::abort();
            };
            let l = limit.as_ptr();
            sys::nftnl_expr_set_u64(l, sys::NFTNL_EXPR_LIMIT_RATE as u16, self.rate);
            sys::nftnl_expr_set_u64(l, sys::NFTNL_EXPR_LIMIT_UNIT as u16, 1);
            sys::nftnl_expr_set_u32(l, sys::NFTNL_EXPR_LIMIT_BURST as u16, self.burst);
            sys::nftnl_expr_set_u32(
                l,
                sys::NFTNL_EXPR_LIMIT_TYPE as u16,
                libc::NFT_LIMIT_PKTS as u32,
            );
            sys::nftnl_expr_set_u32(
                l,
                sys::NFTNL_EXPR_LIMIT_FLAGS as u16,
                libc::NFT_LIMIT_F_INV as u32,
            );
            let d = dynset.as_ptr();
            sys::nftnl_expr_set_u32(
                d,
                sys::NFTNL_EXPR_DYNSET_SREG_KEY as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_u32(
                d,
                sys::NFTNL_EXPR_DYNSET_OP as u16,
                libc::NFT_DYNSET_OP_UPDATE as u32,
            );
            sys::nftnl_expr_set_u64(d, sys::NFTNL_EXPR_DYNSET_TIMEOUT as u16, ASKER_TIMEOUT_MS);
            sys::nftnl_expr_set_str(
                d,
                sys::NFTNL_EXPR_DYNSET_SET_NAME as u16,
                self.set_name.as_ptr(),
            );
            sys::nftnl_expr_set_u32(d, sys::NFTNL_EXPR_DYNSET_SET_ID as u16, self.set_id);
            sys::nftnl_expr_set(
                d,
                sys::NFTNL_EXPR_DYNSET_EXPR as u16,
                l as *const libc::c_void,
                0,
            );
            dynset
        }
    }
}

/// `fib daddr type`: the route type of the destination address (local = one of this
/// namespace's addresses). nftnl 0.9 has no fib expression; this is libnftnl's.
struct FibDaddrType;

impl Expression for FibDaddrType {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: nftnl_expr_alloc takes a NUL-terminated expression name and returns a new
        // expression or NULL (out of memory); the setters take that expression and integers.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"fib".as_ptr())) else {
                // What nftnl itself does on a failed allocation.
                std::process::abort();
            };
            let e = expr.as_ptr();
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_FIB_DREG as u16, libc::NFT_REG_1 as u32);
            sys::nftnl_expr_set_u32(
                e,
                sys::NFTNL_EXPR_FIB_RESULT as u16,
                NFT_FIB_RESULT_ADDRTYPE,
            );
            sys::nftnl_expr_set_u32(e, sys::NFTNL_EXPR_FIB_FLAGS as u16, NFTA_FIB_F_DADDR);
            expr
        }
    }
}

/// A batch plus what each of its messages does, to name the one the kernel refuses.
struct Messages {
    batch: Batch,
    what: Vec<String>,
}

impl Messages {
    fn new() -> Self {
        Messages {
            batch: Batch::new(),
            what: Vec::new(),
        }
    }

    fn add<T: NlMsg>(&mut self, msg: &T, ty: MsgType, what: impl Into<String>) {
        self.batch.add(msg, ty);
        self.what.push(what.into());
    }

    fn send(self) -> Result<(), FirewallError> {
        let what = self.what;
        let batch = self.batch.finalize();
        let seqs = batch.sequence_numbers();
        // On kernels that acknowledge the batch's begin and end messages (6.10 on), nftnl
        // numbers them too: the first sequence number is the begin message.
        let first_msg_seq = if seqs.len() == what.len() + 2 {
            seqs.start + 1
        } else {
            seqs.start
        };
        let describe = |seq: u32| {
            seq.checked_sub(first_msg_seq)
                .and_then(|i| what.get(i as usize))
                .cloned()
                .unwrap_or_else(|| "the batch's begin or end message".to_string())
        };

        let socket = mnl::Socket::new(mnl::Bus::Netfilter)
            .map_err(|source| FirewallError::Socket { source })?;
        let fd = socket.as_raw_fd();
        let bytes: usize = batch.iter().map(<[u8]>::len).sum();
        // The batch goes in one sendmsg (the kernel wants it in one piece), and one
        // acknowledgement per message comes back: size the buffers for that, as nft does.
        set_buffer(fd, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes + 64 * 1024)
            .map_err(|source| FirewallError::Socket { source })?;
        set_buffer(
            fd,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            seqs.len() * 1024 + 64 * 1024,
        )
        .map_err(|source| FirewallError::Socket { source })?;
        set_timeout(fd, ANSWER_TIMEOUT).map_err(|source| FirewallError::Socket { source })?;
        send_batch(fd, &batch).map_err(|source| FirewallError::Send { source })?;

        let portid = socket.portid();
        let mut buf = RecvBuf::new();
        let mut expected = seqs.clone();
        while expected.start < expected.end {
            let messages = match socket.recv(&mut buf.0[..]) {
                Ok(m) => m,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) => {
                    return Err(FirewallError::Timeout {
                        secs: ANSWER_TIMEOUT.as_secs(),
                    });
                }
                Err(source) => return Err(FirewallError::Receive { source }),
            };
            for message in messages {
                let message = message.map_err(|source| FirewallError::Receive { source })?;
                let Some(seq) = expected.next() else {
                    return Err(FirewallError::Receive {
                        source: io::Error::other("more answers than messages sent"),
                    });
                };
                if let Err(source) = mnl::cb_run(message, seq, portid) {
                    let answered = answer_seq(message).unwrap_or(seq);
                    return Err(FirewallError::Rejected {
                        what: describe(answered),
                        hint: FirewallError::hint(source.raw_os_error()),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The sequence number in a netlink message's header.
fn answer_seq(message: &[u8]) -> Option<u32> {
    let b = message.get(8..12)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// A receive buffer aligned for `nlmsghdr`, as libmnl requires.
#[repr(C, align(8))]
pub(super) struct RecvBuf(pub(super) [u8; 64 * 1024]);

impl RecvBuf {
    pub(super) fn new() -> Box<Self> {
        Box::new(RecvBuf([0; 64 * 1024]))
    }
}

/// Sends every page of the batch in one `sendmsg`: nfnetlink processes a batch only when its
/// begin and end arrive in the same datagram (mnl's `send_all` would send page by page).
fn send_batch(fd: i32, batch: &FinalizedBatch) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = batch
        .iter()
        .map(|page| libc::iovec {
            iov_base: page.as_ptr() as *mut libc::c_void,
            iov_len: page.len(),
        })
        .collect();
    let total: usize = iov.iter().map(|v| v.iov_len).sum();
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: as above for msghdr.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut kernel as *mut libc::sockaddr_nl).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    // SAFETY: msg points at a live address and iovecs over the batch's pages, which `batch`
    // keeps alive for the call; the kernel only reads them.
    let sent = unsafe { libc::sendmsg(fd, &msg, 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != total {
        return Err(io::Error::other(format!(
            "sent {sent} of the batch's {total} bytes"
        )));
    }
    Ok(())
}

/// Raises a socket buffer to `size` bytes (past the sysctl limit with CAP_NET_ADMIN, as nft
/// does; otherwise up to the limit).
fn set_buffer(fd: i32, force: libc::c_int, plain: libc::c_int, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    if setsockopt(fd, force, &size).is_ok() {
        return Ok(());
    }
    setsockopt(fd, plain, &size)
}

/// The answer timeout on a socket of `readback`'s.
pub(super) fn set_answer_timeout(socket: &mnl::Socket) -> io::Result<()> {
    set_timeout(socket.as_raw_fd(), ANSWER_TIMEOUT)
}

fn set_timeout(fd: i32, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(fd, libc::SO_RCVTIMEO, &tv)
}

fn setsockopt<T>(fd: i32, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live T and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
