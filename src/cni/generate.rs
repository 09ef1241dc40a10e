//! The network configuration `ipsec-mesh cni-config` prints (pure).
//!
//! A `.conflist` chains, after the bridge plugin, the reference `portmap` plugin (capability
//! `portMappings`: `podman run -p`), unless turned off. The bridge masquerades traffic to
//! destinations outside the mesh (`ipMasq`, default on) and declares the `ips` and `mac`
//! capabilities (`podman run --ip/--mac-address`), which reach the IPAM plugin with stdin.
//! The IPAM section carries this host's subnets in host-local's `ranges` layout and, for
//! `podman network inspect` (which reads subnets only from the reference bridge plugin), the
//! conflist carries them as labels too; both are a snapshot for people and tools: the
//! plugins allocate from the metadata, which stays the source of truth.

use ipnet::IpNet;
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
    /// Chain the reference `portmap` plugin (conflist only).
    pub portmap: bool,
    /// Masquerade traffic leaving the mesh (`ipMasq`).
    pub masquerade: bool,
    /// This host's subnets (the `ranges` snapshot).
    pub subnets: Vec<IpNet>,
}

/// The spec version the generated configuration declares.
pub const VERSION: &str = "1.0.0";

/// Label keys of the conflist's `args.podman_labels` (shown by `podman network inspect`).
pub const LABEL_SUBNETS: &str = "io.ipsec-mesh.subnets";
pub const LABEL_GATEWAYS: &str = "io.ipsec-mesh.gateways";

fn gateways(subnets: &[IpNet]) -> Vec<String> {
    subnets
        .iter()
        .filter_map(super::store::gateway)
        .map(|g| g.to_string())
        .collect()
}

fn joined(v: impl IntoIterator<Item = String>) -> String {
    v.into_iter().collect::<Vec<_>>().join(",")
}

/// host-local's `ranges`: one range set per subnet, with its gateway.
pub fn ranges(subnets: &[IpNet]) -> Value {
    Value::Array(
        subnets
            .iter()
            .map(|s| {
                let mut r = json!({ "subnet": s.to_string() });
                if let Some(g) = super::store::gateway(s) {
                    r["gateway"] = json!(g.to_string());
                }
                json!([r])
            })
            .collect(),
    )
}

/// The bridge plugin's entry.
pub fn plugin(o: &Options) -> Value {
    let mut ipam = json!({ "type": "ipsec-mesh-ipam", "metadata": o.metadata });
    if let Some(h) = &o.host {
        ipam["host"] = json!(h);
    }
    if let Some(d) = &o.data_dir {
        ipam["dataDir"] = json!(d);
    }
    if !o.subnets.is_empty() {
        ipam["ranges"] = ranges(&o.subnets);
    }
    json!({
        "type": "ipsec-mesh-bridge",
        "bridge": o.bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipMasq": o.masquerade,
        "mtu": o.mtu,
        "capabilities": { "ips": true, "mac": true },
        "ipam": ipam,
    })
}

/// The reference `portmap` plugin's entry.
pub fn portmap() -> Value {
    json!({ "type": "portmap", "capabilities": { "portMappings": true } })
}

/// The whole document.
pub fn config(o: &Options) -> Value {
    if o.conflist {
        let mut plugins = vec![plugin(o)];
        if o.portmap {
            plugins.push(portmap());
        }
        let mut doc = json!({ "cniVersion": VERSION, "name": o.name, "plugins": plugins });
        if !o.subnets.is_empty() {
            doc["args"] = json!({ "podman_labels": {
                LABEL_SUBNETS: joined(o.subnets.iter().map(ToString::to_string)),
                LABEL_GATEWAYS: joined(gateways(&o.subnets)),
            }});
        }
        doc
    } else {
        let mut p = plugin(o);
        if let Some(m) = p.as_object_mut() {
            // A single .conf has no capabilities to declare to the runtime in most runtimes;
            // keep it plain.
            m.remove("capabilities");
        }
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
            portmap: true,
            masquerade: true,
            subnets: vec![
                "10.42.1.0/24".parse().unwrap(),
                "10.43.1.0/24".parse().unwrap(),
            ],
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
        assert!(v.get("capabilities").is_none());
    }

    #[test]
    fn portmap_masquerade_capabilities_and_ranges() {
        let v = config(&opts(true));
        let p = &v["plugins"];
        assert_eq!(p.as_array().unwrap().len(), 2);
        assert_eq!(
            p[1],
            json!({"type": "portmap", "capabilities": {"portMappings": true}})
        );
        assert_eq!(p[0]["ipMasq"], true);
        assert_eq!(p[0]["capabilities"], json!({"ips": true, "mac": true}));
        assert_eq!(
            p[0]["ipam"]["ranges"],
            json!([[{"subnet": "10.42.1.0/24", "gateway": "10.42.1.1"}],
                   [{"subnet": "10.43.1.0/24", "gateway": "10.43.1.1"}]])
        );
        assert_eq!(
            v["args"]["podman_labels"],
            json!({LABEL_SUBNETS: "10.42.1.0/24,10.43.1.0/24",
                   LABEL_GATEWAYS: "10.42.1.1,10.43.1.1"})
        );
        // Opt-outs.
        let v = config(&Options {
            portmap: false,
            masquerade: false,
            ..opts(true)
        });
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(v["plugins"][0]["ipMasq"], false);
        // The generated ipam section parses, ranges included, and says the same subnets.
        let mut conf = v["plugins"][0].clone();
        conf["cniVersion"] = v["cniVersion"].clone();
        conf["name"] = v["name"].clone();
        let nc = super::super::config::NetConf::parse(conf.to_string().as_bytes()).unwrap();
        let ipam = super::super::config::IpamConf::parse(&nc).unwrap();
        assert_eq!(ipam.ranges, opts(true).subnets);
    }
}
