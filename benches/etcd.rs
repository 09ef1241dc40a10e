//! Fleet metadata on a REAL 3-member etcd cluster (issue 15), side by side with the same
//! changes made to a metadata file, in one run:
//!
//! 1. **put -> programmed**: `CHANGES` new hosts, one at a time; for each, the time from the
//!    put (an HTTP put to the etcd gateway, the request etcdctl makes; for the file: the
//!    atomic rename of the rewritten file) until its route exists on EVERY one of 3 sidecars
//!    (`ipsec-mesh run --driver vxlan`, each in its own network namespace), seen by an
//!    `ip monitor route` per sidecar namespace (the kernel's own notification). p50/p99/max.
//! 2. **10,000-host load**: `ipsec-mesh plan` on a prefix of `HOSTS` host records (pushed with
//!    `ipsec-mesh metadata push`) and on the same hosts in a file: wall time and peak RSS of
//!    the release binary (GNU time's `%M`), median of 5 rounds.
//! 3. **churn**: `CHURN` changes at `RATE`/s (first half new hosts, second half deleting them
//!    again; etcd puts from 4 threads so the rate holds, the achieved rate is printed), to the
//!    same 3 sidecars: lag of each change (put -> programmed on every sidecar, or gone from
//!    every one) p50/p99/max, the sidecars' CPU time (utime+stime from /proc) over the churn
//!    as seconds and % of one core, their VmHWM, and the etcd members' CPU.
//!
//! `cargo bench --bench etcd [-- changes=50 hosts=10000 churn=1000 rate=50]`. Needs root
//! (network namespaces), Debian's `etcd-server` and `etcd-client` (integration/setup.sh) and
//! GNU `time` (`apt-get install time`): it fails saying which is missing. Not run in CI
//! (about 1.5 minutes after the build). Traffic: only inside the namespaces it makes
//! (tests/common/etcd.rs: members 192.168.78.11-13, hosts .21-.26).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "common/mod.rs"]
mod mesh;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use ipsec_mesh::metadata::etcd::{Client, EtcdUrl};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const NETWORK: &str = r#"{"cidr":"10.0.0.0/8","backend":"vxlan"}"#;
/// How long one change may take to reach every sidecar before the bench fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
const LOAD_ROUNDS: usize = 5;
/// Threads making the churn's etcd puts.
const SENDERS: usize = 4;

struct Params {
    changes: usize,
    hosts: usize,
    churn: usize,
    rate: f64,
}

fn params() -> Params {
    let mut p = Params {
        changes: 50,
        hosts: 10_000,
        churn: 1000,
        rate: 50.0,
    };
    for a in std::env::args().skip(1) {
        let Some((k, v)) = a.split_once('=') else {
            continue; // cargo bench passes --bench
        };
        let n: f64 = v
            .parse()
            .unwrap_or_else(|_| panic!("{a}: not a number (changes=N hosts=N churn=N rate=N)"));
        match k {
            "changes" => p.changes = n as usize,
            "hosts" => p.hosts = n as usize,
            "churn" => p.churn = n as usize,
            "rate" => p.rate = n,
            _ => panic!("unknown parameter {k} (changes=N hosts=N churn=N rate=N)"),
        }
    }
    assert!(
        p.churn % 2 == 0 && p.churn <= 2 * 255 * 256,
        "churn: an even number"
    );
    p
}

/// Move this thread into network namespace `ns` (its children start there too).
fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Route events of one namespace: (when, added (else deleted), destination).
type Events = Arc<Mutex<Vec<(Instant, bool, String)>>>;

/// `ip -n NS monitor route`, every line timestamped as it arrives.
struct Monitor {
    child: Child,
    events: Events,
}

impl Monitor {
    fn start(ns: &str) -> Monitor {
        let mut child = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ip monitor route");
        let out = child.stdout.take().unwrap();
        let events: Events = Arc::default();
        let ev = events.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let now = Instant::now();
                let mut w = line.split_whitespace();
                let (added, dst) = match w.next() {
                    Some("Deleted") => (false, w.next()),
                    first => (true, first),
                };
                if let Some(dst) = dst {
                    ev.lock().unwrap().push((now, added, dst.to_string()));
                }
            }
        });
        Monitor { child, events }
    }

    /// When `dst` was added (or deleted) at or after `after`.
    fn seen(&self, dst: &str, added: bool, after: Instant) -> Option<Instant> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|(t, a, d)| *t >= after && *a == added && d == dst)
            .map(|e| e.0)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One mesh of 3 sidecars following one source (etcd or a file).
