//! ARP exposure of VIPs. Linux answers an ARP request for any of its
//! IPv4 addresses on any interface unless `arp_ignore` says otherwise, so
//! a VIP on the announce interface would be answered on the LAN too, and a
//! LAN neighbour could send the VIP's traffic to this host past the
//! router. With `arp_ignore = 1` an interface answers only for addresses
//! configured on itself. (NDP answers only for an interface's own
//! addresses already: IPv6 VIPs need nothing.)
//!
//! lbd changes no sysctl; it warns at start about each interface that would
//! answer. [`exposed`] is pure; [`exposed_interfaces`] reads `/proc`.

/// The interfaces (other than `lo` and `announce`) whose effective
/// `arp_ignore` (the larger of `all` and their own) is 0.
pub fn exposed(all: u8, interfaces: &[(String, u8)], announce: &str) -> Vec<String> {
    if all != 0 {
        return Vec::new();
    }
    interfaces
        .iter()
        .filter(|(name, own)| *own == 0 && name != "lo" && name != announce)
        .map(|(name, _)| name.clone())
        .collect()
}

/// `net.ipv4.conf.<name>.arp_ignore`, if it can be read.
fn arp_ignore(name: &str) -> Option<u8> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/arp_ignore"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// [`exposed`] for this host's network namespace; `None` when the settings
/// cannot be read (a unit with `ProcSubset=pid` hides `/proc/sys`).
pub fn exposed_interfaces(announce: &str) -> Option<Vec<String>> {
    let all = arp_ignore("all")?;
    let dir = std::fs::read_dir("/proc/sys/net/ipv4/conf").ok()?;
    let mut interfaces: Vec<(String, u8)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "all" && n != "default")
        .filter_map(|n| arp_ignore(&n).map(|v| (n, v)))
        .collect();
    interfaces.sort();
    Some(exposed(all, &interfaces, announce))
}

/// Whether `interface` answers ARP only for addresses configured on it
/// (effective `arp_ignore`, the larger of `all` and its own, at least 1):
/// what L2 mode needs of the LAN interface, where every host delivers
/// every VIP but only the owner has it on the interface. `None` when the
/// settings cannot be read.
pub fn ignores(interface: &str) -> Option<bool> {
    Some(arp_ignore("all")?.max(arp_ignore(interface)?) >= 1)
}

#[cfg(test)]
mod tests {
    use super::exposed;

    #[test]
    fn exposure_follows_the_larger_setting() {
        let ifs = vec![
            ("eth0".to_owned(), 0),
            ("eth1".to_owned(), 1),
            ("lo".to_owned(), 0),
            ("weir0".to_owned(), 0),
        ];
        assert_eq!(exposed(0, &ifs, "weir0"), ["eth0"]);
        assert!(exposed(1, &ifs, "weir0").is_empty());
        assert!(exposed(2, &ifs, "weir0").is_empty());
    }
}
