//! Address and VNI arithmetic: which subnets, gateways, ranges and VNIs are valid, and which
//! address or VNI to try next. Pure functions; `cluster.rs` turns their answers into etcd
//! transactions, which are what make an allocation unique across hosts.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::error::Error;

/// The lowest VNI vxnet accepts (0..255 are left for hand-made overlays).
pub const VNI_MIN: u32 = 256;
/// Where automatic VNIs start. Two VXLAN devices with one VNI on one UDP port cannot coexist
/// on a host (the kernel refuses the second), and Docker's overlay numbers its networks from
/// 256 (swarm from 4096), flannel uses 1: starting at 2^20 keeps a host that also runs
/// those clear of them. `--vni` may still pick anything from 256.
pub const VNI_AUTO_MIN: u32 = 1 << 20;
/// The largest 24-bit VNI.
pub const VNI_MAX: u32 = 16_777_215;

/// The addresses a network can hand out.
#[derive(Clone, Debug)]
pub struct AddressPool {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    /// Where dynamic allocation picks from (the subnet when no `--ip-range` was given).
    pub range: Ipv4Net,
}

/// The shortest prefix a network may have: a /8 already holds 16 million addresses, and
/// anything that walks a pool (an exhausted search) must stay bounded.
pub const MIN_PREFIX: u8 = 8;
/// The longest: a /30 still holds a gateway and one container.
pub const MAX_PREFIX: u8 = 30;

/// Checks a subnet as given by the user: a prefix in /8../30, host bits zero.
pub fn validate_subnet(subnet: Ipv4Net) -> Result<(), Error> {
    if subnet.prefix_len() > MAX_PREFIX {
        return Err(Error::invalid(format!(
            "subnet {subnet} is too small: use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}"
        )));
    }
    if subnet.prefix_len() < MIN_PREFIX {
        return Err(Error::invalid(format!(
            "subnet {subnet} is too large: use a prefix between /{MIN_PREFIX} and /{MAX_PREFIX}"
        )));
    }
    if subnet.network() != subnet.addr() {
        return Err(Error::invalid(format!(
            "subnet {subnet} has host bits set: did you mean {}?",
            subnet.trunc()
        )));
    }
    Ok(())
}

impl AddressPool {
    /// Validates the user's choices and fills in the defaults (gateway = first host address).
    pub fn new(
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        ip_range: Option<Ipv4Net>,
    ) -> Result<Self, Error> {
        validate_subnet(subnet)?;
        let gateway = match gateway {
            Some(gw) => {
                if !is_host_address(subnet, gw) {
                    return Err(Error::invalid(format!(
                        "gateway {gw} is not a usable address of subnet {subnet} \
                         (it must be inside the subnet and not its network or broadcast address)"
                    )));
                }
                gw
            }
            None => first_host(subnet),
        };
        let range = match ip_range {
            Some(r) => {
                if r.network() != r.addr() {
                    return Err(Error::invalid(format!(
                        "ip-range {r} has host bits set: did you mean {}?",
                        r.trunc()
                    )));
                }
                if !subnet.contains(&r) {
                    return Err(Error::invalid(format!(
                        "ip-range {r} is not inside subnet {subnet}"
                    )));
                }
                r
            }
            None => subnet,
        };
        let pool = AddressPool {
            subnet,
            gateway,
            range,
        };
        if pool.dynamic_capacity() == 0 {
            return Err(Error::invalid(format!(
                "ip-range {range} leaves no address to hand out in {subnet} \
                 (network, broadcast and gateway {gateway} are reserved)"
            )));
        }
        Ok(pool)
    }

    /// Whether `ip` may be given to an endpoint that asked for it by name (`--ip`): any host
    /// address of the subnet except the gateway, inside or outside the dynamic range.
    pub fn check_requested(&self, ip: Ipv4Addr) -> Result<(), Error> {
        if !self.subnet.contains(&ip) {
            return Err(Error::invalid(format!(
                "address {ip} is not in the network's subnet {}",
                self.subnet
            )));
        }
        if ip == self.gateway {
            return Err(Error::conflict(format!(
                "address {ip} is the network's gateway"
            )));
        }
        if !is_host_address(self.subnet, ip) {
            return Err(Error::invalid(format!(
                "address {ip} is the network or broadcast address of {}",
                self.subnet
            )));
        }
        Ok(())
    }

    /// How many addresses dynamic allocation can hand out in all: the range's size minus the
    /// reserved addresses (subnet network, broadcast, gateway) that fall inside it. Counted,
    /// not enumerated, and in u64: a /0 range holds 2^32.
    pub fn dynamic_capacity(&self) -> u64 {
        let size = 1u64 << (32 - u32::from(self.range.prefix_len()));
        let mut reserved: Vec<Ipv4Addr> = vec![self.subnet.network(), self.subnet.broadcast()];
        if is_host_address(self.subnet, self.gateway) {
            reserved.push(self.gateway);
        }
        reserved.sort_unstable();
        reserved.dedup();
        let inside = reserved
            .iter()
            .filter(|ip| self.range.contains(*ip))
            .count() as u64;
        size.saturating_sub(inside)
    }

