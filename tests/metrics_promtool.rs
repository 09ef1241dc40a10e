//! `/metrics` passes `promtool check metrics` (the Prometheus exposition format and its
//! naming lint: counters end in `_total`, units are suffixes, every family has HELP and TYPE).

#[allow(unused_imports)] // only require_program is used here
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use ipsec_mesh::daemon::status::{metrics, MetadataStatus, PeerStatus, ReconcileStatus, Status};
use ipsec_mesh::dataplane::xfrm;

const PROMTOOL: &str = "/usr/bin/promtool";

/// A status as a busy sidecar has it: several peers in different states with traffic and
/// errors, a failed metadata load, reconcile counters, kernel XFRM error counters.
fn realistic() -> (Status, Vec<(String, u64)>) {
    use ipsec_mesh::dataplane::driver::PeerState;
    let peer = |host: &str, state: PeerState, n: u64, err: Option<&str>| PeerStatus {
        host: host.into(),
        endpoint: format!("192.0.2.{n}"),
        state,
        reqid: 0x1000 + n as u32,
        spi_out: 0x2000 + n as u32,
        spi_in: 0x3000 + n as u32,
        bytes_out: 1000 * n,
        packets_out: 10 * n,
        bytes_in: 2000 * n,
        packets_in: 20 * n,
        sa: (state == PeerState::Up).then_some(ipsec_mesh::dataplane::driver::SaDetail {
            generation: 2,
            ahead: n == 4,
            in_generation: 1,
            out_added: 1_700_000_000,
            in_added: 1_700_000_001,
            seq_out: 7_100_000_000_000_000,
            seq_in: 7_099_000_000_000_000,
            replay_drops_in: n as u32,
            integrity_failed_in: 1,
        }),
        last_error: err.map(String::from),
        last_change: Some(1_700_000_000 + n),
    };
    let status = Status {
        host: Some("host-a".into()),
        driver: "xfrm".into(),
        firewall: Some("iptables".into()),
        metadata: MetadataStatus {
            source: "file:/etc/ipsec-mesh/cluster.json".into(),
            version: Some("v\"42\"\nnext".into()),
            loaded_at: Some(1_700_000_000),
            last_error: Some("cluster.json: line 3 column 7: expected `,`".into()),
            skipped: vec![ipsec_mesh::metadata::etcd::Skipped {
                key: "/ipsec-mesh/hosts/h3".into(),
                error: "unknown field `subnet`".into(),
            }],
        },
        reconciles: ReconcileStatus {
            count: 17,
            errors: 3,
            last_at: Some(1_700_000_100),
            last_duration_ms: 12.5,
            total_duration_ms: 321.25,
            last_writes: 6,
            last_version: Some("41".into()),
            driver_wakes: 2,
            ..ReconcileStatus::default()
        },
        keying: ipsec_mesh::daemon::status::KeyingStatus {
            generation: 2,
            rekey_every_s: Some(3600),
            next_rekey_at: Some(1_700_003_600),
            rekey_bytes: Some(1 << 40),
            rekey_packets: None,
            ahead: vec!["host-\"d\"".into()],
            rekeys_age: 4,
            rekeys_usage: 1,
        },
        peers: vec![
            peer("host-b", PeerState::Up, 2, None),
            peer(
                "host-c",
                PeerState::Down,
                3,
                Some("EEXIST: not ipsec-mesh's"),
            ),
            peer("host-\"d\"", PeerState::Up, 4, None),
            peer("host-e", PeerState::Failed, 5, Some("no ESP")),
        ],
        mesh_errors: vec!["routes: dumping links failed".into()],
        has_sas: true,
    };
    let xfrm = xfrm::stat::parse(
        "XfrmInError             \t0\nXfrmInNoStates          \t5\nXfrmOutNoStates         \t4\nXfrmOutPolBlock         \t1\n",
    );
    (status, xfrm)
}

/// `promtool check metrics` on `text`: (exit code, everything it printed).
fn promtool_check(text: &str) -> (Option<i32>, String) {
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), said)
}

#[test]
#[ignore = "needs promtool: integration/run.sh installs and runs it"]
fn metrics_pass_promtool_check_without_lint_warnings() {
    common::require_program(PROMTOOL, "prometheus");
    let (status, xfrm) = realistic();
    let text = metrics(&status, &xfrm, 1_700_000_130);
    let (code, said) = promtool_check(&text);
    assert_eq!(code, Some(0), "promtool: {said}\n--- metrics ---\n{text}");
    assert!(
        said.trim().is_empty(),
        "promtool lint: {said}\n--- metrics ---\n{text}"
    );
    // The check is not vacuous: promtool flags a counter without `_total`.
    let (code, said) = promtool_check("# HELP x_bytes B.\n# TYPE x_bytes counter\nx_bytes 1\n");
    assert_ne!(
        code,
        Some(0),
        "promtool accepted a bad counter name: {said}"
    );
    assert!(said.contains("_total"), "{said}");
}
