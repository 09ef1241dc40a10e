//! CNI wire types: versions, error codes, the error object and the result object.
//!
//! The result is the spec 1.0.0 shape (`interfaces`, `ips`, `routes`, `dns`); it is printed in
//! the version the configuration asked for ([`CniResult::to_json`]: before 1.0.0 every IP
//! carries its `version`). Unknown fields of interfaces and routes (1.1.0 adds `mtu`,
//! `table`, `scope`, ...) pass through unchanged when a result is read and written again.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::metadata::json::{self, JsonError};

/// The versions this implementation reads and writes.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest of them.
pub const LATEST: &str = "1.1.0";

/// Error codes: 1-99 are the spec's (with their meaning there), 100 and up are ours.
pub mod code {
    /// The configuration's `cniVersion` is not supported.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A field of the configuration is not supported.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A required environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (stdin, stdout, files).
    pub const IO: u32 = 5;
    /// stdin could not be decoded.
    pub const DECODE: u32 = 6;
    /// The network configuration is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: the runtime should retry.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD requests now.
    pub const NOT_AVAILABLE: u32 = 50;

    /// The kernel refused a netlink request.
    pub const NETLINK: u32 = 100;
    /// The mesh metadata is unreadable or invalid.
    pub const METADATA: u32 = 101;
    /// This host is not in the metadata, or it has no container subnet.
    pub const UNKNOWN_HOST: u32 = 102;
    /// Every address of this host's subnets is allocated.
    pub const EXHAUSTED: u32 = 103;
    /// The allocation store cannot be read or written.
    pub const STORE: u32 = 104;
    /// CHECK found the container's networking different from the previous result.
    pub const CHECK_FAILED: u32 = 105;
    /// The delegated IPAM plugin could not be run or answered nonsense.
    pub const DELEGATE: u32 = 106;
    /// The container's network namespace cannot be entered.
    pub const NETNS: u32 = 107;
    /// An interface with the requested name exists and is not ours.
    pub const CONFLICT: u32 = 108;
    /// A statically requested address is not this host's to give (outside its subnets, a
    /// network, gateway or broadcast address, the VTEP address).
    pub const ADDRESS_UNAVAILABLE: u32 = 109;
    /// A statically requested address is held by another container.
    pub const ADDRESS_IN_USE: u32 = 110;
    /// A bug: the plugin panicked (reported instead of crashing).
    pub const INTERNAL: u32 = 199;
}

/// A CNI error: printed on stdout as `{"cniVersion", "code", "msg", "details"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_CONFIG, msg)
    }

    pub fn env(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_ENV, msg)
    }

    /// The error object in `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(version.to_string()));
        m.insert("code".into(), Value::from(self.code));
        m.insert("msg".into(), Value::String(self.msg.clone()));
        if !self.details.is_empty() {
            m.insert("details".into(), Value::String(self.details.clone()));
        }
        Value::Object(m)
    }

    /// Read an error object another plugin printed.
    pub fn from_json(v: &Value) -> Option<CniError> {
        let code = v.get("code")?.as_u64()?;
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or_default();
        let details = v.get("details").and_then(Value::as_str).unwrap_or_default();
        Some(CniError {
            code: u32::try_from(code).ok()?,
            msg: msg.to_string(),
            details: details.to_string(),
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// A version as (major, minor, patch); `None` when it is not `a.b.c`.
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let r = (it.next()??, it.next()??, it.next()??);
    if it.next().is_some() {
        return None;
    }
    Some(r)
}

/// Whether `v` is one of [`SUPPORTED_VERSIONS`].
pub fn is_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// `v` is at least `min` (both `a.b.c`; an unparsable `v` is not).
pub fn at_least(v: &str, min: (u32, u32, u32)) -> bool {
    parse_version(v).is_some_and(|p| p >= min)
}

/// The VERSION answer.
pub fn version_json(requested: Option<&str>) -> Value {
    let v = requested.filter(|v| is_supported(v)).unwrap_or(LATEST);
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

/// An interface of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path, for interfaces inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An address of a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with the subnet's prefix length (`10.42.1.5/24`).
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// "4" or "6": required before 1.0.0, gone since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A route of a result (or of the IPAM `routes` option).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            extra: Map::new(),
        }
    }
}