struct Mesh {
    name: &'static str,
    /// The sidecars' logs are `{logs}/{name}-hN.log`.
    logs: std::path::PathBuf,
    hosts: Vec<usize>,
    sidecars: Vec<Child>,
    monitors: Vec<Monitor>,
    writer: Writer,
}

enum Writer {
    Etcd {
        client: Client,
        url: EtcdUrl,
    },
    /// The whole file is rewritten and renamed into place for every change.
    File {
        path: std::path::PathBuf,
        hosts: BTreeMap<String, Value>,
    },
}

impl Writer {
    /// Put host `id`'s record (None: delete it). Returns when the put was started.
    fn set(&mut self, id: &str, record: Option<&Value>) -> Instant {
        match self {
            Writer::Etcd { client, url } => {
                let key = url.host_key(id);
                let t = Instant::now();
                match record {
                    Some(r) => {
                        client
                            .put(&key, r.to_string().as_bytes(), 0)
                            .unwrap_or_else(|e| panic!("put {key}: {e}"));
                    }
                    None => client
                        .delete(&key)
                        .unwrap_or_else(|e| panic!("delete {key}: {e}")),
                }
                t
            }
            Writer::File { path, hosts } => {
                match record {
                    Some(r) => hosts.insert(id.to_string(), r.clone()),
                    None => hosts.remove(id),
                };
                let doc = json!({
                    "network": serde_json::from_str::<Value>(NETWORK).unwrap(),
                    "hosts": hosts.values().collect::<Vec<_>>(),
                });
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_vec(&doc).unwrap()).unwrap();
                let t = Instant::now();
                std::fs::rename(&tmp, &*path).unwrap();
                t
            }
        }
    }
}

fn sidecar_record(n: usize) -> Value {
    json!({"id": format!("h{n}"), "agent_ip": Etcd::host_ip(n), "subnets": [format!("10.1.{n}.0/24")]})
}

/// Host number `k` of a phase that nobody runs (an agent address nobody answers on), subnet
/// `10.{base + k / 256}.{k % 256}.0/24`.
fn record(id: &str, k: usize, base: usize) -> (Value, String) {
    let subnet = format!("10.{}.{}.0/24", base + k / 256, k % 256);
    let v = json!({
        "id": id,
        // Distinct per phase too (`base`): two records with one agent_ip conflict.
        "agent_ip": format!("172.{}.{}.{}", base / 10, k / 250, k % 250 + 1),
        "subnets": [subnet],
    });
    (v, subnet)
}

