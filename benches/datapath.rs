//! Per-packet cost of the host's whole outbound path (netfilter mark chain, policy routing,
//! XFRM policy lookup) against the mesh size (root; a fresh network namespace per case).
//! Prints numbers. Run: `cargo bench --bench datapath` (as root).
//!
//! Cluster shape: Rancher's. Every host has 10 container /32s drawn at random (fixed seed,
//! no duplicates) from the overlay 10.0.0.0/8, so a host's addresses never aggregate; agent
//! IPs in 172.16.0.0/16. For 1, 1,000 and 5,000 peers, side by side in one run:
//! - `ipsec-mesh`: `ipsec-mesh apply --driver xfrm` for host 0 (policies, firewall, routes;
//!   on a kernel without ESP no SA, so a packet to a peer is dropped right after its policy
//!   resolved: the lookup is all that is measured);
//! - `mark-per-peer`: the O(peers)-objects alternative that was measured and not chosen: one
//!   wildcard out policy per peer selected by a per-peer mark (`ip -batch`), the packets
//!   carrying the last peer's mark.
//!
//! Traffic: a UDP socket sends 64-byte datagrams (1) to a container of the last peer
//! (overlay; the firewall marks it, policy routing and the XFRM lookup select the peer) and
//! (2) to an address outside the overlay over the same veth (non-overlay traffic, which
//! walks the same mark chain and XFRM lookup and must not pay for the mesh). All six cases
//! stay set up side by side (a namespace and a thread each) and are measured in turns,
//! `ROUNDS` rounds of `SENDS` sends each, so machine noise hits every case alike; printed:
//! the median rate and the median of the per-round ratios to the 1-peer case of the same
//! shape. Overlay sends are checked to have resolved a peer's policy (XfrmOutNoStates rises
//! by one per send on a kernel without ESP). Traffic stays on a veth pair inside the
//! namespaces made here (the far end drops it).

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use ipsec_mesh::dataplane::netns::is_root;

const SENDS: u32 = 20_000;
const ROUNDS: usize = 15;
const CONTAINERS: usize = 10;

/// Metadata of `hosts` hosts with `CONTAINERS` random /32s each in 10.0.0.0/8.
fn rancher_shaped(hosts: usize) -> (String, Vec<Vec<String>>) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut used = std::collections::HashSet::new();
    let mut all = Vec::new();
    for _ in 0..hosts {
        let mut mine = Vec::new();
        while mine.len() < CONTAINERS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x >> 8) as u32 & 0x00ff_ffff;
            if a & 0xff == 0 || a & 0xff == 0xff || !used.insert(a) {
                continue;
            }
            mine.push(format!("10.{}.{}.{}", a >> 16, (a >> 8) & 0xff, a & 0xff));
        }
        all.push(mine);
    }
    let hosts_json: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(i, subnets)| {
            let s: Vec<String> = subnets.iter().map(|a| format!("\"{a}/32\"")).collect();
            format!(
                r#"{{"id":"host-{i:05}","agent_ip":"172.16.{}.{}","subnets":[{}]}}"#,
                i / 250,
                i % 250 + 1,
                s.join(",")
            )
        })
        .collect();
    (
        format!(
            r#"{{"network":{{"cidr":"10.0.0.0/8"}},"hosts":[{}]}}"#,
            hosts_json.join(",")
        ),
        all,
    )
}

fn sh(cmd: &str) {
    let o = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn ip_batch(lines: &str) {
    let mut c = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
}

/// Underlay: ul0 172.16.0.1/16 to a veth peer that drops everything, and a default route over
/// it as a host has (host-sent packets need some route before the mangle OUTPUT mark can
/// re-route them into table 1042).
fn underlay() {
    sh(
        "ip link set lo up && ip link add ul0 type veth peer name ul1 \
        && ip addr add 172.16.0.1/16 dev ul0 && ip link set ul0 up && ip link set ul1 up \
        && ip route add default via 172.16.255.254 dev ul0 \
        && ip neigh add 172.16.255.254 lladdr 02:00:00:00:00:fe dev ul0",
    );
}

/// Send rate (datagrams per second) of `SENDS` sends to `dst` with socket mark `mark`.
fn rate(dst: &str, mark: u32) -> f64 {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    if mark != 0 {
        // SAFETY: setsockopt with a valid fd and a u32 option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
    }
    let to: SocketAddr = format!("{dst}:9").parse().unwrap();
    let before = xfrm_stat("XfrmOutNoStates");
    let buf = [0u8; 64];
    let t = Instant::now();
    for _ in 0..SENDS {
        let _ = s.send_to(&buf, to);
    }
    let rate = f64::from(SENDS) / t.elapsed().as_secs_f64();
    // Overlay sends must have resolved a peer's policy (no SA on this kernel: dropped as
    // XfrmOutNoStates); the others must not have.
    let resolved = xfrm_stat("XfrmOutNoStates") - before;
    let overlay = mark != 0 || dst.starts_with("10.");
    let all = u64::from(SENDS);
    assert!(
        if overlay {
            resolved == all
        } else {
            resolved == 0
        },
        "{dst}: {resolved} of {all} sends resolved a policy without a state"
    );
    rate
}

fn xfrm_stat(key: &str) -> u64 {
    // /proc/net is the netns of the process's main thread; this thread has its own.
    std::fs::read_to_string("/proc/thread-self/net/xfrm_stat")
        .unwrap()
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(key)).then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or(0)
}

