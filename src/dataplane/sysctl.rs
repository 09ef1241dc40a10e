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
    pub path: &'static str,
    pub value: &'static str,
    #[source]
    pub source: io::Error,
}

/// Sets `path` to `value` unless it already reads so (then nothing is written). Returns
/// whether it wrote.
pub fn ensure(path: &'static str, value: &'static str) -> Result<bool, SysctlError> {
    if std::fs::read_to_string(path)
        .map(|s| s.trim() == value)
        .unwrap_or(false)
    {
        return Ok(false);
    }
    std::fs::write(path, value).map_err(|source| SysctlError {
        path,
        value,
        source,
    })?;
    Ok(true)
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
        assert_eq!((e.path, e.value), ("/proc/sys", "1"));
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
