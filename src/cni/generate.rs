//! The network configuration `ipsec-mesh cni-config` prints (pure).

use serde_json::{json, Value};

/// What goes into the generated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Network name.
    pub name: String,
    pub bridge: String,
    /// SRC as given to `--metadata`.
    pub metadata: String,
    /// Written into the ipam section when given.
    pub host: Option<String>,
    /// The planner's container MTU.
    pub mtu: u16,
    pub data_dir: Option<String>,
    /// A `.conflist` (with `plugins`) rather than a single `.conf`.
    pub conflist: bool,
}

/// The spec version the generated configuration declares.
pub const VERSION: &str = "1.0.0";

/// The bridge plugin's entry.
pub fn plugin(o: &Options) -> Value {
    let mut ipam = json!({ "type": "ipsec-mesh-ipam", "metadata": o.metadata });
    if let Some(h) = &o.host {
        ipam["host"] = json!(h);
    }
    if let Some(d) = &o.data_dir {
        ipam["dataDir"] = json!(d);
    }
    json!({
        "type": "ipsec-mesh-bridge",
        "bridge": o.bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "mtu": o.mtu,
        "ipam": ipam,
    })
}

/// The whole document.
pub fn config(o: &Options) -> Value {
    if o.conflist {
        json!({ "cniVersion": VERSION, "name": o.name, "plugins": [plugin(o)] })
    } else {
        let mut p = plugin(o);
        let mut head = json!({ "cniVersion": VERSION, "name": o.name });
        if let (Some(h), Some(p)) = (head.as_object_mut(), p.as_object_mut()) {
            h.append(p);
        }
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(conflist: bool) -> Options {
        Options {
            name: "ipsec-mesh".into(),
            bridge: "cni0".into(),
            metadata: "/etc/mesh.json".into(),
            host: Some("host-a".into()),
            mtu: 1446,
            data_dir: None,
            conflist,
        }
    }

    #[test]
    fn conflist_and_conf() {
        let v = config(&opts(true));
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["plugins"][0]["type"], "ipsec-mesh-bridge");
        assert_eq!(v["plugins"][0]["mtu"], 1446);
        assert_eq!(v["plugins"][0]["ipam"]["host"], "host-a");
        assert!(v["plugins"][0]["ipam"].get("dataDir").is_none());
        let v = config(&opts(false));
        assert_eq!(v["name"], "ipsec-mesh");
        assert_eq!(v["type"], "ipsec-mesh-bridge");
        assert_eq!(v["ipam"]["metadata"], "/etc/mesh.json");
        assert!(v.get("plugins").is_none());
    }
}
