//! VXLAN driver benchmark (root; fresh network namespaces per case). Prints numbers.
//! Run: `cargo bench --bench vxlan` (as root).
//!
//! For N peers: ipsec-mesh's first reconcile vs `ip -batch` + `bridge -batch` creating the
//! same device and objects (2 FDB entries, 1 neighbour, 1 route per peer), then a no-op
//! reconcile and a reconcile with one host added (writes and time).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use ipsec_mesh::dataplane::netns::{in_new_netns, is_root};
use ipsec_mesh::dataplane::vxlan::{self, desired, VxlanConfig};
use ipsec_mesh::plan::Plan;

mod common;

fn plan_for(peers: usize) -> Plan {
    common::plan_for(peers, Some("vxlan"), None)
}

/// The underlay: a veth holding the self endpoint.
fn underlay() {
    let ok = Command::new("sh")
        .arg("-c")
        .arg("ip link add ul0 type veth peer name ul1 && ip addr add 172.16.0.1/16 dev ul0 && ip link set ul0 up && ip link set ul1 up")
        .status()
        .unwrap()
        .success();
    assert!(ok, "underlay setup failed");
}

/// The same objects as `ip -batch` and `bridge -batch` input.
fn batches(p: &Plan) -> (String, String) {
    let d = desired::desired(p, &VxlanConfig::default(), 0);
    let dev = &d.device;
    let mut ip = format!(
        "link add {} address {} mtu {} type vxlan id {} dstport {} local {} dev ul0 nolearning\n\
         link set dev {} addrgenmode none\nlink set dev {} up\n",
        dev.name, dev.mac, dev.mtu, dev.vni, dev.port, dev.local, dev.name, dev.name
    );
    if let Some(a) = d.address {
        ip.push_str(&format!("addr add {a} dev {}\n", dev.name));
    }
    for (_, n) in &d.neighbours {
        ip.push_str(&format!(
            "neigh add {} lladdr {} dev {} nud permanent\n",
            n.ip, n.mac, dev.name
        ));
    }
    for (_, r) in &d.routes {
        ip.push_str(&format!(
            "route add {} via {} dev {} onlink proto static\n",
            r.dst, r.via, dev.name
        ));
    }
    let mut br = String::new();
    for (_, e) in &d.fdb {
        br.push_str(&format!(
            "fdb append {} dev {} dst {}\n",
            e.mac, dev.name, e.dst
        ));
    }
    (ip, br)
}

fn run_batch(tool: &str, input: &str) {
    let mut child = Command::new(tool)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{tool} -batch failed");
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn case(peers: usize) {
    let p = plan_for(peers);
    let grown = plan_for(peers + 1);
    let (ip, br) = batches(&p);
    let cfg = VxlanConfig::default();
    let objects = desired::desired(&p, &cfg, 0).len();
    in_new_netns(move || {
        underlay();
        let t = Instant::now();
        let first = vxlan::reconcile(&p, &cfg).unwrap();
        let t_first = ms(t);
        assert!(first.ok(), "{:?}", first.errors);
        let t = Instant::now();
        let noop = vxlan::reconcile(&p, &cfg).unwrap();
        let t_noop = ms(t);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let t = Instant::now();
        let cur = rt
            .block_on(async {
                let h = vxlan::connect()?;
                let index = vxlan::find_device(&h, &cfg.dev).await?.expect("device").index;
                vxlan::read_current(&h, index).await
            })
            .unwrap();
        let t_dump = ms(t);
        assert_eq!(cur.fdb.len(), 2 * peers);
        let t = Instant::now();
        let add = vxlan::reconcile(&grown, &cfg).unwrap();
        let t_add = ms(t);
        let t = Instant::now();
        let clean = vxlan::cleanup(&cfg).unwrap();
        let t_clean = ms(t);

        // The same objects through iproute2, in their own fresh namespace.
        let t_ip = in_new_netns(move || {
            underlay();
            let t = Instant::now();
            run_batch("ip", &ip);
            run_batch("bridge", &br);
            ms(t)
        })
        .unwrap();
        println!(
            "peers={peers:>5} objects={objects:>6} | first reconcile {t_first:7.1} ms ({} writes) | ip+bridge -batch {t_ip:7.1} ms | ratio {:.2}x | no-op {t_noop:6.1} ms ({} writes, dump+parse {t_dump:.1} ms) | +1 host {t_add:6.1} ms ({} writes) | cleanup {t_clean:.1} ms ({} writes)",
            first.writes,
            t_ip / t_first,
            noop.writes,
            add.writes,
            clean.writes,
        );
    })
    .unwrap();
}

fn main() {
    if !is_root() {
        eprintln!("SKIP vxlan bench: needs root (network namespaces)");
        return;
    }
    // `cargo test --benches` runs benches with --bench absent; keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if full { &[1_000, 5_000] } else { &[50] };
    for &n in sizes {
        case(n);
    }
}
