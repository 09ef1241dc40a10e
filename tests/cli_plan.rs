//! `ipsec-mesh plan` end to end: the binary, real files, exit codes and stderr.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh.json")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("IPSEC_MESH_LOG")
        .output()
        .expect("run ipsec-mesh")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Run with a metadata document; expect failure with one clear stderr line containing `needle`.
fn rejects(doc: &str, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("meta.json");
    std::fs::write(&p, doc).unwrap();
    let o = run(&[
        "plan",
        "--metadata",
        p.to_str().unwrap(),
        "--host",
        "host-a",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{doc}\n{err}");
    assert!(o.stdout.is_empty());
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(err.contains("meta.json"), "file not named: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
}

fn psk_file(dir: &Path, content: &[u8], mode: u32) -> PathBuf {
    let p = dir.join("psk");
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

const BASE: &str = r#"{
  "network": { "cidr": "10.42.0.0/16", "backend": "ipsec", "mtu": 1500 },
  "hosts": [
    { "id": "host-a", "agent_ip": "192.168.77.1", "subnets": ["10.42.1.0/24"] },
    { "id": "host-b", "agent_ip": "192.168.77.2", "subnets": ["10.42.2.0/24"] }
  ]
}"#;

#[test]
fn table_is_the_default() {
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-a",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("host host-a (192.168.77.1)  backend ipsec"),
        "{out}"
    );
    assert!(out.contains("PEER"));
    assert!(
        out.lines().any(|l| l.starts_with("host-b  192.168.77.2")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("host-c  192.168.77.3")),
        "{out}"
    );
    assert!(!out.contains("KEY_OUT_ID"), "no keys without a PSK");
}

#[test]
fn json_contract_and_pair_symmetry() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"a test secret that is long enough for the check";
    let psk = psk_file(dir.path(), secret, 0o600);
    let plan = |host: &str| -> serde_json::Value {
        let o = run(&[
            "plan",
            "--metadata",
            example().to_str().unwrap(),
            "--host",
            host,
            "--psk-file",
            psk.to_str().unwrap(),
            "--format",
            "json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        assert!(!text.contains("a test secret"));
        serde_json::from_str(&text).unwrap()
    };
    let a = plan("host-a");
    let c = plan("host-c");
    assert_eq!(a["host"], "host-a");
    assert_eq!(a["backend"], "ipsec");
    let peers = a["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2);
    let ac = &peers[1];
    assert_eq!(ac["host"], "host-c");
    assert_eq!(ac["endpoint"], "192.168.77.3");
    assert_eq!(
        ac["subnets"],
        serde_json::json!(["10.42.3.0/24", "10.42.103.0/24"])
    );
    for f in ["reqid", "spi_out", "spi_in"] {
        assert!(ac[f].as_u64().unwrap() >= 256, "{f}");
    }
    let ca = &c["peers"][0];
    assert_eq!(ca["host"], "host-a");
    assert_eq!(ac["spi_out"], ca["spi_in"]);
    assert_eq!(ac["spi_in"], ca["spi_out"]);
    assert_eq!(ac["key_out_id"], ca["key_in_id"]);
    assert_eq!(ac["key_in_id"], ca["key_out_id"]);
    assert_eq!(ac["key_out_id"].as_str().unwrap().len(), 16);
}

#[test]
fn all_hosts_and_self_discovery_failure() {
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--all",
        "--format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);

    // This machine has none of the example's agent IPs, so without --host it must say so.
    let o = run(&["plan", "--metadata", example().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("cannot tell which host of") && e.contains("pass --host ID"),
        "{e}"
    );
}

#[test]
fn self_host_not_in_metadata() {
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-z",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("\"host-z\" is not in the metadata"), "{e}");
    assert!(e.contains("host-a, host-b, host-c"), "{e}");
}

#[test]
fn every_rejection_class_is_one_clear_line() {
    let cases: Vec<(String, &str)> = vec![
        ("{ \"network\": ".into(), "EOF while parsing"),
        (
            BASE.replace(
                "\"subnets\": [\"10.42.1.0/24\"]",
                "\"subnet\": [\"10.42.1.0/24\"]",
            ),
            "unknown field `subnet`",
        ),
        (
            BASE.replace("\"agent_ip\": \"192.168.77.1\", ", ""),
            "missing field `agent_ip`",
        ),
        (
            r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[]}"#.into(),
            "host list is empty",
        ),
        (BASE.replace("host-b", "host-a"), "duplicate host id"),
        (
            BASE.replace("192.168.77.2", "192.168.77.1"),
            "also the agent_ip of host \"host-a\"",
        ),
        (
            BASE.replace("10.42.2.0/24", "10.43.2.0/24"),
            "not inside the network cidr",
        ),
        (
            BASE.replace("10.42.2.0/24", "10.42.1.128/25"),
            "overlaps 10.42.1.0/24 of host \"host-a\"",
        ),
        (
            BASE.replace("10.42.2.0/24", "10.42.2.1/24"),
            "host bits set",
        ),
        (
            BASE.replace("192.168.77.2", "192.168.77.256"),
            "not an IP address",
        ),
        (
            BASE.replace("10.42.2.0/24", "10.42.2.0/40"),
            "prefix length",
        ),
        (
            BASE.replace("192.168.77.2", "10.42.200.2"),
            "inside the overlay cidr",
        ),
        (BASE.replace("\"host-b\"", "\"\""), "host id is empty"),
        (
            BASE.replace("\"ipsec\"", "\"ipsek\""),
            "unknown backend \"ipsek\"",
        ),
        (
            BASE.replace("1500", "1000"),
            "network.mtu: 1000 is outside 1280..=9000",
        ),
        (BASE.replace("1500", "9600"), "outside 1280..=9000"),
    ];
    for (doc, needle) in cases {
        rejects(&doc, needle);
    }
}

#[test]
fn not_utf8_names_position() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("meta.json");
    let mut bytes = BASE.as_bytes().to_vec();
    let at = BASE.find("host-b").unwrap();
    bytes[at] = 0xc3;
    bytes[at + 1] = 0x28;
    std::fs::write(&p, bytes).unwrap();
    let o = run(&[
        "plan",
        "--metadata",
        p.to_str().unwrap(),
        "--host",
        "host-a",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    let column = at - BASE[..at].rfind('\n').unwrap();
    assert_eq!(
        e,
        format!(
            "ipsec-mesh: error: {}: not valid UTF-8 (line 5, column {column})\n",
            p.display()
        )
    );
}

/// Run `plan` on `doc` (written to `dir/x.json`); expect exit 1 and exactly the one stderr
/// line `ipsec-mesh: error: <file>: <what>`.
fn rejects_exactly(doc: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.json");
    std::fs::write(&p, doc).unwrap();
    let o = run(&[
        "plan",
        "--metadata",
        p.to_str().unwrap(),
        "--host",
        "host-a",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{doc}\n{err}");
    assert!(o.stdout.is_empty());
    assert_eq!(err, format!("ipsec-mesh: error: {}: {what}\n", p.display()));
}

/// Line and column (as serde_json counts them: up to the end of the token) of the first
/// `token` in `doc`.
fn position_after(doc: &str, token: &str) -> (usize, usize) {
    let end = doc.find(token).unwrap() + token.len();
    let line = doc[..end].matches('\n').count() + 1;
    let line_start = doc[..end].rfind('\n').map_or(0, |i| i + 1);
    (line, end - line_start)
}

#[test]
fn a_string_for_the_mtu_names_network_mtu_and_the_position() {
    // One line, as in the issue: the value ends at column 69.
    let doc =
        r#"{"network": {"cidr": "10.42.0.0/16", "backend": "ipsec", "mtu": "big"}, "hosts": []}"#;
    let (line, column) = position_after(doc, "\"big\"");
    assert_eq!((line, column), (1, 69));
    rejects_exactly(
        doc,
        "network.mtu: invalid type: string \"big\", expected u32 (line 1, column 69)",
    );
    // The multi-line example.
    let doc = std::fs::read_to_string(example())
        .unwrap()
        .replace("\"mtu\": 1500", "\"mtu\": \"big\"");
    let (line, column) = position_after(&doc, "\"big\"");
    rejects_exactly(
        &doc,
        &format!(
            "network.mtu: invalid type: string \"big\", expected u32 (line {line}, column {column})"
        ),
    );
}

#[test]
fn a_wrong_type_in_a_third_hosts_subnets_names_the_indices() {
    let doc = std::fs::read_to_string(example())
        .unwrap()
        .replace("[\"10.42.3.0/24\", ", "[{\"cidr\": \"10.42.3.0/24\"}, ");
    // serde_json stops at the `{` it did not expect, before consuming it.
    let (line, column) = position_after(&doc, "\"subnets\": [{");
    rejects_exactly(
        &doc,
        &format!(
            "hosts[2].subnets[0]: invalid type: map, expected a string (line {line}, column {})",
            column - 1
        ),
    );
}

#[test]
fn unknown_and_missing_fields_and_truncation_name_their_object() {
    let doc = BASE.replace(
        "\"subnets\": [\"10.42.1.0/24\"]",
        "\"subnet\": [\"10.42.1.0/24\"]",
    );
    let (line, column) = position_after(&doc, "\"subnet\"");
    rejects_exactly(
        &doc,
        &format!(
            "hosts[0]: unknown field `subnet`, expected one of `id`, `agent_ip`, `subnets`, \
             `name`, `labels`, `vtep` (line {line}, column {column})"
        ),
    );
    let doc = BASE.replace("\"agent_ip\": \"192.168.77.2\", ", "");
    let (line, column) = position_after(&doc, "[\"10.42.2.0/24\"] }");
    rejects_exactly(
        &doc,
        &format!("hosts[1]: missing field `agent_ip` (line {line}, column {column})"),
    );
    let doc = &BASE[..BASE.find("\"host-b\"").unwrap()];
    let last = doc.lines().last().unwrap();
    rejects_exactly(
        doc,
        &format!(
            "hosts[1].id: EOF while parsing a value (line {}, column {})",
            doc.lines().count(),
            last.len()
        ),
    );
}

#[test]
fn psk_file_is_checked_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let meta = example();
    let meta = meta.to_str().unwrap();
    let check = |p: &Path, needle: &str| {
        let o = run(&[
            "plan",
            "--metadata",
            meta,
            "--host",
            "host-a",
            "--psk-file",
            p.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1));
        let e = stderr(&o);
        assert!(e.contains(needle), "{needle:?} not in {e}");
        assert!(!e.contains("hunter2"), "secret leaked: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    };
    check(&dir.path().join("absent"), "cannot read");
    let p = psk_file(
        dir.path(),
        b"hunter2-hunter2-hunter2-hunter2-hunter2",
        0o644,
    );
    check(&p, "chmod 600");
    let p = psk_file(dir.path(), b"hunter2", 0o600);
    check(&p, "at least 32");
}

#[test]
fn bad_flags_are_usage_errors() {
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-a",
        "--format",
        "xml",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-a",
        "--transform",
        "des",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("aes256gcm16"));
    let o = run(&[
        "plan",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-a",
        "--mark-encrypt",
        "0x400000",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("outside the mask"));
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn rekey_every_takes_the_generation_from_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let psk = psk_file(dir.path(), &[b'k'; 40], 0o600);
    let meta = example();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "--metadata",
            meta.to_str().unwrap(),
            "--host",
            "host-a",
            "--psk-file",
            psk.to_str().unwrap(),
            "--format",
            "json",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let plan_json = |extra: &[&str]| {
        let a = args(extra);
        let o = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap()
    };
    let t0 = unix_now();
    let v = plan_json(&["--rekey-every", "10", "--key-generation", "3"]);
    let t1 = unix_now();
    let gen = v["key_generation"].as_u64().unwrap();
    assert!(
        (3 + t0 / 10..=3 + t1 / 10).contains(&gen),
        "generation {gen} is not 3 + unix time / 10 ({t0}..{t1})"
    );
    for p in v["peers"].as_array().unwrap() {
        assert_eq!(p["out_generation"].as_u64(), Some(gen));
        assert_eq!(p["spi_out"].as_u64().unwrap() & 0xf, gen & 0xf);
        let rx: Vec<u64> = p["rx"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["generation"].as_u64().unwrap())
            .collect();
        assert_eq!(rx, vec![gen - 1, gen, gen + 1]);
    }
    // Without the flag the generation is the one given.
    let v = plan_json(&["--key-generation", "3"]);
    assert_eq!(v["key_generation"].as_u64(), Some(3));
}

#[test]
fn rekey_flags_that_cannot_work_are_refused_with_the_flag_named() {
    let dir = tempfile::tempdir().unwrap();
    let meta = example();
    let meta = meta.to_str().unwrap();
    let ring = dir.path().join("ring");
    std::fs::write(
        &ring,
        format!("# ipsec-mesh key ring v1\n1 {}\n", "s".repeat(40)),
    )
    .unwrap();
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let plain = psk_file(dir.path(), &[b'k'; 40], 0o600);
    let fails = |args: Vec<String>, needle: &str| {
        let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains(needle), "{needle:?} not in {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!e.contains(&"s".repeat(40)), "secret leaked: {e}");
    };
    let ring = ring.to_str().unwrap();
    let plain = plain.to_str().unwrap();
    let base = ["--metadata", meta, "--host", "host-a"];
    let with = |cmd: &str, extra: &[&str]| {
        let mut v = vec![cmd];
        v.extend_from_slice(&base);
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    fails(
        with("plan", &["--psk-file", ring, "--rekey-every", "60"]),
        "key ring",
    );
    fails(
        with("plan", &["--psk-file", plain, "--rekey-every", "5"]),
        "--rekey-every 5: the period must be at least 10 seconds",
    );
    fails(
        with(
            "apply",
            &[
                "--psk-file",
                plain,
                "--driver",
                "charon",
                "--rekey-every",
                "60",
            ],
        ),
        "charon rekeys its SAs over IKE",
    );
    fails(
        with(
            "run",
            &[
                "--psk-file",
                plain,
                "--driver",
                "xfrm",
                "--rekey-bytes",
                "100",
            ],
        ),
        "need --rekey-every",
    );
    fails(
        with(
            "run",
            &[
                "--psk-file",
                plain,
                "--driver",
                "xfrm",
                "--rekey-every",
                "60",
                "--rekey-packets",
                "0",
            ],
        ),
        "at least 1",
    );
}

#[test]
fn an_unknown_firewall_backend_is_refused_with_the_choices() {
    let o = run(&[
        "apply",
        "--metadata",
        example().to_str().unwrap(),
        "--host",
        "host-a",
        "--driver",
        "vxlan",
        "--firewall",
        "nft",
    ]);
    assert_eq!(o.status.code(), Some(2), "a usage error");
    let e = stderr(&o);
    assert!(
        e.contains("--firewall")
            && e.contains(
                "unknown firewall backend \"nft\" (one of: iptables, nftables, none, auto)"
            ),
        "{e}"
    );
}