impl Mesh {
    fn start(e: &Etcd, name: &'static str, hosts: Vec<usize>, writer: Writer, url: &str) -> Mesh {
        let mut m = Mesh {
            name,
            logs: e.t.dir.path().to_path_buf(),
            hosts: hosts.clone(),
            sidecars: Vec::new(),
            monitors: Vec::new(),
            writer,
        };
        for &n in &hosts {
            m.writer.set(&format!("h{n}"), Some(&sidecar_record(n)));
        }
        for &n in &hosts {
            let ns = e.t.ns(&format!("h{n}"));
            m.monitors.push(Monitor::start(&ns));
            let log = File::create(e.t.dir.path().join(format!("{name}-h{n}.log"))).unwrap();
            let child = Command::new("ip")
                .args(["netns", "exec", &ns, BIN, "run"])
                .args(["--metadata", url, "--host", &format!("h{n}")])
                .args(["--driver", "vxlan", "--resync", "3600"])
                .env("IPSEC_MESH_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start ipsec-mesh run");
            m.sidecars.push(child);
        }
        // Ready: every sidecar has the routes to the other two.
        let t = Instant::now();
        for &n in &hosts {
            let ns = e.t.ns(&format!("h{n}"));
            loop {
                let routes = Command::new("ip")
                    .args(["-n", &ns, "route", "show"])
                    .output()
                    .unwrap();
                let routes = String::from_utf8_lossy(&routes.stdout);
                let ready = hosts
                    .iter()
                    .filter(|o| **o != n)
                    .all(|o| routes.contains(&format!("10.1.{o}.0/24 ")));
                if ready {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{name}: the sidecar of h{n} did not program its peers in 30 s (log: {})",
                    e.t.dir.path().join(format!("{name}-h{n}.log")).display()
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        // `ip netns exec` execs the program: the child is the sidecar itself.
        for c in &m.sidecars {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", c.id())).unwrap();
            assert_eq!(
                comm.trim(),
                "ipsec-mesh",
                "pid {} is not the sidecar",
                c.id()
            );
        }
        m
    }

    /// When every sidecar has seen `dst` added/deleted since `t0`, or None while one has not.
    fn done(&self, dst: &str, added: bool, t0: Instant) -> Option<Instant> {
        self.monitors
            .iter()
            .map(|m| m.seen(dst, added, t0))
            .try_fold(t0, |acc, t| t.map(|t| t.max(acc)))
    }

    fn wait_done(&self, dst: &str, added: bool, t0: Instant) -> Instant {
        loop {
            if let Some(t) = self.done(dst, added, t0) {
                return t;
            }
            if t0.elapsed() > CHANGE_TIMEOUT {
                // The scratch dir goes away with the cluster: the logs' ends go in the message.
                let tails: Vec<String> = (0..self.sidecars.len())
                    .map(|i| {
                        let f = self
                            .logs
                            .join(format!("{}-h{}.log", self.name, self.hosts[i]));
                        let text = std::fs::read_to_string(&f).unwrap_or_default();
                        let lines: Vec<&str> = text.lines().collect();
                        format!(
                            "{}:\n{}",
                            f.display(),
                            lines[lines.len().saturating_sub(15)..].join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "{}: {dst} ({}) not programmed on every sidecar within {CHANGE_TIMEOUT:?}; \
                     sidecar logs:\n{}",
                    self.name,
                    if added { "added" } else { "deleted" },
                    tails.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// CPU seconds (utime + stime) the sidecars used so far, and their largest VmHWM (MiB).
    fn cpu_and_hwm(&self) -> (f64, f64) {
        let pids: Vec<u32> = self.sidecars.iter().map(|c| c.id()).collect();
        let mut hwm: f64 = 0.0;
        for pid in &pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let kib: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0);
            hwm = hwm.max(kib / 1024.0);
        }
        (cpu_seconds(&pids), hwm)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for c in &mut self.sidecars {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Nearest-rank percentile of sorted `v` (p99 of 50 samples is the largest).
fn pct(v: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn summary(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    (pct(&ms, 50.0), pct(&ms, 99.0), ms[ms.len() - 1])
}

struct Churn {
    lag_ms: Vec<f64>,
    cpu_s: f64,
    /// The etcd members' CPU over the same window.
    etcd_cpu_s: f64,
    window_s: f64,
    /// Changes per second achieved.
    rate: f64,
    settle_ms: f64,
    hwm: f64,
}

/// Phase 3: `count` changes at `rate`/s: hosts c0.. added, then deleted in the same order.
fn churn(m: &mut Mesh, count: usize, rate: f64, etcd_pids: &[u32]) -> Churn {
    let half = count / 2;
    let (cpu0, _) = m.cpu_and_hwm();
    let etcd0 = cpu_seconds(etcd_pids);
    let start = Instant::now();
    let change = move |i: usize| {
        let k = i % half;
        let (rec, subnet) = record(&format!("c{k}"), k, 200);
        (format!("c{k}"), (i < half).then_some(rec), subnet)
    };
    let due = move |i: usize| {
        if let Some(d) = (start + Duration::from_secs_f64(i as f64 / rate))
            .checked_duration_since(Instant::now())
        {
            thread::sleep(d);
        }
    };
    // (change number, put started, added, subnet)
    let mut sent: Vec<(usize, Instant, bool, String)> = Vec::with_capacity(count);
    match &mut m.writer {
        // SENDERS threads (each its own connection), change i on thread i % SENDERS: the
        // rate holds while one put takes less than SENDERS / rate (a put and the delete of
        // the same host, `half` apart, stay on one thread when SENDERS divides `half`).
        Writer::Etcd { client, url } => {
            let threads: Vec<_> = (0..SENDERS)
                .map(|j| {
                    let mut w = Writer::Etcd {
                        client: client.clone(),
                        url: url.clone(),
                    };
                    thread::spawn(move || {
                        let mut out = Vec::new();
                        for i in (j..count).step_by(SENDERS) {
                            due(i);
                            let (id, rec, subnet) = change(i);
                            let t0 = w.set(&id, rec.as_ref());
                            out.push((i, t0, rec.is_some(), subnet));
                        }
                        out
                    })
                })
                .collect();
            for th in threads {
                sent.extend(th.join().unwrap());
            }
            sent.sort_by_key(|s| s.0);
        }
        w @ Writer::File { .. } => {
            for i in 0..count {
                due(i);
                let (id, rec, subnet) = change(i);
                let t0 = w.set(&id, rec.as_ref());
                sent.push((i, t0, rec.is_some(), subnet));
            }
        }
    }
    let sent_s = (sent.last().unwrap().1 - start).as_secs_f64();
    let mut lag_ms = Vec::new();
    let mut last = start;
    for (_, t0, added, subnet) in &sent {
        let t = m.wait_done(subnet, *added, *t0);
        last = last.max(t);
        lag_ms.push((t - *t0).as_secs_f64() * 1e3);
    }
    let (cpu1, hwm) = m.cpu_and_hwm();
    let settle_ms = (last - sent.last().unwrap().1).as_secs_f64() * 1e3;
    Churn {
        lag_ms,
        cpu_s: cpu1 - cpu0,
        etcd_cpu_s: cpu_seconds(etcd_pids) - etcd0,
        window_s: (last - start).as_secs_f64(),
        rate: (count - 1) as f64 / sent_s,
        settle_ms,
        hwm,
    }
}

/// utime + stime of processes `pids`, seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            // Fields 14 and 15 of proc_pid_stat(5); f[0] is field 3.
            (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tick
        })
        .sum()
}

/// Rounds alternate between the two sources, so both see the same machine load.
fn load_cases(cases: &[(&str, &str)], host: &str) -> Vec<(f64, f64, f64, f64)> {
    let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for _ in 0..LOAD_ROUNDS {
        for (i, (_, md)) in cases.iter().enumerate() {
            runs[i].push(mesh::plan_once(BIN, md, host));
        }
    }
    runs.into_iter()
        .map(|r| {
            let t: Vec<f64> = r.iter().map(|x| x.0).collect();
            let lo = t.iter().cloned().fold(f64::MAX, f64::min);
            let hi = t.iter().cloned().fold(0.0, f64::max);
            (
                mesh::median(t),
                lo,
                hi,
                mesh::median(r.iter().map(|x| x.1).collect()),
            )
        })
        .collect()
}

fn main() {
    let p = params();
    assert!(
        common::is_root(),
        "benches/etcd.rs needs root (network namespaces): run `cargo bench --bench etcd` as root"
    );
    common::require_program(common::etcd::ETCD, "etcd-server");
    common::require_program(common::etcd::ETCDCTL, "etcd-client");
    common::require_program(mesh::TIME, "time");
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "etcd bench: {cpus} CPUs, load average at start {} (release binary {BIN})",
        loadavg()
    );
    let mut e = Etcd::new("bn");
    for n in 1..=6 {
        e.add_host(n);
    }
    enter_netns(&e.t.ns("cl"));
    e.put("/mesh/network", NETWORK);
    let eps = e.endpoints(&[1, 2, 3]);
    let url = format!("etcd://{eps}/mesh");
    let eurl = EtcdUrl::parse(&url).unwrap();
    let client = Client::new(eurl.clone()).unwrap();
    let file = e.t.dir.path().join("mesh.json");
    let mut fw = Writer::File {
        path: file.clone(),
        hosts: BTreeMap::new(),
    };
    fw.set("h4", Some(&sidecar_record(4))); // the file exists before its sidecars start
    let mut etcd_mesh = Mesh::start(
        &e,
        "etcd",
        vec![1, 2, 3],
        Writer::Etcd { client, url: eurl },
        &url,
    );
    let mut file_mesh = Mesh::start(&e, "file", vec![4, 5, 6], fw, file.to_str().unwrap());

    // 1. put -> programmed, one change at a time; the sources alternate in blocks of 10.
    let (mut lat_e, mut lat_f) = (Vec::new(), Vec::new());
    let la1 = loadavg();
    let mut done = 0;
    while done < p.changes {
        let n = (p.changes - done).min(10);
        lat_e.extend(latency(&mut etcd_mesh, done, n));
        lat_f.extend(latency(&mut file_mesh, done, n));
        done += n;
    }
    let (e50, e99, emax) = summary(lat_e);
    let (f50, f99, fmax) = summary(lat_f);
    println!(
        "\n1. put -> route on all 3 sidecars, {} changes one at a time (load avg {la1} -> {}):",
        p.changes,
        loadavg()
    );
    println!(
        "  {:<26} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p99 ms", "max ms"
    );
    println!("  {:<26} {e50:>8.1} {e99:>8.1} {emax:>8.1}", "etcd (watch)");
    println!(
        "  {:<26} {f50:>8.1} {f99:>8.1} {fmax:>8.1}",
        "file (polled every 200 ms)"
    );

    // 2. Initial load of a big prefix vs the same file.
    let raw = mesh::raw_mesh(p.hosts, Some("vxlan"));
    let big = e.t.dir.path().join("big.json");
    std::fs::write(&big, serde_json::to_vec(&raw).unwrap()).unwrap();
    let big_url = format!("etcd://{eps}/big");
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["metadata", "push", "--metadata", big.to_str().unwrap()])
        .args(["--to", &big_url])
        .env("IPSEC_MESH_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "metadata push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let push_s = t.elapsed().as_secs_f64();
    let la2 = loadavg();
    let r = load_cases(
        &[("etcd", &big_url), ("file", big.to_str().unwrap())],
        "host-00000",
    );
    println!(
        "\n2. `plan` of {} hosts, {LOAD_ROUNDS} rounds alternating, medians (file {:.1} MB; \
         metadata push took {push_s:.1} s; load avg {la2} -> {}):",
        p.hosts,
        std::fs::metadata(&big).unwrap().len() as f64 / 1e6,
        loadavg()
    );
    for (name, (t, lo, hi, rss)) in ["etcd prefix", "file"].iter().zip(&r) {
        println!(
            "  {name:<12} {:>7.0} ms (min {:.0}, max {:.0})   peak RSS {rss:>6.1} MiB",
            t * 1e3,
            lo * 1e3,
            hi * 1e3
        );
    }
    println!(
        "  ratio etcd/file: time {:.2}x, RSS {:.2}x",
        r[0].0 / r[1].0,
        r[0].3 / r[1].3
    );

    // 3. Churn at a fixed rate, etcd then the file.
    let la3 = loadavg();
    let members: Vec<u32> = e.members.iter().flatten().map(|c| c.id()).collect();
    let ce = churn(&mut etcd_mesh, p.churn, p.rate, &members);
    let cf = churn(&mut file_mesh, p.churn, p.rate, &members);
    println!(
        "\n3. churn: {} changes at {}/s ({} hosts added then deleted), load avg {la3} -> {}:",
        p.churn,
        p.rate,
        p.churn / 2,
        loadavg()
    );
    println!(
        "  {:<6} {:>8} {:>10} {:>10} {:>10} {:>8} {:>17} {:>10} {:>9}",
        "",
        "rate/s",
        "lag p50",
        "lag p99",
        "lag max",
        "settle",
        "CPU 3 sidecars",
        "sidecar",
        "etcd CPU"
    );
    for (name, c) in [("etcd", ce), ("file", cf)] {
        let (l50, l99, lmax) = summary(c.lag_ms);
        println!(
            "  {name:<6} {:>8.1} {l50:>7.1} ms {l99:>7.1} ms {lmax:>7.1} ms {:>5.0} ms {:>6.2} s ({:>3.0} %) {:>6.1} MiB {:>7.2} s",
            c.rate,
            c.settle_ms,
            c.cpu_s,
            c.cpu_s / c.window_s / 3.0 * 100.0,
            c.hwm,
            c.etcd_cpu_s
        );
    }
    println!(
        "  (rate: achieved; CPU %: per sidecar, of one core, over the churn window (first put ->\n  \
         programmed everywhere); sidecar: largest VmHWM; settle: last put -> programmed\n  \
         everywhere; etcd CPU: the 3 members together, also during the file's churn)"
    );
    println!("\nload average at the end {}", loadavg());
}

/// Phase 1: changes `from..from + n`, one at a time; put -> programmed everywhere, in ms.
fn latency(m: &mut Mesh, from: usize, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for k in from..from + n {
        let (rec, subnet) = record(&format!("n{k}"), k, 100);
        let t0 = m.writer.set(&format!("n{k}"), Some(&rec));
        let t = m.wait_done(&subnet, true, t0);
        out.push((t - t0).as_secs_f64() * 1e3);
        // Let the sidecars go idle (the file source polls every 200 ms: a gap that is not a
        // multiple of it, so the changes land at every phase of its poll).
        thread::sleep(Duration::from_millis(150 + (k as u64 * 37) % 100));
    }
    out
}
