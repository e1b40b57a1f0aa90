//! vxnet's table read back, for `vxnet doctor`: which chains it has with how many rules
//! each, and which sets with which IPv4 elements.
//!
//! The wanted shape is not described a second time: it is parsed out of the very batch
//! `Nftables::apply` would send for the ruleset, by the same parser that reads the kernel's
//! dump, so the two can only differ where the kernel differs. Rules are compared by count
//! per chain, not expression by expression: the kernel hands rules back with handles and
//! live counters, and a rule's expressions in another (equivalent) form; a table someone
//! edited by hand still shows, as a chain with a rule more or less, a missing chain, or a
//! set's elements. Whatever differs, the fix is the same atomic replace of the whole table.
//!
//! Set elements are read by a small parser of this module's own (`set_elements`), for both
//! sides: libnftnl's cannot read the element lists it builds into a batch.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;

use nftnl::nftnl_sys as sys;

use super::nftables::{self, RecvBuf};
use super::{FirewallError, Ruleset, TABLE};

/// The parts of `table inet vxnet` that `vxnet doctor` compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Chain name -> number of rules in it.
    pub chains: BTreeMap<String, usize>,
    /// Set name -> its IPv4 elements.
    pub sets: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

/// The shape `apply(ruleset)` gives the table.
pub fn desired_shape(ruleset: &Ruleset) -> Result<TableShape, FirewallError> {
    let batch = nftables::build(ruleset)?;
    let mut shape = TableShape::default();
    for page in &batch {
        for message in messages(page) {
            absorb(&mut shape, message);
        }
    }
    Ok(shape)
}

/// The table as the kernel has it in the calling thread's network namespace, or `None`
/// when there is no `inet vxnet` table. Read only: four dumps and one per set.
pub fn read_table() -> Result<Option<TableShape>, FirewallError> {
    let socket =
        mnl::Socket::new(mnl::Bus::Netfilter).map_err(|source| FirewallError::Socket { source })?;
    nftables::set_answer_timeout(&socket).map_err(|source| FirewallError::Socket { source })?;
    let mut buf = RecvBuf::new();
    let mut shape = TableShape::default();

    let mut tables = Vec::new();
    dump(&socket, &mut buf, request(libc::NFT_MSG_GETTABLE, 1), |m| {
        tables.push(m.to_vec())
    })?;
    let has_table = tables.iter().any(|m| table_of(m).as_deref() == Some(TABLE));
    if !has_table {
        return Ok(None);
    }
    for (seq, ty) in [
        (2, libc::NFT_MSG_GETCHAIN),
        (3, libc::NFT_MSG_GETRULE),
        (4, libc::NFT_MSG_GETSET),
    ] {
        dump(&socket, &mut buf, request(ty, seq), |m| {
            absorb(&mut shape, m)
        })?;
    }
    let sets: Vec<String> = shape.sets.keys().cloned().collect();
    for (i, set) in sets.iter().enumerate() {
        let req = elements_request(set, 5 + i as u32)?;
        dump(&socket, &mut buf, req, |m| absorb(&mut shape, m))?;
    }
    Ok(Some(shape))
}

/// A dump request of one kind of object in the `inet` family.
fn request(ty: i32, seq: u32) -> Vec<u8> {
    let mut buf = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: the buffer is as large as libnftnl's largest message; the header is written
    // at its start and its length covers only the header.
    let len = unsafe {
        let nlh = sys::nftnl_nlmsg_build_hdr(
            buf.as_mut_ptr().cast(),
            ty as u16,
            libc::NFPROTO_INET as u16,
            (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
            seq,
        );
        (*nlh).nlmsg_len as usize
    };
    buf.truncate(len);
    buf
}

/// The dump of one set's elements (the kernel wants the table and the set named).
fn elements_request(set: &str, seq: u32) -> Result<Vec<u8>, FirewallError> {
    let name = CString::new(set).map_err(|_| FirewallError::Receive {
        source: io::Error::other(format!("the kernel listed a set named {set:?}")),
    })?;
    let table = CString::new(TABLE).unwrap_or_default();
    let mut buf = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: as in `request`; the set object is allocated, filled with copies of the two
    // strings, used to write the payload after the header, and freed.
    let len = unsafe {
        let nlh = sys::nftnl_nlmsg_build_hdr(
            buf.as_mut_ptr().cast(),
            libc::NFT_MSG_GETSETELEM as u16,
            libc::NFPROTO_INET as u16,
            (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
            seq,
        );
        let s = sys::nftnl_set_alloc();
        if s.is_null() {
            return Err(FirewallError::Socket {
                source: io::Error::from(io::ErrorKind::OutOfMemory),
            });
        }
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        sys::nftnl_set_elems_nlmsg_build_payload(nlh, s);
        sys::nftnl_set_free(s);
        (*nlh).nlmsg_len as usize
    };
    buf.truncate(len);
    Ok(buf)
}

/// Sends one dump request and hands each answer to `each` until the kernel says done.
fn dump(
    socket: &mnl::Socket,
    buf: &mut RecvBuf,
    req: Vec<u8>,
    mut each: impl FnMut(&[u8]),
) -> Result<(), FirewallError> {
    socket
        .send(&req)
        .map_err(|source| FirewallError::Send { source })?;
    loop {
        let answers = match socket.recv(&mut buf.0[..]) {
            Ok(m) => m,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) => {
                return Err(FirewallError::Timeout {
                    secs: nftables::ANSWER_TIMEOUT.as_secs(),
                })
            }
            Err(source) => return Err(FirewallError::Receive { source }),
        };
        for answer in answers {
            let answer = answer.map_err(|source| FirewallError::Receive { source })?;
            match header_type(answer) {
                Some(t) if t == libc::NLMSG_DONE as u16 => return Ok(()),
                Some(t) if t == libc::NLMSG_ERROR as u16 => {
                    let code = answer
                        .get(16..20)
                        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    // 0 is the ACK that ends a dump on some kernels.
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(FirewallError::Rejected {
                        what: "a read of table inet vxnet".into(),
                        source: io::Error::from_raw_os_error(-code),
                        hint: FirewallError::hint(Some(-code)),
                    });
                }
                _ => each(answer),
            }
        }
    }
}

fn header_type(message: &[u8]) -> Option<u16> {
    let b = message.get(4..6)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

/// The netlink messages in one page of a batch (or any buffer of whole messages).
fn messages(page: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let b = page.get(off..off + 4)?;
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || off + len > page.len() {
            return None;
        }
        let m = &page[off..off + len];
        off += (len + 3) & !3;
        Some(m)
    })
}

