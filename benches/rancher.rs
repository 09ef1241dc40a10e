//! rancher-metadata at fleet scale (issue 13): `ipsec-mesh plan` against the shared fake
//! rancher-metadata server (tests/common/rancher.rs, which answers as the real server does:
//! compact JSON, chunked, text/plain) serving an environment made with Rancher's addressing
//! (every container a /32 drawn at random across 10.42.0.0/16, a network agent per host,
//! sidekicks, stopped containers), side by side with the same cluster from a metadata file.
//! Each case runs the release binary as a child process: wall time and its peak RSS (GNU
//! time's `%M`), median of the rounds.
//!
//! `cargo bench --bench rancher [-- HOSTS...]` (default 2000 5000; 10 containers per host).
//! Traffic: loopback only.

mod common;
#[path = "../tests/common/rancher.rs"]
#[allow(dead_code)]
mod rancher;

use rancher::{Env, FakeRancher, Gen};

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const ROUNDS: usize = 5;

fn case(name: &str, metadata: &str, host: &str) -> (f64, f64) {
    let runs: Vec<(f64, f64)> = (0..ROUNDS)
        .map(|_| common::plan_once(BIN, metadata, host))
        .collect();
    let t = common::median(runs.iter().map(|r| r.0).collect());
    let rss = common::median(runs.iter().map(|r| r.1).collect());
    let (lo, hi) = runs
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(r.0), hi.max(r.0)));
    println!(
        "  {name:<18} plan {:>7.0} ms (min {:.0}, max {:.0})   peak RSS {rss:>6.1} MiB",
        t * 1e3,
        lo * 1e3,
        hi * 1e3
    );
    (t, rss)
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![2000, 5000]
    } else {
        sizes
    };
    println!("rancher-metadata -> plan, {ROUNDS} rounds, medians (release binary, child process)");
    for hosts in sizes {
        let env = Env::generate(&Gen::new(hosts as u64, hosts, 10));
        let me = env.self_uuid();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), serde_json::to_vec(&env.raw_cluster()).unwrap()).unwrap();
        let server = FakeRancher::start(env);
        let containers = server.served("/containers").len();
        println!(
            "{hosts} hosts x 10 containers: /containers {:.1} MB, metadata file {:.1} MB",
            containers as f64 / 1e6,
            std::fs::metadata(file.path()).unwrap().len() as f64 / 1e6
        );
        let (t_http, rss_http) = case("rancher-metadata", &server.base(), &me);
        let (t_file, rss_file) = case("same, from a file", file.path().to_str().unwrap(), &me);
        println!(
            "  ratio rancher/file: time {:.1}x, RSS {:.1}x",
            t_http / t_file,
            rss_http / rss_file
        );
    }
}