/// One case, set up in its own namespace on its own thread; measured on request.
struct Case {
    policies: usize,
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<(f64, f64)>,
}

impl Case {
    /// `setup` runs in the fresh namespace and returns the policy count, the overlay target
    /// and the socket mark to send it with.
    fn spawn(setup: impl FnOnce() -> (usize, String, u32) + Send + 'static) -> Case {
        let (go, go_rx) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            underlay();
            let (policies, target, mark) = setup();
            ready_tx.send(policies).unwrap();
            while go_rx.recv().is_ok() {
                let r = (rate(&target, mark), rate("192.0.2.9", 0));
                if done_tx.send(r).is_err() {
                    return;
                }
            }
        });
        Case {
            policies: ready.recv().expect("case set up"),
            go,
            done,
        }
    }

    fn measure(&self) -> (f64, f64) {
        self.go.send(()).unwrap();
        self.done.recv().unwrap()
    }
}

fn ours(peers: usize, bin: &str, dir: &std::path::Path) -> Case {
    let (doc, addrs) = rancher_shaped(peers + 1);
    let meta = dir.join(format!("meta-{peers}.json"));
    std::fs::write(&meta, doc).unwrap();
    let target = addrs[peers][0].clone();
    let psk = dir.join("psk");
    std::fs::write(&psk, [7u8; 40]).unwrap();
    std::fs::set_permissions(&psk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bin = bin.to_string();
    Case::spawn(move || {
        let o = Command::new(&bin)
            .args(["apply", "--metadata"])
            .arg(&meta)
            .args(["--host", "host-00000", "--driver", "xfrm", "--psk-file"])
            .arg(&psk)
            .env("IPSEC_MESH_LOG", "error")
            .output()
            .unwrap();
        // On a kernel without ESP the SAs fail per peer (exit 1) and everything else is in
        // place; with ESP all of it (exit 0).
        let policies = count_policies();
        assert!(
            policies > peers,
            "apply left {policies} policies: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        (policies, target, 0)
    })
}

fn mark_per_peer(peers: usize) -> Case {
    Case::spawn(move || {
        let mut b = String::new();
        for i in 1..=peers {
            b.push_str(&format!(
                "xfrm policy add src 0.0.0.0/0 dst 0.0.0.0/0 dir out mark {:#x} mask 0xffff0000 priority 10752 tmpl src 172.16.0.1 dst 172.16.{}.{} proto esp reqid {} mode tunnel\n",
                (i as u32) << 16,
                i / 250,
                i % 250 + 1,
                0x5000_0000 + i
            ));
        }
        ip_batch(&b);
        (count_policies(), "10.1.2.3".into(), (peers as u32) << 16)
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn count_policies() -> usize {
    let o = Command::new("ip")
        .args(["xfrm", "policy", "count"])
        .output()
        .unwrap();
    // "SPD IN  n OUT n FWD n ..."
    let t = String::from_utf8_lossy(&o.stdout);
    let w: Vec<&str> = t.split_whitespace().collect();
    ["IN", "OUT", "FWD"]
        .iter()
        .filter_map(|k| w.iter().position(|x| x == k).and_then(|i| w.get(i + 1)))
        .filter_map(|n| n.parse::<usize>().ok())
        .sum()
}

fn main() {
    if !is_root() {
        eprintln!("datapath bench: SKIPPED (needs root: network namespaces)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_ipsec-mesh");
    let dir = tempfile::tempdir().unwrap();
    let sizes = [1usize, 1000, 2000, 5000];
    let mut cases: Vec<(&str, usize, Case)> = Vec::new();
    for peers in sizes {
        cases.push(("ipsec-mesh", peers, ours(peers, bin, dir.path())));
    }
    for peers in sizes {
        cases.push(("mark-per-peer", peers, mark_per_peer(peers)));
    }
    // rates[case][round] = (overlay, other)
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, _, c)) in cases.iter().enumerate() {
            rates[i].push(c.measure());
        }
    }
    println!(
        "datapath: UDP sends/s through mark chain + policy routing + XFRM lookup, Rancher-shaped \
         ({CONTAINERS} random /32 per host); {ROUNDS} rounds of {SENDS} sends per case, cases in turn; \
         medians"
    );
    println!(
        "{:<14} {:>6} {:>9} {:>12} {:>7} {:>12} {:>7}",
        "shape", "peers", "policies", "overlay/s", "ratio", "other/s", "ratio"
    );
    for (i, (name, peers, c)) in cases.iter().enumerate() {
        let base = cases
            .iter()
            .position(|(n, p, _)| n == name && *p == 1)
            .unwrap();
        let ratio = |f: fn(&(f64, f64)) -> f64| {
            median(
                rates[i]
                    .iter()
                    .zip(&rates[base])
                    .map(|(a, b)| f(a) / f(b))
                    .collect(),
            )
        };
        println!(
            "{name:<14} {peers:>6} {:>9} {:>12.0} {:>6.2}x {:>12.0} {:>6.2}x",
            c.policies,
            median(rates[i].iter().map(|r| r.0).collect()),
            ratio(|r| r.0),
            median(rates[i].iter().map(|r| r.1).collect()),
            ratio(|r| r.1),
        );
    }
}
