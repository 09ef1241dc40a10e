//! Root only: loading N peer conns (default 1,000) into one real charon-systemd, through
//! the charon driver vs `swanctl --load-conns` with an equivalent swanctl.conf (rendered from
//! the very `load-conn` messages the driver sends), against the same charon, in the same
//! run, alternating, several rounds. Prints numbers; asserts nothing about time.
//!
//!   cargo bench --bench charon              # PEERS=1000 ROUNDS=5
//!   PEERS=2000 ROUNDS=3 cargo bench --bench charon
//!
//! Every round starts from a charon with none of our conns (our `cleanup`, not timed).
//! Driver: `reconcile_config` (reads, `load-shared`, pipelined `load-conn`s; no initiate).
//! swanctl: one `swanctl --load-conns` process (plugin loading, parsing, `get-conns`, one
//! `load-conn` per conn). Also shown: the same `load-conn` messages sent one at a time on
//! the client (what a naive driver does) and pipelined on one connection.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipsec_mesh::dataplane::charon::batch::{self, BatchOptions, Request};
use ipsec_mesh::dataplane::charon::desired::desired;
use ipsec_mesh::dataplane::charon::wire::{Message, Value};
use ipsec_mesh::dataplane::charon::{
    cleanup, reconcile_config, CharonConfig, Client, ConnectOptions, GetConns,
};
use ipsec_mesh::model::{Cluster, RawCluster, RawHost, RawNetwork};
use ipsec_mesh::plan::{plan, PlanOptions, Psk};

const CHARON: &str = "/usr/sbin/charon-systemd";

