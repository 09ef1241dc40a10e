//! The CNI plugins against the real kernel (root only; skips loudly otherwise).
//!
//! Every test builds its own named network namespaces `cn<pid><tag>-*` (removed on drop,
//! pass or fail): `h*` plays the host the plugins run in (through `ip netns exec`), `c*` the
//! containers. No traffic leaves them. The interop tests also need Debian's
//! `containernetworking-plugins` in /usr/lib/cni (they skip loudly without it).

// These tests enter namespaces with `ip netns exec`, not the shared helper.
#[allow(unused_imports)]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::sh;
use serde_json::{json, Value};

type World = common::Namespaces;

const BRIDGE: &str = env!("CARGO_BIN_EXE_ipsec-mesh-bridge");
const MESH: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const REFERENCE: &str = "/usr/lib/cni";

fn our_bin_dir() -> PathBuf {
    Path::new(BRIDGE).parent().unwrap().to_path_buf()
}

use common::cni::{answer, Answer};

impl World {
    fn netns_path(&self, role: &str) -> String {
        format!("/var/run/netns/{}", self.ns(role))
    }

    fn del(&mut self, role: &str) {
        let n = self.ns(role);
        sh(&format!("ip netns del {n}"));
        self.names.retain(|x| *x != n);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Metadata: host-a (192.0.2.1) with 10.42.1.0/24, host-b with 10.42.2.0/24.
    fn write_meta(&self, mtu: u32, backend: &str) -> PathBuf {
        let p = self.path("mesh.json");
        std::fs::write(
            &p,
            json!({
                "network": {"cidr": "10.42.0.0/16", "backend": backend, "mtu": mtu},
                "hosts": [
                    {"id": "host-a", "agent_ip": "192.0.2.1", "subnets": ["10.42.1.0/24"]},
                    {"id": "host-b", "agent_ip": "192.0.2.2", "subnets": ["10.42.2.0/24"]}
                ]
            })
            .to_string(),
        )
        .unwrap();
        p
    }

    /// Run plugin `bin` in host namespace `host` with `CNI_PATH` = `path`.
    #[allow(clippy::too_many_arguments)]
    fn plugin_at(
        &self,
        host: &str,
        bin: &str,
        path: &str,
        cmd: &str,
        container: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
    ) -> Answer {
        let out = spawn_plugin(
            &self.ns(host),
            bin,
            path,
            cmd,
            container,
            netns,
            ifname,
            conf,
        )
        .wait_with_output()
        .unwrap();
        answer(&out)
    }

    /// Our bridge in `host` (CNI_PATH: our binaries, then the reference plugins).
    fn bridge(&self, host: &str, cmd: &str, c: &str, conf: &Value) -> Answer {
        let path = format!("{}:{REFERENCE}", our_bin_dir().display());
        self.plugin_at(
            host,
            BRIDGE,
            &path,
            cmd,
            c,
            &self.netns_path(c),
            "eth0",
            conf,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_plugin(
    host_ns: &str,
    bin: &str,
    path: &str,
    cmd: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    conf: &Value,
) -> std::process::Child {
    common::cni::spawn(
        Some(host_ns),
        bin,
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", path),
            ("IPSEC_MESH_LOG", "info"),
        ],
        &conf.to_string(),
    )
}

#[track_caller]
fn ok(a: &Answer) -> &Value {
    assert!(a.ok, "plugin failed: {}\nstderr: {}", a.json, a.stderr);
    &a.json
}

fn require_reference() {
    common::require_program(
        &format!("{REFERENCE}/bridge"),
        "containernetworking-plugins",
    );
    common::require_program(
        &format!("{REFERENCE}/host-local"),
        "containernetworking-plugins",
    );
}

/// The bridge + IPAM configuration for host-a.
fn mesh_conf(w: &World, extra: Value) -> Value {
    let mut v = json!({
        "cniVersion": "1.0.0", "name": "mesh", "type": "ipsec-mesh-bridge",
        "bridge": "cni0", "isDefaultGateway": true, "hairpinMode": true,
        "ipam": {"type": "ipsec-mesh-ipam", "metadata": w.path("mesh.json"), "host": "host-a",
                 "dataDir": w.path("ipam")}
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

fn link_json(w: &World, role: &str, dev: &str) -> Value {
    let out = w.sh(role, &format!("ip -d -j link show dev {dev}"));
    serde_json::from_str::<Value>(&out).unwrap()[0].clone()
}

fn addrs(w: &World, role: &str, dev: &str) -> Vec<String> {
    let out = w.sh(role, &format!("ip -j addr show dev {dev}"));
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

fn allocations(w: &World) -> usize {
    let p = w.path("ipam/allocations.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice::<Value>(&b).unwrap()["allocations"]
            .as_object()
            .unwrap()
            .len(),
        Err(_) => 0,
    }
}

fn pings(w: &World, role: &str, dst: &str) -> bool {
    (0..3).any(|_| w.try_sh(role, &format!("ping -c 1 -W 1 {dst}")))
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn add_check_del_cycle() {
    require_root!();
    let mut w = World::new("cn", "cyc");
    w.add("h");
    w.add("c1");
    w.add("c2");
    w.write_meta(1500, "ipsec");
    let conf = mesh_conf(&w, json!({}));

    let r = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["ips"][0]["address"], "10.42.1.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.42.1.1");
    assert_eq!(r["ips"][0]["interface"], 2);
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs[0]["name"], "cni0");
    assert!(ifs[1]["name"].as_str().unwrap().starts_with("veth"));
    assert_eq!(ifs[2]["name"], "eth0");
    assert_eq!(ifs[2]["sandbox"], w.netns_path("c1"));
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.42.1.1"}])
    );

    // The kernel agrees: the mesh MTU (1500 - ESP/aes256gcm16 overhead), addresses, the
    // default route, the bridge as gateway, hairpin on the port.
    let c = link_json(&w, "c1", "eth0");
    assert_eq!(c["mtu"], 1446, "{c}");
    assert_eq!(c["address"], ifs[2]["mac"]);
    assert!(c["flags"].to_string().contains("UP"), "{c}");
    assert_eq!(addrs(&w, "c1", "eth0"), ["10.42.1.2/24"]);
    assert!(w
        .sh("c1", "ip route show default")
        .contains("default via 10.42.1.1 dev eth0"));
    assert_eq!(addrs(&w, "h", "cni0"), ["10.42.1.1/24"]);
    let hv = ifs[1]["name"].as_str().unwrap();
    let h = link_json(&w, "h", hv);
    assert_eq!(h["master"], "cni0", "{h}");
    assert_eq!(h["mtu"], 1446);
    assert_eq!(h["linkinfo"]["info_slave_data"]["hairpin"], true, "{h}");
    assert_eq!(w.sh("h", "cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert!(pings(&w, "c1", "10.42.1.1"), "container -> gateway");

    // ADD again: same result, nothing new.
    let again = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(again, r);
    assert_eq!(addrs(&w, "c1", "eth0"), ["10.42.1.2/24"]);

    // A second container: the next address; the two reach each other over the bridge.
    let r2 = ok(&w.bridge("h", "ADD", "c2", &conf)).clone();
    assert_eq!(r2["ips"][0]["address"], "10.42.1.3/24");
    assert!(pings(&w, "c1", "10.42.1.3"), "c1 -> c2");

    // CHECK passes, then notices a removed address.
    ok(&w.bridge("h", "CHECK", "c1", &with_prev(&conf, &r)));
    w.sh("c1", "ip addr del 10.42.1.2/24 dev eth0");
    let a = w.bridge("h", "CHECK", "c1", &with_prev(&conf, &r));
    assert!(!a.ok);
    assert_eq!(a.json["code"], 105, "{}", a.json);
    assert!(
        a.json["msg"].as_str().unwrap().contains("10.42.1.2/24"),
        "{}",
        a.json
    );
    // CHECK without prevResult is a configuration error.
    assert_eq!(w.bridge("h", "CHECK", "c1", &conf).json["code"], 7);

    // DEL: veth gone on both sides, address released; DEL again is fine.
    assert_eq!(allocations(&w), 2);
    assert_eq!(ok(&w.bridge("h", "DEL", "c1", &conf)), &Value::Null);
    assert!(!w.try_sh("c1", "ip link show eth0"));
    assert!(!w.try_sh("h", &format!("ip link show {hv}")));
    assert_eq!(allocations(&w), 1);
    ok(&w.bridge("h", "DEL", "c1", &conf));

    // DEL after the namespace is gone.
    let hv2 = r2["interfaces"][1]["name"].as_str().unwrap().to_string();
    w.del("c2");
    ok(&w.bridge("h", "DEL", "c2", &conf));
    assert!(!w.try_sh("h", &format!("ip link show {hv2}")));
    assert_eq!(allocations(&w), 0);
    // The bridge and its gateway address stay for the next container.
    assert_eq!(addrs(&w, "h", "cni0"), ["10.42.1.1/24"]);
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn mtu_overhead_mac_and_an_adopted_bridge() {
    require_root!();
    let mut w = World::new("cn", "mtu");
    w.add("h");
    w.add("c1");
    w.add("c2");
    w.write_meta(1500, "ipsec");
    // An existing bridge (MTU 1500) is adopted as it is.
    w.sh(
        "h",
        "ip link add br-mesh type bridge && ip link set br-mesh up",
    );
    let conf = mesh_conf(
        &w,
        json!({"bridge": "br-mesh", "linkMTUOverhead": 100, "mac": "0a:58:0a:2a:01:63",
               "hairpinMode": false}),
    );
    let r = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(r["interfaces"][0]["name"], "br-mesh");
    assert_eq!(r["interfaces"][2]["mac"], "0a:58:0a:2a:01:63");
    let c = link_json(&w, "c1", "eth0");
    assert_eq!(c["mtu"], 1400, "linkMTUOverhead is applied: 1500 - 100");
    assert_eq!(c["address"], "0a:58:0a:2a:01:63");
    let hv = r["interfaces"][1]["name"].as_str().unwrap();
    assert_eq!(
        link_json(&w, "h", hv)["linkinfo"]["info_slave_data"]["hairpin"],
        false
    );
    assert_eq!(
        link_json(&w, "h", "br-mesh")["linkinfo"]["info_kind"],
        "bridge"
    );

    // Explicit mtu and a vxlan mesh's planner MTU (1500 - 50).
    let conf = mesh_conf(&w, json!({"bridge": "br-mesh", "mtu": 1300}));
    ok(&w.bridge("h", "ADD", "c2", &conf));
    assert_eq!(link_json(&w, "c2", "eth0")["mtu"], 1300);
    ok(&w.bridge("h", "DEL", "c2", &conf));
    w.write_meta(1500, "vxlan");
    let conf = mesh_conf(&w, json!({"bridge": "br-mesh"}));
    ok(&w.bridge("h", "ADD", "c2", &conf));
    assert_eq!(link_json(&w, "c2", "eth0")["mtu"], 1450);
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn a_foreign_interface_is_refused_and_the_address_given_back() {
    require_root!();
    let mut w = World::new("cn", "cfl");
    w.add("h");
    w.add("c1");
    w.write_meta(1500, "ipsec");
    // Someone else's eth0 (not a veth).
    w.sh("c1", "ip link add eth0 type bridge");
    let conf = mesh_conf(&w, json!({}));
    let a = w.bridge("h", "ADD", "c1", &conf);
    assert!(!a.ok);
    assert_eq!(a.json["code"], 108, "{}", a.json);
    assert!(
        a.json["msg"].as_str().unwrap().contains("eth0"),
        "{}",
        a.json
    );
    assert_eq!(allocations(&w), 0, "the failed ADD released its address");
    // DEL leaves a non-veth interface alone.
    ok(&w.bridge("h", "DEL", "c1", &conf));
    assert!(w.try_sh("c1", "ip link show eth0"));
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn twenty_concurrent_adds_get_twenty_addresses() {
    require_root!();
    let mut w = World::new("cn", "par");
    w.add("h");
    let n = 20;
    for i in 0..n {
        w.add(&format!("c{i}"));
    }
    w.write_meta(1500, "ipsec");
    let conf = mesh_conf(&w, json!({}));
    let path = format!("{}:{REFERENCE}", our_bin_dir().display());
    // All processes start before any is waited for; none of them finds the bridge.
    let children: Vec<_> = (0..n)
        .map(|i| {
            let c = format!("c{i}");
            spawn_plugin(
                &w.ns("h"),
                BRIDGE,
                &path,
                "ADD",
                &c,
                &w.netns_path(&c),
                "eth0",
                &conf,
            )
        })
        .collect();
    let answers: Vec<Answer> = children
        .into_iter()
        .map(|c| answer(&c.wait_with_output().unwrap()))
        .collect();
    let mut ips: Vec<String> = answers
        .iter()
        .map(|a| ok(a)["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), n, "distinct addresses: {ips:?}");
    assert_eq!(allocations(&w), n);
    assert!(!ips
        .iter()
        .any(|ip| ip == "10.42.1.1/24" || ip == "10.42.1.0/24"));
    // One bridge, one gateway address, every container on it.
    assert_eq!(addrs(&w, "h", "cni0"), ["10.42.1.1/24"]);
    let ports = w.sh("h", "ip -o link show master cni0");
    assert_eq!(ports.lines().count(), n, "{ports}");
    assert!(pings(&w, "c0", ips[n - 1].split('/').next().unwrap()));

    // And 20 concurrent DELs release everything.
    let children: Vec<_> = (0..n)
        .map(|i| {
            let c = format!("c{i}");
            spawn_plugin(
                &w.ns("h"),
                BRIDGE,
                &path,
                "DEL",
                &c,
                &w.netns_path(&c),
                "eth0",
                &conf,
            )
        })
        .collect();
    for c in children {
        ok(&answer(&c.wait_with_output().unwrap()));
    }
    assert_eq!(allocations(&w), 0);
    assert!(w.sh("h", "ip -o link show master cni0").is_empty());
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn reference_bridge_with_our_ipam() {
    require_root!();
    require_reference();
    let mut w = World::new("cn", "rb");
    w.add("h");
    w.add("c1");
    w.write_meta(1500, "ipsec");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "mesh", "type": "bridge", "bridge": "cni0",
        "isGateway": true, "mtu": 1446,
        "ipam": {"type": "ipsec-mesh-ipam", "metadata": w.path("mesh.json"), "host": "host-a",
                 "dataDir": w.path("ipam"), "routes": [{"dst": "0.0.0.0/0"}]}
    });
    let path = format!("{REFERENCE}:{}", our_bin_dir().display());
    let run = |cmd: &str, conf: &Value| {
        w.plugin_at(
            "h",
            &format!("{REFERENCE}/bridge"),
            &path,
            cmd,
            "c1",
            &w.netns_path("c1"),
            "eth0",
            conf,
        )
    };
    let r = ok(&run("ADD", &conf)).clone();
    assert_eq!(r["ips"][0]["address"], "10.42.1.2/24", "{r}");
    assert_eq!(r["ips"][0]["gateway"], "10.42.1.1");
    assert_eq!(addrs(&w, "c1", "eth0"), ["10.42.1.2/24"]);
    assert_eq!(addrs(&w, "h", "cni0"), ["10.42.1.1/24"]);
    // The default route came from our IPAM's `routes`.
    assert!(w
        .sh("c1", "ip route show default")
        .contains("default via 10.42.1.1 dev eth0"));
    assert!(pings(&w, "c1", "10.42.1.1"));
    ok(&run("CHECK", &with_prev(&conf, &r)));
    ok(&run("DEL", &conf));
    assert_eq!(allocations(&w), 0);
    ok(&run("DEL", &conf));
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn our_bridge_with_reference_host_local() {
    require_root!();
    require_reference();
    let mut w = World::new("cn", "hl");
    w.add("h");
    w.add("c1");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "plain", "type": "ipsec-mesh-bridge", "bridge": "cni9",
        "isDefaultGateway": true, "mtu": 1400,
        "ipam": {"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": w.path("hl")}
    });
    let r = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(r["ips"][0]["address"], "10.99.0.2/24", "{r}");
    assert_eq!(addrs(&w, "c1", "eth0"), ["10.99.0.2/24"]);
    assert_eq!(link_json(&w, "c1", "eth0")["mtu"], 1400);
    assert!(pings(&w, "c1", "10.99.0.1"));
    ok(&w.bridge("h", "CHECK", "c1", &with_prev(&conf, &r)));
    ok(&w.bridge("h", "DEL", "c1", &conf));
    ok(&w.bridge("h", "DEL", "c1", &conf));
    assert!(!w.try_sh("c1", "ip link show eth0"));
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn cni_config_output_drives_the_plugins() {
    require_root!();
    let mut w = World::new("cn", "cfg");
    w.add("h");
    w.add("c1");
    let meta = w.write_meta(1500, "ipsec");
    let out = Command::new(MESH)
        .args([
            "cni-config",
            "--metadata",
            meta.to_str().unwrap(),
            "--host",
            "host-a",
        ])
        .args(["--data-dir", w.path("ipam").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    // What a runtime does with a conflist: each plugin gets cniVersion and name.
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    assert_eq!(conf["mtu"], 1446);
    assert_eq!(conf["ipMasq"], true);
    assert_eq!(list["plugins"][1]["type"], "portmap");
    let r = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(r["ips"][0]["address"], "10.42.1.2/24");
    assert!(pings(&w, "c1", "10.42.1.1"));
    // The masquerade table exists while a container is attached, and goes with the last one.
    let masq = || {
        w.sh("h", "nft list tables")
            .lines()
            .filter(|l| l.contains("ipsec_mesh_masq_"))
            .count()
    };
    assert_eq!(masq(), 1);
    ok(&w.bridge("h", "DEL", "c1", &conf));
    assert_eq!(masq(), 0);
}

/// Two hosts of a vxlan mesh, containers attached by our plugins, the mesh by
/// `ipsec-mesh apply --driver vxlan`: the containers reach each other across hosts.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn containers_on_two_hosts_reach_each_other_over_vxlan() {
    require_root!();
    let mut w = World::new("cn", "x");
    let sw = w.add("sw");
    sh(&format!(
        "ip -n {sw} link add br0 type bridge && ip -n {sw} link set br0 up"
    ));
    let meta = w.write_meta(1500, "vxlan");
    for (n, host) in [(1, "host-a"), (2, "host-b")] {
        let h = w.add(&format!("h{n}"));
        w.add(&format!("c{n}"));
        sh(&format!(
            "ip link add u{n} netns {h} type veth peer name sw{n} netns {sw} && \
             ip -n {sw} link set sw{n} master br0 && ip -n {sw} link set sw{n} up && \
             ip -n {h} link set u{n} up && ip -n {h} addr add 192.0.2.{n}/24 dev u{n}"
        ));
        let mut conf = mesh_conf(&w, json!({}));
        conf["ipam"]["host"] = json!(host);
        conf["ipam"]["dataDir"] = json!(w.path(&format!("ipam{n}")));
        let r = ok(&w.bridge(&format!("h{n}"), "ADD", &format!("c{n}"), &conf)).clone();
        assert_eq!(r["ips"][0]["address"], format!("10.42.{n}.2/24"));
        assert_eq!(link_json(&w, &format!("c{n}"), "eth0")["mtu"], 1450);
        let out = Command::new("ip")
            .args(["netns", "exec", &h, MESH, "apply", "--metadata"])
            .arg(&meta)
            .args(["--host", host, "--driver", "vxlan"])
            .env("IPSEC_MESH_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "apply on {host}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(pings(&w, "c1", "10.42.2.2"), "c1 -> c2 across the mesh");
    assert!(pings(&w, "c2", "10.42.1.2"), "c2 -> c1 across the mesh");
}

/// Global IPv6 addresses of `dev` in `role` (`address/len`).
fn addrs6(w: &World, role: &str, dev: &str) -> Vec<String> {
    let out = w.sh(role, &format!("ip -j addr show dev {dev}"));
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["family"] == "inet6" && a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect()
}

/// The shape of a CNI result's `ips`: per entry its keys and the address family.
fn ips_shape(r: &Value) -> Vec<(Vec<String>, bool)> {
    r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            let mut keys: Vec<String> = ip.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            (keys, ip["address"].as_str().unwrap().contains(':'))
        })
        .collect()
}

/// Issue 18 item 2: a dual-stack host (an IPv4 and an IPv6 subnet in a network with both
/// cidrs): our bridge with our IPAM gives the container one address per family, the result
/// lists both `ips` (with `interface` and `gateway`, in the shape the reference bridge with
/// host-local gives for two ranges), the bridge holds a gateway per family, the container has
/// a default route per family; CHECK and DEL handle both.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn dual_stack_add_check_del_like_the_reference_plugins() {
    require_root!();
    require_reference();
    let mut w = World::new("cn", "ds");
    w.add("h");
    w.add("c1");
    w.add("c2");
    w.add("r1");
    std::fs::write(
        w.path("mesh.json"),
        json!({
            "network": {"cidr": ["10.42.0.0/16", "fd42::/48"], "backend": "ipsec", "mtu": 1500},
            "hosts": [
                {"id": "host-a", "agent_ip": "192.0.2.1",
                 "subnets": ["10.42.1.0/24", "fd42:0:0:1::/64"]},
                {"id": "host-b", "agent_ip": "192.0.2.2",
                 "subnets": ["10.42.2.0/24", "fd42:0:0:2::/64"]}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let conf = mesh_conf(&w, json!({}));
    let r = ok(&w.bridge("h", "ADD", "c1", &conf)).clone();
    assert_eq!(
        r["ips"],
        json!([
            {"address": "10.42.1.2/24", "gateway": "10.42.1.1", "interface": 2},
            {"address": "fd42:0:0:1::2/64", "gateway": "fd42:0:0:1::1", "interface": 2}
        ]),
        "{r}"
    );
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.42.1.1"}, {"dst": "::/0", "gw": "fd42:0:0:1::1"}]),
        "{r}"
    );
    assert_eq!(addrs(&w, "c1", "eth0"), ["10.42.1.2/24"]);
    assert_eq!(addrs6(&w, "c1", "eth0"), ["fd42:0:0:1::2/64"]);
    assert_eq!(addrs(&w, "h", "cni0"), ["10.42.1.1/24"]);
    assert_eq!(addrs6(&w, "h", "cni0"), ["fd42:0:0:1::1/64"]);
    assert!(w
        .sh("c1", "ip -6 route show default")
        .contains("default via fd42:0:0:1::1 dev eth0"));
    assert_eq!(
        w.sh("h", "cat /proc/sys/net/ipv6/conf/all/forwarding")
            .trim(),
        "1"
    );
    // The same MTU for both families (one underlay family).
    assert_eq!(link_json(&w, "c1", "eth0")["mtu"], 1446);
    // ADD again: the same answer; a second container: the next address of each family.
    assert_eq!(ok(&w.bridge("h", "ADD", "c1", &conf)), &r);
    let r2 = ok(&w.bridge("h", "ADD", "c2", &conf)).clone();
    assert_eq!(r2["ips"][0]["address"], "10.42.1.3/24");
    assert_eq!(r2["ips"][1]["address"], "fd42:0:0:1::3/64");
    assert!(pings(&w, "c1", "10.42.1.3"), "c1 -> c2 over IPv4");
    assert!(pings(&w, "c1", "fd42:0:0:1::3"), "c1 -> c2 over IPv6");

    // The reference bridge with host-local and one range per family: the same shape.
    let reference = json!({
        "cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni8",
        "isDefaultGateway": true,
        "ipam": {"type": "host-local", "dataDir": w.path("hl"),
                 "ranges": [[{"subnet": "10.99.0.0/24"}], [{"subnet": "fd99::/64"}]]}
    });
    let rr = ok(&w.plugin_at(
        "h",
        &format!("{REFERENCE}/bridge"),
        REFERENCE,
        "ADD",
        "r1",
        &w.netns_path("r1"),
        "eth0",
        &reference,
    ))
    .clone();
    assert_eq!(ips_shape(&r), ips_shape(&rr), "ours {r}\nreference {rr}");
    assert_eq!(r["ips"][0]["interface"], rr["ips"][0]["interface"]);
    assert_eq!(
        r["interfaces"].as_array().unwrap().len(),
        rr["interfaces"].as_array().unwrap().len()
    );

    // CHECK passes, then notices a removed IPv6 address.
    ok(&w.bridge("h", "CHECK", "c1", &with_prev(&conf, &r)));
    w.sh("c1", "ip addr del fd42:0:0:1::2/64 dev eth0");
    let a = w.bridge("h", "CHECK", "c1", &with_prev(&conf, &r));
    assert!(!a.ok);
    assert_eq!(a.json["code"], 105, "{}", a.json);
    assert!(
        a.json["msg"].as_str().unwrap().contains("fd42:0:0:1::2"),
        "{}",
        a.json
    );
    // DEL releases both addresses of c1; the bridge keeps both gateways.
    assert_eq!(allocations(&w), 4);
    ok(&w.bridge("h", "DEL", "c1", &conf));
    assert!(!w.try_sh("c1", "ip link show eth0"));
    assert_eq!(allocations(&w), 2);
    ok(&w.bridge("h", "DEL", "c2", &conf));
    assert_eq!(allocations(&w), 0);
    assert_eq!(addrs6(&w, "h", "cni0"), ["fd42:0:0:1::1/64"]);
    ok(&w.plugin_at(
        "h",
        &format!("{REFERENCE}/bridge"),
        REFERENCE,
        "DEL",
        "r1",
        &w.netns_path("r1"),
        "eth0",
        &reference,
    ));
}