/// The table a NEWTABLE message names.
fn table_of(message: &[u8]) -> Option<String> {
    // SAFETY: the message is a whole netlink message from the kernel (mnl checked its
    // length) at a 4-aligned address; the table object is freed before returning, after
    // its name was copied.
    unsafe {
        let t = sys::nftnl_table_alloc();
        if t.is_null() {
            return None;
        }
        let nlh = message.as_ptr().cast::<libc::nlmsghdr>();
        let name = if sys::nftnl_table_nlmsg_parse(nlh, t) < 0 {
            None
        } else {
            c_string(sys::nftnl_table_get_str(t, sys::NFTNL_TABLE_NAME as u16))
        };
        sys::nftnl_table_free(t);
        name
    }
}

/// Adds what one message says about `inet vxnet` to `shape`. A batch's DELTABLE clears what
/// came before (the replace adds, deletes, then adds the table anew); anything of another
/// table or family, and anything unparsable, is ignored.
fn absorb(shape: &mut TableShape, message: &[u8]) {
    let Some(ty) = header_type(message) else {
        return;
    };
    if ty >> 8 != libc::NFNL_SUBSYS_NFTABLES as u16 {
        return;
    }
    // nfgenmsg after the 16-byte header: its first byte is the family.
    if message.get(16) != Some(&(libc::NFPROTO_INET as u8)) {
        return;
    }
    let nlh = message.as_ptr().cast::<libc::nlmsghdr>();
    // SAFETY: each branch allocates one libnftnl object, parses the whole message (its
    // length checked by `messages` or mnl, 4-aligned) into it, copies the strings and
    // addresses it needs, and frees it.
    unsafe {
        match i32::from(ty & 0xff) {
            libc::NFT_MSG_DELTABLE if table_of(message).as_deref() == Some(TABLE) => {
                *shape = TableShape::default();
            }
            libc::NFT_MSG_NEWCHAIN => {
                let c = sys::nftnl_chain_alloc();
                if c.is_null() {
                    return;
                }
                if sys::nftnl_chain_nlmsg_parse(nlh, c) >= 0 {
                    let table =
                        c_string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16));
                    let name = c_string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16));
                    if let (Some(TABLE), Some(name)) = (table.as_deref(), name) {
                        shape.chains.entry(name).or_default();
                    }
                }
                sys::nftnl_chain_free(c);
            }
            libc::NFT_MSG_NEWRULE => {
                let r = sys::nftnl_rule_alloc();
                if r.is_null() {
                    return;
                }
                if sys::nftnl_rule_nlmsg_parse(nlh, r) >= 0 {
                    let table = c_string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16));
                    let chain = c_string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16));
                    if let (Some(TABLE), Some(chain)) = (table.as_deref(), chain) {
                        *shape.chains.entry(chain).or_default() += 1;
                    }
                }
                sys::nftnl_rule_free(r);
            }
            libc::NFT_MSG_NEWSET => {
                let s = sys::nftnl_set_alloc();
                if s.is_null() {
                    return;
                }
                if sys::nftnl_set_nlmsg_parse(nlh, s) >= 0 {
                    if let Some(name) = vxnet_set(s) {
                        shape.sets.entry(name).or_default();
                    }
                }
                sys::nftnl_set_free(s);
            }
            libc::NFT_MSG_NEWSETELEM => {
                if let Some((table, set, elements)) = set_elements(message) {
                    if table == TABLE.as_bytes() {
                        let set = String::from_utf8_lossy(set).into_owned();
                        shape.sets.entry(set).or_default().extend(elements);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The name of a parsed set when it is one of `inet vxnet`'s.
///
/// # Safety
/// `s` is a live set object.
unsafe fn vxnet_set(s: *mut sys::nftnl_set) -> Option<String> {
    let table = c_string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16));
    if table.as_deref() != Some(TABLE) {
        return None;
    }
    c_string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16))
}