    /// The next free address after `cursor` (the last one handed out), wrapping around once.
    /// Starting after the cursor rather than at the bottom is what keeps a just-released
    /// address from being handed out again at once.
    pub fn next_free(
        &self,
        taken: &HashSet<Ipv4Addr>,
        cursor: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        self.free_after(taken, cursor).next()
    }

    /// Free addresses in allocation order: after `cursor`, then wrapping to the range start.
    pub fn free_after<'a>(
        &'a self,
        taken: &'a HashSet<Ipv4Addr>,
        cursor: Option<Ipv4Addr>,
    ) -> impl Iterator<Item = Ipv4Addr> + 'a {
        let lo = u32::from(self.range.network());
        let hi = u32::from(self.range.broadcast());
        let start = match cursor.map(u32::from) {
            Some(c) if c >= lo && c < hi => c.saturating_add(1),
            _ => lo,
        };
        (start..=hi)
            .chain(lo..start)
            .map(Ipv4Addr::from)
            .filter(move |ip| {
                *ip != self.gateway && is_host_address(self.subnet, *ip) && !taken.contains(ip)
            })
    }
}

/// The first address after the network address; a /31 or /32 at the top of the address
/// space has none after it, and gets its own network address rather than an overflow.
fn first_host(subnet: Ipv4Net) -> Ipv4Addr {
    let net = u32::from(subnet.network());
    Ipv4Addr::from(if subnet.broadcast() > subnet.network() {
        net.saturating_add(1)
    } else {
        net
    })
}

/// Inside the subnet and neither its network nor its broadcast address.
fn is_host_address(subnet: Ipv4Net, ip: Ipv4Addr) -> bool {
    subnet.contains(&ip) && ip != subnet.network() && ip != subnet.broadcast()
}

/// Two subnets overlap when either contains the other's network address.
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The first /24 of 10.0.0.0/8 that overlaps none of `used` (Docker's default pool).
pub fn first_free_subnet(used: impl Iterator<Item = Ipv4Net> + Clone) -> Option<Ipv4Net> {
    (0u32..65_536)
        .map(|i| Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).expect("/24 is valid"))
        .find(|c| !used.clone().any(|u| overlaps(u, *c)))
}

/// Checks a user-given VNI.
pub fn validate_vni(vni: u32) -> Result<(), Error> {
    if vni == 0 || vni > VNI_MAX {
        return Err(Error::invalid(format!(
            "VNI {vni} is out of range: use 1..{VNI_MAX}"
        )));
    }
    Ok(())
}