/// DNS settings of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The ADD result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// The result as printed for a configuration of `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut r = self.clone();
        r.cni_version = version.to_string();
        let old = !at_least(version, (1, 0, 0));
        for ip in &mut r.ips {
            ip.version = old.then(|| {
                if ip.address.addr().is_ipv4() {
                    "4".to_string()
                } else {
                    "6".to_string()
                }
            });
        }
        serde_json::to_value(&r).unwrap_or(Value::Null)
    }

    /// Read a result (an IPAM plugin's answer, or a `prevResult`) of any supported version.
    /// Errors name the JSON path in the result (`ips[0].address`); [`JsonError::under`] puts
    /// them under the key the result came from (`prevResult.ips[0].address`).
    pub fn from_json(v: &Value) -> Result<CniResult, JsonError> {
        let mut r: CniResult = json::from_value(v.clone())?;
        for ip in &mut r.ips {
            ip.version = None;
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: "aa:bb:cc:dd:ee:ff".into(),
                    sandbox: None,
                    extra: Map::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: Some("/var/run/netns/x".into()),
                    extra: Map::new(),
                },
            ],
            ips: vec![IpConfig {
                address: "10.42.1.5/24".parse().unwrap(),
                gateway: Some("10.42.1.1".parse().unwrap()),
                interface: Some(1),
                version: None,
            }],
            routes: vec![Route::new("0.0.0.0/0".parse().unwrap(), None)],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_json_1_0_0() {
        assert_eq!(
            sample().to_json("1.0.0"),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/x"}
                ],
                "ips": [{"address": "10.42.1.5/24", "gateway": "10.42.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn result_json_before_1_0_has_ip_versions() {
        let v = sample().to_json("0.4.0");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        let back = CniResult::from_json(&v).unwrap();
        assert_eq!(back.ips, sample().ips);
    }

    #[test]
    fn unknown_route_and_interface_fields_pass_through() {
        let v = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mtu": 1400, "socketPath": "/x"}],
            "ips": [{"address": "fd00::5/64"}],
            "routes": [{"dst": "10.0.0.0/8", "gw": "10.42.1.1", "table": 100, "mtu": 1400}]
        });
        let r = CniResult::from_json(&v).unwrap();
        let out = r.to_json("1.1.0");
        assert_eq!(out["routes"][0]["table"], 100);
        assert_eq!(out["interfaces"][0]["mtu"], 1400);
        assert_eq!(out["ips"][0]["address"], "fd00::5/64");
        assert!(out["ips"][0].get("version").is_none());
        assert_eq!(r.to_json("0.3.1")["ips"][0]["version"], "6");
    }

    #[test]
    fn bad_results_are_rejected_naming_the_path() {
        for (bad, path) in [
            (json!({"ips": [{"address": "10.42.1.5"}]}), "ips[0].address"),
            (
                json!({"ips": [{"address": "10.42.1.5/24"}, {"address": "x/24"}]}),
                "ips[1].address",
            ),
            // Route has flattened extra fields: serde sees the whole object at once.
            (
                json!({"ips": [], "routes": [{"gw": "10.0.0.1"}]}),
                "routes[0]",
            ),
            (
                json!({"ips": [{"address": "10.42.1.5/24", "gateway": "nope"}]}),
                "ips[0].gateway",
            ),
            (
                json!({"ips": [], "dns": {"nameservers": [1]}}),
                "dns.nameservers[0]",
            ),
            (json!({"ips": {}}), "ips"),
            (json!({"ips": [{}]}), "ips[0]"),
        ] {
            let e = CniResult::from_json(&bad).unwrap_err();
            assert_eq!(e.path, path, "{bad}: {e}");
            assert_eq!(e.line, 0, "{e}");
            assert!(e.to_string().starts_with(&format!("{path}: ")), "{e}");
        }
        let e = CniResult::from_json(&json!({"ips": [{"address": 5}]})).unwrap_err();
        assert_eq!(
            e.under("prevResult").to_string(),
            "prevResult.ips[0].address: invalid type: integer `5`, expected IPv4 or IPv6 network address"
        );
    }

    #[test]
    fn errors() {
        let e = CniError::config("bridge: must be a string").with_details("got 5");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 7, "msg": "bridge: must be a string", "details": "got 5"})
        );
        assert_eq!(CniError::from_json(&e.to_json("1.0.0")), Some(e.clone()));
        assert_eq!(e.to_string(), "bridge: must be a string (code 7): got 5");
        assert!(CniError::from_json(&json!({"msg": "x"})).is_none());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.0.0"), Some((1, 0, 0)));
        assert_eq!(parse_version("1.0"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
        assert_eq!(parse_version("a.b.c"), None);
        assert!(at_least("1.1.0", (1, 0, 0)));
        assert!(!at_least("0.4.0", (1, 0, 0)));
        assert!(is_supported("0.4.0") && !is_supported("0.2.0") && !is_supported("2.0.0"));
        assert_eq!(version_json(Some("1.0.0"))["cniVersion"], "1.0.0");
        assert_eq!(version_json(Some("9.9.9"))["cniVersion"], LATEST);
        assert_eq!(version_json(None)["supportedVersions"][4], "1.1.0");
    }
}