/// (table, set, IPv4 keys) of a NEWSETELEM message, read here rather than by libnftnl:
/// libnftnl numbers the elements' nests 1, 2, 3… when it builds a batch (the kernel
/// ignores the number) but its parser accepts only 1 (NFTA_LIST_ELEM, as the kernel's
/// dump sends them), so it cannot read back the batch `apply` sends.
fn set_elements(message: &[u8]) -> Option<(&[u8], &[u8], Vec<Ipv4Addr>)> {
    // nlmsghdr (16) + nfgenmsg (4), then NFTA_SET_ELEM_LIST_* attributes.
    let mut table = None;
    let mut set = None;
    let mut keys = Vec::new();
    for (ty, payload) in attributes(message.get(20..)?) {
        match ty {
            NFTA_SET_ELEM_LIST_TABLE => table = Some(c_bytes(payload)),
            NFTA_SET_ELEM_LIST_SET => set = Some(c_bytes(payload)),
            NFTA_SET_ELEM_LIST_ELEMENTS => {
                for (_, element) in attributes(payload) {
                    let key = attributes(element).find(|(t, _)| *t == NFTA_SET_ELEM_KEY);
                    let value =
                        key.and_then(|(_, k)| attributes(k).find(|(t, _)| *t == NFTA_DATA_VALUE));
                    if let Some((_, &[a, b, c, d])) = value {
                        keys.push(Ipv4Addr::new(a, b, c, d));
                    }
                }
            }
            _ => {}
        }
    }
    Some((table?, set?, keys))
}

// From linux/netfilter/nf_tables.h.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_DATA_VALUE: u16 = 1;

/// The netlink attributes in `buf`: (type without the nested/byte-order flags, payload).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let h = buf.get(off..off + 4)?;
        let len = u16::from_ne_bytes([h[0], h[1]]) as usize;
        let ty = u16::from_ne_bytes([h[2], h[3]]) & 0x3fff;
        let payload = buf.get(off + 4..off + len.max(4))?;
        off += (len.max(4) + 3) & !3;
        Some((ty, payload))
    })
}

/// A NUL-terminated string attribute without its NUL.
fn c_bytes(payload: &[u8]) -> &[u8] {
    payload.split(|b| *b == 0).next().unwrap_or_default()
}

/// A copy of a C string libnftnl returned (`None` for a null pointer).
///
/// # Safety
/// `p` is null or a NUL-terminated string that lives for the call.
unsafe fn c_string(p: *const libc::c_char) -> Option<String> {
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ruleset(vteps: Vec<Ipv4Addr>, store: usize) -> Ruleset {
        Ruleset {
            bridge: "vxnet_gwbridge".into(),
            subnet: "172.18.0.0/16".parse().expect("a subnet"),
            ports: vec![],
            vxlan_port: 4789,
            vteps,
            store: (0..store)
                .map(|i| std::net::SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 5 + i as u8), 2379))
                .collect(),
            host_services: vec![],
        }
    }

    #[test]
    fn the_desired_shape_is_read_from_the_batch_apply_would_send() {
        let vteps = vec![Ipv4Addr::new(192, 0, 2, 7), Ipv4Addr::new(192, 0, 2, 6)];
        let shape = desired_shape(&ruleset(vteps, 1)).expect("a valid ruleset");
        let chains: Vec<&str> = shape.chains.keys().map(String::as_str).collect();
        assert_eq!(
            chains,
            ["forward", "input", "output", "postrouting", "prerouting"]
        );
        assert_eq!(shape.chains["postrouting"], 1);
        assert_eq!(shape.chains["prerouting"], 0, "no published port");
        // Isolation, VXLAN, the store's two ports, established, DNAT'd, ingress drop.
        assert_eq!(shape.chains["forward"], 7);
        assert_eq!(
            shape.sets["vteps"],
            [Ipv4Addr::new(192, 0, 2, 6), Ipv4Addr::new(192, 0, 2, 7)].into()
        );
    }

    #[test]
    fn an_invalid_ruleset_has_no_shape_as_apply_refuses_it() {
        let mut bad = ruleset(vec![], 1);
        bad.bridge = "a_much_too_long_name".into();
        assert!(matches!(
            desired_shape(&bad),
            Err(FirewallError::InvalidRuleset { .. })
        ));
    }

    #[test]
    fn more_store_members_mean_more_rules_and_an_empty_set_is_still_a_set() {
        let one = desired_shape(&ruleset(vec![], 1)).expect("valid");
        let two = desired_shape(&ruleset(vec![], 2)).expect("valid");
        assert_eq!(two.chains["forward"], one.chains["forward"] + 2);
        assert_eq!(two.sets.get("vteps"), Some(&BTreeSet::new()));
    }
}