fn env_num(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn cluster(n: usize) -> Cluster {
    Cluster::validate(&RawCluster {
        network: RawNetwork {
            cidr: "10.0.0.0/8".into(),
            backend: None,
            mtu: None,
        },
        hosts: (0..=n)
            .map(|i| RawHost {
                id: format!("host-{i:05}"),
                agent_ip: format!("192.168.{}.{}", i / 250, i % 250 + 1),
                subnets: vec![format!("10.{}.{}.0/24", i / 256 + 1, i % 256)],
                ..Default::default()
            })
            .collect(),
    })
    .expect("valid cluster")
}

/// A message section in swanctl.conf syntax (sections nest, lists are comma-separated).
fn render(m: &Message, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in m.iter() {
        match v {
            Value::Bytes(b) => {
                let _ = writeln!(out, "{pad}{k} = {}", String::from_utf8_lossy(b));
            }
            Value::List(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|i| String::from_utf8_lossy(i).into_owned())
                    .collect();
                let _ = writeln!(out, "{pad}{k} = {}", items.join(", "));
            }
            Value::Section(s) => {
                let _ = writeln!(out, "{pad}{k} {{");
                render(s, indent + 2, out);
                let _ = writeln!(out, "{pad}}}");
            }
            Value::Secret(_) => unreachable!("conns carry no secret"),
        }
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP charon bench: needs root (netns + charon-systemd)");
        return;
    }
    if !Path::new(CHARON).exists() {
        eprintln!("SKIP charon bench: {CHARON} missing (integration/setup.sh installs it)");
        return;
    }
    let peers = env_num("PEERS", 1000);
    let rounds = env_num("ROUNDS", 5).max(1);
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns(format!("ch{}bench", std::process::id() % 100_000));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    assert!(Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap()
        .success());
    let _ = Command::new("ip")
        .args(["-n", &ns.0, "link", "set", "lo", "up"])
        .status();
    let sock = dir.path().join("charon.vici");
    let conf = dir.path().join("strongswan.conf");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("charon-conf/strongswan-libipsec.conf");
    std::fs::write(
        &conf,
        format!(
            "include {}\ncharon {{\n  plugins {{ vici {{ socket = unix://{} }} }}\n  filelog {{ ipsec-mesh {{ path = {} }} }}\n}}\n",
            base.display(),
            sock.display(),
            dir.path().join("charon.log").display()
        ),
    )
    .unwrap();
    let mut charon = Command::new("ip")
        .args(["netns", "exec", &ns.0, CHARON])
        .env("STRONGSWAN_CONF", &conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start charon-systemd");

    let cl = cluster(peers);
    let p = plan(&cl, "host-00000", &PlanOptions::default(), None).unwrap();
    let psk = Psk::from_bytes(b"charon-bench-psk-not-a-secret-0123456789");
    let cfg = CharonConfig {
        vici_socket: sock.clone(),
        ..Default::default()
    };
    let want = desired(&p, &psk, &cfg);
    let messages: Vec<Message> = want.conns.values().map(|c| c.load_message()).collect();
    let mut swconf = String::from("connections {\n");
    for m in &messages {
        render(m, 2, &mut swconf);
    }
    swconf.push_str("}\n");
    let swfile = dir.path().join("swanctl.conf");
    std::fs::write(&swfile, &swconf).unwrap();
    let uri = format!("unix://{}", sock.display());
    let swanctl = || {
        let t = Instant::now();
        let out = Command::new("swanctl")
            .args(["--load-conns", "--uri", &uri, "--file"])
            .arg(&swfile)
            .env("STRONGSWAN_CONF", &conf)
            .output()
            .expect("swanctl");
        let d = t.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && text.contains(&format!("successfully loaded {peers} connections")),
            "swanctl: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = Client::connect(&sock, &ConnectOptions::default())
            .await
            .expect("charon answers");
        let clean = || async {
            cleanup(&client).await.unwrap();
            assert!(client.call(&GetConns).await.unwrap().is_empty());
        };
        let (mut drv, mut drv_noop, mut sw, mut sw_again, mut one, mut piped) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let reqs: Vec<Request> = messages
            .iter()
            .map(|m| Request::new("load-conn", "", m.clone()))
            .collect();
        for _ in 0..rounds {
            // the driver, from scratch, then with nothing to do
            clean().await;
            let t = Instant::now();
            let r = reconcile_config(&client, &p, &psk, &cfg).await.unwrap();
            drv.push(t.elapsed());
            assert!(r.ok() && r.loaded == peers, "{:?}", r.report.errors);
            let t = Instant::now();
            let r = reconcile_config(&client, &p, &psk, &cfg).await.unwrap();
            drv_noop.push(t.elapsed());
            assert_eq!(r.report.writes, 0);

            // swanctl, from scratch, then the same file again
            clean().await;
            sw.push(swanctl());
            sw_again.push(swanctl());

            // the same messages, one request at a time on the client
            clean().await;
            let t = Instant::now();
            for m in &messages {
                client.request("load-conn", m.clone()).await.unwrap();
            }
            one.push(t.elapsed());

            // ... and pipelined on one connection
            clean().await;
            let t = Instant::now();
            let outs = batch::run(&sock, &reqs, &BatchOptions::default())
                .await
                .unwrap();
            piped.push(t.elapsed());
            assert!(outs.iter().all(|o| o.result.is_ok()));
        }
        clean().await;
        let (d, dn, s, sa, o, pp) = (
            median(&mut drv),
            median(&mut drv_noop),
            median(&mut sw),
            median(&mut sw_again),
            median(&mut one),
            median(&mut piped),
        );
        println!("charon driver bench: {peers} peer conns, {rounds} rounds, medians");
        println!(
            "  driver reconcile_config, fresh charon   {:>10}  ({:.0} conns/s)",
            ms(d),
            peers as f64 / d.as_secs_f64()
        );
        println!(
            "  driver reconcile_config, nothing to do  {:>10}  (0 writes)",
            ms(dn)
        );
        println!(
            "  swanctl --load-conns, fresh charon      {:>10}  ({:.0} conns/s)",
            ms(s),
            peers as f64 / s.as_secs_f64()
        );
        println!("  swanctl --load-conns, same file again   {:>10}", ms(sa));
        println!("  load-conn one at a time (client)        {:>10}", ms(o));
        println!("  load-conn pipelined (one connection)    {:>10}", ms(pp));
        println!(
            "  driver vs swanctl: {:.1}x faster fresh, {:.1}x with nothing to do",
            s.as_secs_f64() / d.as_secs_f64(),
            sa.as_secs_f64() / dn.as_secs_f64()
        );
    });

    // SAFETY: kill(2) on our own child
    unsafe { libc::kill(charon.id() as libc::pid_t, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = charon.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = charon.kill();
    let _ = charon.wait();
}