/// The lowest VNI from `VNI_MIN` up that is not in `used`.
pub fn next_free_vni(used: &HashSet<u32>) -> Option<u32> {
    (VNI_AUTO_MIN..=VNI_MAX)
        .chain(VNI_MIN..VNI_AUTO_MIN)
        .find(|v| !used.contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_gateway_is_first_host_and_allocation_skips_reserved() {
        let pool = AddressPool::new(net("10.0.4.0/24"), None, None).unwrap();
        assert_eq!(pool.gateway, ip("10.0.4.1"));
        assert_eq!(pool.dynamic_capacity(), 253);
        let taken = HashSet::new();
        assert_eq!(pool.next_free(&taken, None), Some(ip("10.0.4.2")));
        // After the last address the search wraps, skipping the broadcast and network address.
        assert_eq!(
            pool.next_free(&taken, Some(ip("10.0.4.254"))),
            Some(ip("10.0.4.2"))
        );
    }

    #[test]
    fn released_addresses_are_not_reused_at_once() {
        let pool = AddressPool::new(net("10.0.4.0/29"), None, None).unwrap();
        let mut taken: HashSet<_> = [ip("10.0.4.2"), ip("10.0.4.4")].into();
        // .3 was handed out and released; the cursor still points at it.
        assert_eq!(
            pool.next_free(&taken, Some(ip("10.0.4.3"))),
            Some(ip("10.0.4.5"))
        );
        taken.extend([ip("10.0.4.5"), ip("10.0.4.6")]);
        assert_eq!(
            pool.next_free(&taken, Some(ip("10.0.4.6"))),
            Some(ip("10.0.4.3"))
        );
        taken.insert(ip("10.0.4.3"));
        assert_eq!(pool.next_free(&taken, Some(ip("10.0.4.3"))), None);
    }

    #[test]
    fn ip_range_limits_dynamic_allocation_only() {
        let pool = AddressPool::new(
            net("10.0.0.0/16"),
            Some(ip("10.0.0.1")),
            Some(net("10.0.9.0/30")),
        )
        .unwrap();
        assert_eq!(pool.dynamic_capacity(), 4);
        assert_eq!(pool.next_free(&HashSet::new(), None), Some(ip("10.0.9.0")));
        pool.check_requested(ip("10.0.200.7")).unwrap();
    }

    #[test]
    fn bad_pools_are_refused_with_reasons() {
        let e = AddressPool::new(net("10.0.4.0/24"), Some(ip("10.0.5.1")), None).unwrap_err();
        assert!(e.to_string().contains("gateway 10.0.5.1"), "{e}");
        let e = AddressPool::new(net("10.0.4.0/24"), Some(ip("10.0.4.255")), None).unwrap_err();
        assert!(e.to_string().contains("broadcast"), "{e}");
        let e = AddressPool::new(net("10.0.4.0/24"), None, Some(net("10.0.5.0/28"))).unwrap_err();
        assert!(e.to_string().contains("not inside subnet"), "{e}");
        let e = AddressPool::new(net("10.0.4.5/24"), None, None).unwrap_err();
        assert!(e.to_string().contains("10.0.4.0/24"), "{e}");
        assert!(AddressPool::new(net("10.0.4.0/31"), None, None).is_err());
        let e = AddressPool::new(net("10.0.4.0/30"), None, Some(net("10.0.4.0/31"))).unwrap_err();
        assert!(e.to_string().contains("leaves no address"), "{e}");
    }

    #[test]
    fn requested_addresses_are_checked() {
        let pool = AddressPool::new(net("10.0.4.0/24"), None, None).unwrap();
        assert!(pool.check_requested(ip("10.0.4.9")).is_ok());
        assert!(pool.check_requested(ip("10.0.5.9")).is_err());
        assert!(pool.check_requested(ip("10.0.4.1")).is_err());
        assert!(pool.check_requested(ip("10.0.4.0")).is_err());
        assert!(pool.check_requested(ip("10.0.4.255")).is_err());
    }

    /// The same capacity as counting the addresses one by one (on prefixes small enough to
    /// count), for every prefix length and several gateway and range placements.
    fn counted(pool: &AddressPool) -> u64 {
        let lo = u32::from(pool.range.network());
        let hi = u32::from(pool.range.broadcast());
        (lo..=hi)
            .map(Ipv4Addr::from)
            .filter(|ip| *ip != pool.gateway && is_host_address(pool.subnet, *ip))
            .count() as u64
    }

    #[test]
    fn prefix_limits_hold_for_every_length() {
        for bases in [0u32, 0x0a00_0000, 0xffff_ffff] {
            for len in 0..=32u8 {
                let subnet = Ipv4Net::new(Ipv4Addr::from(bases), len).unwrap().trunc();
                let r = AddressPool::new(subnet, None, None);
                if (MIN_PREFIX..=MAX_PREFIX).contains(&len) {
                    let pool = r.unwrap();
                    let size = 1u64 << (32 - len);
                    assert_eq!(pool.dynamic_capacity(), size - 3, "{subnet}");
                } else {
                    let e = r.unwrap_err();
                    assert!(
                        e.to_string().contains("between /8 and /30"),
                        "{subnet}: {e}"
                    );
                }
                // The arithmetic itself never overflows, even on prefixes validation refuses.
                let _ = first_host(subnet);
                let _ = is_host_address(subnet, Ipv4Addr::from(bases));
            }
        }
    }

    #[test]
    fn capacity_matches_counting_for_ranges_and_gateways() {
        for len in 20..=30u8 {
            let subnet = Ipv4Net::new(ip("10.1.0.0"), len).unwrap().trunc();
            for rlen in len..=32 {
                for range in [
                    Ipv4Net::new(subnet.network(), rlen).unwrap().trunc(),
                    Ipv4Net::new(subnet.broadcast(), rlen).unwrap().trunc(),
                ] {
                    for gw in [None, Some(u32::from(subnet.broadcast()) - 1)] {
                        let gw = gw.map(|g: u32| Ipv4Addr::from(g));
                        let Ok(pool) = AddressPool::new(subnet, gw, Some(range)) else {
                            continue;
                        };
                        assert_eq!(pool.dynamic_capacity(), counted(&pool), "{subnet} {range}");
                        let cursor = Some(range.broadcast());
                        let _ = pool.next_free(&HashSet::new(), cursor);
                    }
                }
            }
        }
    }

    #[test]
    fn overlap_and_vni() {
        assert!(overlaps(net("10.0.4.0/24"), net("10.0.4.128/25")));
        assert!(overlaps(net("10.0.0.0/8"), net("10.0.4.0/24")));
        assert!(!overlaps(net("10.0.4.0/24"), net("10.0.5.0/24")));
        assert!(validate_vni(0).is_err());
        assert!(validate_vni(VNI_MAX + 1).is_err());
        assert_eq!(next_free_vni(&HashSet::new()), Some(VNI_AUTO_MIN));
        let used = [VNI_AUTO_MIN, VNI_AUTO_MIN + 1, VNI_AUTO_MIN + 3].into();
        assert_eq!(next_free_vni(&used), Some(VNI_AUTO_MIN + 2));
        let used = [net("10.0.0.0/23"), net("10.0.3.0/24")];
        assert_eq!(
            first_free_subnet(used.iter().copied()),
            Some(net("10.0.2.0/24"))
        );
    }
}
