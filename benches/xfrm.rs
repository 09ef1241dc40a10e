//! XFRM driver benchmark (root; a fresh network namespace per case). Prints numbers.
//! Run: `cargo bench --bench xfrm` (as root). On a kernel without ESP only policies are
//! programmed (SAs are skipped after the probe); in the VM kernel both.
//!
//! For N peers: ipsec-mesh's first reconcile vs `ip -batch` adding the same policies, then
//! a no-op reconcile and a reconcile with one host added (writes and time).
//!
//! Sizes: `--bench` runs 1,000, 5,000 and 20,000 peers; `--peers=N[,M...]` (or the
//! environment's `XFRM_BENCH_PEERS`) picks others. Progress goes to stderr (each step can
//! take minutes under TCG in the VM).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use ipsec_mesh::dataplane::netns::{in_new_netns, is_root};
use ipsec_mesh::dataplane::xfrm::{self, desired};
use ipsec_mesh::plan::{Plan, Psk};

mod common;

fn plan_for(peers: usize) -> Plan {
    common::plan_for(peers, None, Some(&Psk::from_bytes(&[9; 32])))
}

/// The same SAs and policies as `ip -batch` lines (SAs only with `with_sas`).
fn ip_batch(p: &Plan, with_sas: bool) -> String {
    let mut s = String::new();
    let d = desired::desired(p);
    for (_, sa) in d.sas.iter().filter(|_| with_sas) {
        let xfrm::objects::Crypto::Aead {
            name,
            key,
            icv_bits,
        } = &sa.crypto
        else {
            continue;
        };
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        s.push_str(&format!(
            "xfrm state add src {} dst {} proto esp spi {:#x} reqid {} mode tunnel replay-window {} flag esn aead '{name}' 0x{hex} {icv_bits}\n",
            sa.src, sa.id.dst, sa.id.spi, sa.reqid, sa.replay_window
        ));
    }
    for (_, pol) in d.policies {
        let dir = pol.id.dir.to_string();
        s.push_str(&format!(
            "xfrm policy add src {} dst {} dir {dir} priority {}",
            pol.id.src, pol.id.dst, pol.priority
        ));
        if pol.id.mark.mask != 0 {
            s.push_str(&format!(
                " mark {:#x} mask {:#x}",
                pol.id.mark.value, pol.id.mark.mask
            ));
        }
        match pol.tmpl {
            Some(t) => s.push_str(&format!(
                " tmpl src {} dst {} proto esp reqid {} mode tunnel\n",
                t.src, t.dst, t.reqid
            )),
            None => s.push_str(" action block\n"),
        }
    }
    s
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Kernel slab memory in KiB (`Slab:` of /proc/meminfo) and the `xfrm_state` cache's bytes
/// (active objects x object size, /proc/slabinfo; 0 where the kernel does not show it).
fn slab() -> (u64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo
        .lines()
        .find(|l| l.starts_with("Slab:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let slabinfo = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    let xs = slabinfo
        .lines()
        .find(|l| l.starts_with("xfrm_state "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect();
            f.first().copied().unwrap_or(0) * f.get(2).copied().unwrap_or(0)
        })
        .unwrap_or(0);
    (total, xs)
}

/// `MemAvailable:` of /proc/meminfo in MiB (how close the VM is to running out).
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// This process's peak RSS (planner + driver, as the sidecar holds them).
fn max_rss_mib() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as u64 / 1024
}

fn case(peers: usize, with_sas: bool) {
    let p = plan_for(peers);
    let grown = plan_for(peers + 1);
    let batch = ip_batch(&p, with_sas);
    let n_pol = desired::desired(&p).policies.len();
    let step = move |what: &str| eprintln!("xfrm bench: {peers} peers: {what}");
    in_new_netns(move || {
        let (slab0, xs0) = slab();
        step("first reconcile");
        let t = Instant::now();
        let first = xfrm::reconcile(&p).unwrap();
        let t_first = ms(t);
        let (slab1, xs1) = slab();
        let avail = mem_available_mib();
        step("no-op reconcile");
        let t = Instant::now();
        let noop = xfrm::reconcile(&p).unwrap();
        let t_noop = ms(t);
        let t = Instant::now();
        let mut sock = xfrm::socket::XfrmSocket::open().unwrap();
        let cur = xfrm::read_current(&mut sock, &p.marks).unwrap();
        let t_dump = ms(t);
        assert_eq!(cur.policies.len(), n_pol);
        let n_sa = cur.sas.len();
        drop(cur);
        step("+1 host");
        let t = Instant::now();
        let add = xfrm::reconcile(&grown).unwrap();
        let t_add = ms(t);
        step("cleanup");
        let t = Instant::now();
        let gone = xfrm::cleanup(&p.marks).unwrap();
        let t_clean = ms(t);

        // ip -batch in its own fresh namespace, with the kernel's default SPD thresholds.
        step("ip -batch");
        let t_ip = in_new_netns(move || {
            let t = Instant::now();
            let mut child = Command::new("ip")
                .args(["-batch", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(batch.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
            ms(t)
        })
        .unwrap();
        println!(
            "peers={peers:>5} policies={n_pol:>6} states={n_sa:>6} errors={} | peak RSS {} MiB | slab +{} KiB (xfrm_state cache +{} KiB), MemAvailable {avail} MiB after it | first reconcile {t_first:8.1} ms ({} writes) | ip -batch {t_ip:8.1} ms | ratio {:.2}x | no-op {t_noop:6.1} ms ({} writes, {} sequence raises, dump+parse {t_dump:.1} ms) | +1 host {t_add:6.1} ms ({} writes) | cleanup {t_clean:.1} ms ({} writes){}",
            // Per-peer "this kernel cannot hold ESP SAs" reports are expected here; anything
            // else (ENOBUFS, a timeout, a refused policy) is an error.
            [&first, &noop, &add, &gone]
                .iter()
                .flat_map(|r| r.errors.iter())
                .filter(|f| !f.error.contains("ESP"))
                .count(),
            max_rss_mib(),
            slab1.saturating_sub(slab0),
            xs1.saturating_sub(xs0) / 1024,
            first.writes,
            t_ip / t_first,
            noop.writes,
            noop.parts
                .iter()
                .filter(|(n, _)| *n == ipsec_mesh::dataplane::xfrm::SEQ_RAISES)
                .map(|(_, w)| w)
                .sum::<usize>(),
            add.writes,
            gone.writes,
            match (first.warnings.is_empty(), with_sas) {
                (false, _) => " | SAs skipped: kernel has no ESP",
                (true, true) => " | SAs included on both sides",
                (true, false) => " | ip -batch without SAs",
            },
        );
    })
    .unwrap();
}

fn main() {
    if !is_root() {
        eprintln!("SKIP xfrm bench: needs root (network namespaces)");
        return;
    }
    // `cargo test --benches` runs benches with --bench absent; keep that quick.
    let full = std::env::args().any(|a| a == "--bench");
    // In a kernel with ESP (the VM: integration/vm/bench-xfrm.sh) the baseline adds the SAs too.
    let with_sas = std::env::args().any(|a| a == "--with-sas");
    let chosen = std::env::args()
        .find_map(|a| a.strip_prefix("--peers=").map(String::from))
        .or_else(|| std::env::var("XFRM_BENCH_PEERS").ok());
    let sizes: Vec<usize> = match chosen {
        Some(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("--peers / XFRM_BENCH_PEERS: {n:?} is not a number"))
            })
            .collect(),
        None if full => vec![1_000, 5_000, 20_000],
        None => vec![50],
    };
    for n in sizes {
        case(n, with_sas);
    }
}
