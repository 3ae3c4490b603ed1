//! CIDR ranges for `trusted_proxies`.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8`, or a single address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR range"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
            None => max,
        };
        // An IPv4 peer is matched as IPv4 whatever socket it came in on: a range written in
        // IPv4-mapped form (`::ffff:10.0.0.0/104`, as an IPv6 socket shows such a peer) is
        // that IPv4 range.
        if let IpAddr::V6(v6) = net {
            if let (Some(v4), Some(p4)) = (v6.to_ipv4_mapped(), prefix.checked_sub(96)) {
                return Ok(Self {
                    net: IpAddr::V4(v4),
                    prefix: p4,
                });
            }
        }
        Ok(Self { net, prefix })
    }

    /// A range of every address (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Is `ip` one of the trusted proxies?
pub fn trusted(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        // IPv4-mapped ranges are the IPv4 ranges they map.
        let mapped = Cidr::parse("::ffff:127.0.0.1").unwrap();
        assert!(mapped.contains("127.0.0.1".parse().unwrap()));
        assert!(!mapped.contains("127.0.0.2".parse().unwrap()));
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(mapped, Cidr::parse("10.0.0.0/8").unwrap());
        assert!(Cidr::parse("::ffff:0:0/96").unwrap().is_everything());
        assert!(Cidr::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    /// A range holds its own addresses only, in both families: a mask gone wrong would make
    /// every client a trusted proxy, believed in what it says of the original request.
    #[test]
    fn ranges_exclude_other_addresses() {
        let outside = [
            ("fd00::/8", "2001:db8::1"),
            ("fd00::/8", "fe00::1"),
            ("::1", "::2"),
            ("2001:db8::/32", "2001:db9::"),
            ("10.0.0.0/8", "9.255.255.255"),
            ("127.0.0.1", "127.0.0.2"),
            ("127.0.0.1", "::ffff:127.0.0.2"),
            ("10.0.0.0/8", "::ffff:11.0.0.1"),
            ("::/0", "1.2.3.4"),
        ];
        for (range, ip) in outside {
            let c = Cidr::parse(range).unwrap();
            assert!(!c.contains(ip.parse().unwrap()), "{range} holds {ip}");
        }
        let edges = [
            ("2001:db8::/32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
            ("::/0", "2001:db8::1"),
        ];
        for (range, ip) in edges {
            assert!(Cidr::parse(range).unwrap().contains(ip.parse().unwrap()));
        }
    }
}
