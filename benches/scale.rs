//! Planner at fleet scale (issue 12 item 4): one host's plan in a mesh of 10,000 and 100,000
//! hosts, from the JSON document to the plan with keys, and the process's peak memory.
//! Prints numbers. Run: `cargo bench --bench scale` (no root needed).
//!
//! Shape: every host one /24 at random over 10.0.0.0/8 would not fit 100,000 hosts, so each
//! host gets one /28 drawn at random (fixed seed, no duplicates) over 10.0.0.0/8; agent IPs
//! over 172.16.0.0/12. Each size runs in a child process of this binary, so the peak RSS
//! (`getrusage(RUSAGE_SELF).ru_maxrss`) is that size's alone, document included.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ipsec_mesh::metadata::file;
use ipsec_mesh::plan::{self, PlanOptions, Psk};

fn document(hosts: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut used = std::collections::HashSet::new();
    let mut s = String::from(r#"{"network":{"cidr":"10.0.0.0/8"},"hosts":["#);
    for i in 0..hosts {
        let block = loop {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = (x >> 20) as u32 & 0xf_ffff; // /28 blocks of 10/8: 2^20
            if used.insert(b) {
                break b;
            }
        };
        let a = block << 4;
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"id":"host-{i:06}","agent_ip":"172.{}.{}.{}","subnets":["10.{}.{}.{}/28"]}}"#,
            16 + (i >> 16),
            (i >> 8) & 0xff,
            i & 0xff,
            a >> 16,
            (a >> 8) & 0xff,
            a & 0xff
        ));
    }
    s.push_str("]}");
    s.into_bytes()
}

fn max_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss as f64 / 1024.0
}

fn one(hosts: usize) {
    let doc = document(hosts);
    let t = Instant::now();
    let cluster = file::parse(Path::new("scale.json"), &doc).unwrap();
    let parsed = t.elapsed();
    drop(doc);
    let psk = Psk::from_bytes(&[0x42; 32]);
    let t = Instant::now();
    let p = plan::plan(&cluster, "host-000007", &PlanOptions::default(), Some(&psk)).unwrap();
    let planned = t.elapsed();
    let t = Instant::now();
    let no_psk = plan::plan(&cluster, "host-000007", &PlanOptions::default(), None).unwrap();
    let planned_nopsk = t.elapsed();
    assert_eq!(p.peers.len(), hosts - 1);
    assert_eq!(no_psk.peers.len(), hosts - 1);
    println!(
        "{hosts:>8} {:>14.1} {:>16.1} {:>14.1} {:>12.1} {:>12.0}",
        parsed.as_secs_f64() * 1e3,
        planned.as_secs_f64() * 1e3,
        planned_nopsk.as_secs_f64() * 1e3,
        (parsed + planned).as_secs_f64() * 1e3,
        max_rss_mib()
    );
}

fn main() {
    if let Some(n) = std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        return one(n);
    }
    println!(
        "scale: one host's plan (4 keys per peer: out + 3 inbound generations), ms; peak RSS MiB"
    );
    println!(
        "{:>8} {:>14} {:>16} {:>14} {:>12} {:>12}",
        "hosts", "parse+validate", "plan (with PSK)", "plan (no PSK)", "file->plan", "peak RSS"
    );
    let me = std::env::current_exe().unwrap();
    for n in [10_000usize, 100_000] {
        let st = Command::new(&me).arg(n.to_string()).status().unwrap();
        assert!(st.success());
    }
}
