//! The charon driver with IPv6 endpoints (issue 18): real charon-systemd per host, IKEv2 and
//! ESP-in-UDP over an IPv6-only underlay, carrying the IPv4 overlay (ESP in userspace through
//! kernel-libipsec: this machine's kernel has no ESP, /work/shared/TESTBED.md).
//!
//! Topology, in namespaces `c6<pid>t-*` (removed when the test ends, pass or fail):
//!
//! ```text
//!   sw        bridge br0: the underlay switch
//!   a  b      hosts host-a/host-b: eth0 fd77::N/64 nodad (no IPv4 on the underlay), cbr0
//!             10.42.N.1/24, ip_forward=1, charon-systemd with charon-conf/strongswan-libipsec.conf
//!   ac bc     containers: eth0 10.42.N.2/24, default via 10.42.N.1
//! ```

// tests/common re-exports in_new_netns, which this suite does not use.
#[allow(unused_imports)]
mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::sh;

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");

/// The lab: namespaces (deleted on drop) and the charons (stopped on drop, first).
struct Lab {
    charons: Vec<Option<Child>>,
    ns: common::Namespaces,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.charons {
            common::charon_stop(c);
        }
    }
}

const HOSTS: [&str; 2] = ["a", "b"];

impl Lab {
    fn new() -> Lab {
        common::require_program(common::CHARON, "charon-systemd");
        common::require_program("/usr/sbin/swanctl", "strongswan-swanctl");
        let mut ns = common::Namespaces::new("c6", "t");
        let sw = ns.add("sw");
        sh(&format!(
            "ip -n {sw} link add br0 type bridge && ip -n {sw} link set br0 up"
        ));
        let mut charons = Vec::new();
        for (i, l) in HOSTS.iter().enumerate() {
            let n = i + 1;
            let h = ns.add(l);
            let c = ns.add(&format!("{l}c"));
            sh(&format!(
                "ip link add eth0 netns {h} type veth peer name p{l} netns {sw} && \
                 ip -n {sw} link set p{l} master br0 up && \
                 ip -n {h} addr add fd77::{n}/64 dev eth0 nodad && ip -n {h} link set eth0 up && \
                 ip -n {h} link add cbr0 type bridge && ip -n {h} addr add 10.42.{n}.1/24 dev cbr0 && \
                 ip -n {h} link set cbr0 up && \
                 ip link add veth0 netns {h} type veth peer name eth0 netns {c} && \
                 ip -n {h} link set veth0 master cbr0 up && \
                 ip -n {c} addr add 10.42.{n}.2/24 dev eth0 && ip -n {c} link set eth0 up && \
                 ip -n {c} route add default via 10.42.{n}.1 && \
                 ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1"
            ));
            let dir = ns.dir.path().join(l);
            std::fs::create_dir_all(&dir).unwrap();
            let conf = common::write_charon_conf(&dir, "strongswan-libipsec.conf");
            charons.push(Some(common::charon_start(&h, &conf)));
        }
        let lab = Lab { charons, ns };
        for l in HOSTS {
            let sock = lab.socket(l);
            let t = Instant::now();
            while !sock.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "charon of {l}: no VICI socket {} after 10 s",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        lab
    }

    fn socket(&self, l: &str) -> PathBuf {
        self.ns.dir.path().join(l).join("charon.vici")
    }

    fn meta(&self) -> PathBuf {
        self.ns.dir.path().join("meta.json")
    }

    fn psk(&self) -> PathBuf {
        self.ns.dir.path().join("psk")
    }

    /// `ipsec-mesh ARGS --driver charon --vici-socket <l's>` in host `l`.
    fn mesh(&self, l: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.ns(l), BIN])
            .args(args)
            .args(["--driver", "charon", "--vici-socket"])
            .arg(self.socket(l))
            .env("IPSEC_MESH_LOG", "warn")
            .output()
            .unwrap()
    }

    fn apply(&self, l: &str) -> Output {
        self.mesh(
            l,
            &[
                "apply",
                "--metadata",
                self.meta().to_str().unwrap(),
                "--host",
                &format!("host-{l}"),
                "--psk-file",
                self.psk().to_str().unwrap(),
                "--diff",
            ],
        )
    }

    fn swanctl(&self, l: &str, what: &str) -> String {
        self.ns.sh(
            l,
            &format!(
                "swanctl {what} --uri unix://{} 2>/dev/null",
                self.socket(l).display()
            ),
        )
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes from apply's summary line (`charon: host host-a: 1 peers, N writes, 0 errors`).
fn writes(o: &Output) -> usize {
    let out = String::from_utf8_lossy(&o.stdout);
    let l = out
        .lines()
        .find(|l| l.starts_with("charon: host"))
        .unwrap_or_else(|| panic!("no summary: {}", text(o)));
    l.split(", ")
        .find(|p| p.ends_with(" writes"))
        .unwrap()
        .trim_end_matches(" writes")
        .parse()
        .unwrap()
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn two_hosts_ike_and_esp_over_an_ipv6_underlay_carry_the_ipv4_overlay() {
    require_root!();
    let lab = Lab::new();
    std::fs::write(
        lab.meta(),
        r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[
            {"id":"host-a","agent_ip":"fd77::1","subnets":["10.42.1.0/24"]},
            {"id":"host-b","agent_ip":"fd77::2","subnets":["10.42.2.0/24"]}]}"#,
    )
    .unwrap();
    std::fs::write(lab.psk(), "charon-over-ipv6-test-secret-0123456789abcdef").unwrap();
    std::fs::set_permissions(
        lab.psk(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(
        !lab.ns.sh("a", "ip -4 addr show dev eth0").contains("inet "),
        "the underlay must be IPv6-only"
    );

    // b first (its initiate may find no conn on a yet: reported, not fatal), then a, whose
    // conn to b comes up; a second round on b must then succeed.
    let _ = lab.apply("b");
    let o = lab.apply("a");
    assert!(o.status.success(), "{}", text(&o));
    let o = lab.apply("b");
    assert!(o.status.success(), "{}", text(&o));

    let conns = lab.swanctl("a", "--list-conns");
    assert!(
        conns.contains("local:  fd77::1") && conns.contains("remote: fd77::2"),
        "conn endpoints are not the IPv6 agent IPs:\n{conns}"
    );
    for (from, to) in [("ac", "10.42.2.2"), ("bc", "10.42.1.2")] {
        assert!(
            lab.ns
                .try_sh(from, &format!("ping -c 2 -i 0.2 -W 2 -w 6 {to}")),
            "{from} -> {to} over the IPv6 underlay\n{}",
            lab.swanctl("a", "--list-sas")
        );
    }
    let sas = lab.swanctl("a", "--list-sas");
    assert!(
        sas.contains("fd77::1[4500]") && sas.contains("fd77::2[4500]"),
        "IKE SA not over IPv6 (ESP-in-UDP port 4500):\n{sas}"
    );
    assert!(
        sas.contains("TUNNEL-in-UDP")
            && sas.contains("local  10.42.1.0/24")
            && sas.contains("remote 10.42.2.0/24"),
        "CHILD_SA selectors:\n{sas}"
    );
    let packets_in: Vec<u64> = sas
        .lines()
        .filter(|l| l.trim_start().starts_with("in "))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| x.starts_with("packets"))
                .and_then(|i| w[i - 1].parse().ok())
        })
        .collect();
    assert!(
        packets_in.iter().any(|p| *p >= 2),
        "no inbound ESP packets counted on the CHILD_SA:\n{sas}"
    );

    // Nothing changed: nothing written.
    for l in HOSTS {
        let o = lab.apply(l);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(writes(&o), 0, "{}", text(&o));
    }

    // Cleanup unloads our conns from both charons.
    for l in HOSTS {
        let o = lab.mesh(l, &["cleanup"]);
        assert!(o.status.success(), "{}", text(&o));
        let conns = lab.swanctl(l, "--list-conns");
        assert!(!conns.contains("ipsec-mesh-"), "{conns}");
    }
}
