//! Kernel settings ipsec-mesh writes through `/proc/sys`, all in this one place, so every
//! sysctl the project changes is named here. `/proc/sys/net/...` is the network namespace of
//! the calling thread.

use std::io;

use thiserror::Error;

/// IPv4 forwarding, all interfaces.
pub const IPV4_FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
/// IPv6 forwarding, all interfaces.
pub const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// A sysctl could not be written.
#[derive(Debug, Error)]
#[error("writing {value} to {path}: {source}")]
pub struct SysctlError {
    pub path: String,
    pub value: &'static str,
    #[source]
    pub source: io::Error,
}

/// Sets `path` to `value` unless it already reads so (then nothing is written). Returns
/// whether it wrote.
pub fn ensure(path: &str, value: &'static str) -> Result<bool, SysctlError> {
    if std::fs::read_to_string(path)
        .map(|s| s.trim() == value)
        .unwrap_or(false)
    {
        return Ok(false);
    }
    std::fs::write(path, value).map_err(|source| SysctlError {
        path: path.to_string(),
        value,
        source,
    })?;
    Ok(true)
}

/// The per-device settings of one of the route mode's XFRM interfaces
/// ([`crate::dataplane::xfrmi`]), in write order: forwarding of what arrives on it (the
/// kernel forwards only what comes in on a device with forwarding on, and a new device takes
/// the `default` value, which need not follow `all`), and no IPv4 reverse-path filter of the
/// device's own (0). The kernel skips `rp_filter` for packets that came through IPsec (they
/// carry a secpath), so the sysctl neither checks nor breaks what the interfaces decrypt; the
/// route mode's source check is a firewall rule ([`crate::dataplane::firewall::RPF_CHAIN`]).
/// 0 just leaves the operator's `all` in force. Forwarding is set for each overlay family in
/// `v6s` (false: IPv4, true: IPv6; a dual-stack overlay has both). Returns how many were
/// written.
pub fn tune_tunnel_device(dev: &str, v6s: &[bool]) -> Result<usize, SysctlError> {
    let mut n = 0;
    for fam in ["ipv4", "ipv6"] {
        if v6s.contains(&(fam == "ipv6")) {
            n += usize::from(ensure(
                &format!("/proc/sys/net/{fam}/conf/{dev}/forwarding"),
                "1",
            )?);
        }
    }
    let rp = format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter");
    Ok(n + usize::from(ensure(&rp, "0")?))
}

/// Turns forwarding on for the families asked for (IPv4 first).
pub fn enable_forwarding(v4: bool, v6: bool) -> Result<(), SysctlError> {
    for (wanted, path) in [(v4, IPV4_FORWARDING), (v6, IPV6_FORWARDING)] {
        if wanted {
            ensure(path, "1")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwritable_setting_names_path_and_value() {
        // /proc/sys is never a directory a file can be written as
        let e = ensure("/proc/sys", "1").unwrap_err();
        assert_eq!((e.path.as_str(), e.value), ("/proc/sys", "1"));
        assert!(e.to_string().starts_with("writing 1 to /proc/sys: "), "{e}");
    }

    #[test]
    fn a_setting_that_already_holds_the_value_is_not_written() {
        // reading /proc/sys/net/ipv4/ip_forward works for everyone; whatever it holds,
        // asking for that value writes nothing (so this needs no root)
        let now = std::fs::read_to_string(IPV4_FORWARDING).unwrap();
        let value: &'static str = if now.trim() == "1" { "1" } else { "0" };
        assert_eq!(now.trim(), value, "ip_forward is 0 or 1");
        assert!(!ensure(IPV4_FORWARDING, value).unwrap());
    }
}
