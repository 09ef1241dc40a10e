//! The CNI plugin binaries' contract without a kernel (no root needed): VERSION, and every
//! malformed input answered with an error object (spec code + message) on stdout and a
//! non-zero exit, never a crash. Also `ipsec-mesh cni-config`.

use std::process::Command;

use serde_json::{json, Value};

#[path = "common/cni.rs"]
mod cni;

const BRIDGE: &str = env!("CARGO_BIN_EXE_ipsec-mesh-bridge");
const IPAM: &str = env!("CARGO_BIN_EXE_ipsec-mesh-ipam");
const MESH: &str = env!("CARGO_BIN_EXE_ipsec-mesh");

/// Run `bin` with `env` (CNI_* unset otherwise) and `stdin`: (exit ok, stdout JSON).
fn run(bin: &str, env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    let a = cni::run(None, bin, env, stdin);
    (a.ok, a.json)
}

const ADD: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "cn-errors-test"),
    ("CNI_NETNS", "/var/run/netns/cn-none"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/nonexistent"),
];

/// Expect an error object with `code` whose msg contains `needle`.
#[track_caller]
fn fails(bin: &str, env: &[(&str, &str)], stdin: &str, code: u64, needle: &str) {
    let (ok, v) = run(bin, env, stdin);
    assert!(!ok, "expected failure, got {v}");
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    assert!(v["cniVersion"].is_string(), "{v}");
}

fn bridge_conf(extra: Value) -> String {
    let mut v = json!({"cniVersion": "1.0.0", "name": "mesh", "type": "ipsec-mesh-bridge",
                       "mtu": 1400, "ipam": {"type": "ipsec-mesh-ipam", "metadata": "/m.json"}});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

#[test]
fn version() {
    for bin in [BRIDGE, IPAM] {
        let (ok, v) = run(bin, &[("CNI_COMMAND", "VERSION")], "");
        assert!(ok);
        let vs: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        assert!(vs.contains(&"1.0.0") && vs.contains(&"0.4.0"), "{v}");
        let (_, v) = run(
            bin,
            &[("CNI_COMMAND", "VERSION")],
            r#"{"cniVersion":"1.0.0"}"#,
        );
        assert_eq!(v["cniVersion"], "1.0.0");
    }
}

#[test]
fn malformed_input_gives_error_objects() {
    for bin in [BRIDGE, IPAM] {
        fails(bin, &[], "{}", 4, "CNI_COMMAND is not set");
        fails(bin, &[("CNI_COMMAND", "FROB")], "{}", 4, "FROB");
        fails(bin, &ADD[..1], "{}", 4, "CNI_CONTAINERID is required");
        fails(bin, ADD, "{\"cniVersion\":", 6, "not valid JSON");
        fails(bin, ADD, "[]", 6, "not a JSON object");
        fails(
            bin,
            ADD,
            r#"{"cniVersion":"0.1.0","name":"n","type":"t"}"#,
            1,
            "cniVersion \"0.1.0\" is not supported",
        );
        fails(
            bin,
            ADD,
            r#"{"cniVersion":"1.0.0","type":"t"}"#,
            7,
            "name is missing",
        );
    }
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"ipam": null})),
        7,
        "ipam is missing",
    );
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"mtu": "big"})),
        7,
        "mtu must be a number",
    );
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"mtu": null, "ipam": {"type": "host-local"}})),
        7,
        "cannot choose an MTU",
    );
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"bridge": "way-too-long-bridge"})),
        7,
        "longer than 15",
    );
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"hairpinMode": 1})),
        7,
        "hairpinMode must be true or false",
    );
    fails(
        IPAM,
        ADD,
        &bridge_conf(json!({"ipam": {"type": "ipsec-mesh-ipam"}})),
        7,
        "ipam.metadata is missing",
    );
    fails(IPAM, ADD, &bridge_conf(json!({})), 101, "/m.json");
    // Without an explicit MTU the bridge asks the planner: the same metadata error.
    fails(
        BRIDGE,
        ADD,
        &bridge_conf(json!({"mtu": null})),
        101,
        "/m.json",
    );
    // CHECK needs 0.4.0 or later.
    let mut check = ADD.to_vec();
    check[0] = ("CNI_COMMAND", "CHECK");
    fails(
        BRIDGE,
        &check,
        &bridge_conf(json!({"cniVersion": "0.3.1"})),
        1,
        "CHECK needs cniVersion 0.4.0",
    );
}

#[test]
fn ipam_unknown_host_and_bad_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("m.json");
    std::fs::write(
        &meta,
        r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[{"id":"host-a","agent_ip":"192.0.2.1","subnets":["10.42.1.0/24"]}]}"#,
    )
    .unwrap();
    let conf = |host: &str| {
        json!({"cniVersion": "1.0.0", "name": "mesh", "type": "ipsec-mesh-ipam",
               "ipam": {"type": "ipsec-mesh-ipam", "metadata": meta, "host": host,
                        "dataDir": dir.path().join("d")}})
        .to_string()
    };
    fails(
        IPAM,
        ADD,
        &conf("host-z"),
        102,
        "host \"host-z\" is not in the metadata",
    );
    let (ok, v) = run(IPAM, ADD, &conf("host-a"));
    assert!(ok, "{v}");
    assert_eq!(v["ips"][0]["address"], "10.42.1.2/24");
    std::fs::write(
        &meta,
        r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[],"typo":1}"#,
    )
    .unwrap();
    fails(IPAM, ADD, &conf("host-a"), 101, "unknown field");
    // A corrupt allocation store is reported, not overwritten.
    std::fs::write(dir.path().join("d/allocations.json"), "garbage").unwrap();
    let mut del = ADD.to_vec();
    del[0] = ("CNI_COMMAND", "DEL");
    fails(IPAM, &del, &conf("host-a"), 104, "allocations.json");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("d/allocations.json")).unwrap(),
        "garbage"
    );
}

#[test]
fn bridge_reports_a_missing_ipam_plugin() {
    let conf = bridge_conf(json!({}));
    let (ok, v) = run(BRIDGE, ADD, &conf);
    assert!(!ok);
    // The netns does not exist: refused before the IPAM plugin is even looked for.
    assert_eq!(v["code"], 107, "{v}");
    let mut del = ADD.to_vec();
    del[0] = ("CNI_COMMAND", "DEL");
    fails(
        BRIDGE,
        &del,
        &conf,
        106,
        "IPAM plugin \"ipsec-mesh-ipam\" not found in CNI_PATH",
    );
}

#[test]
fn cni_config_prints_a_conflist_and_a_conf() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("m.json");
    std::fs::write(
        &meta,
        r#"{"network":{"cidr":"10.42.0.0/16","mtu":9000},"hosts":[{"id":"host-a","agent_ip":"192.0.2.1","subnets":["10.42.1.0/24"]},{"id":"host-b","agent_ip":"192.0.2.2","subnets":[]}]}"#,
    )
    .unwrap();
    let m = meta.to_str().unwrap();
    let out = Command::new(MESH)
        .args([
            "cni-config",
            "--metadata",
            m,
            "--host",
            "host-a",
            "--bridge",
            "br-mesh",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["name"], "ipsec-mesh");
    let p = &v["plugins"][0];
    assert_eq!(p["type"], "ipsec-mesh-bridge");
    assert_eq!(p["bridge"], "br-mesh");
    assert_eq!(p["mtu"], 8946, "the planner's MTU: 9000 - ESP overhead");
    assert_eq!(p["ipam"]["type"], "ipsec-mesh-ipam");
    assert_eq!(p["ipam"]["host"], "host-a");
    assert_eq!(p["ipam"]["metadata"], m);

    let out = Command::new(MESH)
        .args([
            "cni-config",
            "--metadata",
            m,
            "--host",
            "host-a",
            "--format",
            "conf",
        ])
        .args(["--name", "n2", "--udp-encap"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "ipsec-mesh-bridge");
    assert_eq!(v["name"], "n2");
    assert!(
        v["mtu"].as_u64().unwrap() < 8946,
        "UDP encapsulation costs more: {v}"
    );

    // A host without subnets gets no config.
    let out = Command::new(MESH)
        .args(["cni-config", "--metadata", m, "--host", "host-b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no container subnet"));
}

/// Run and expect an error object: (code, msg, details).
#[track_caller]
fn error_of(bin: &str, env: &[(&str, &str)], stdin: &str) -> (u64, String, String) {
    let (ok, v) = run(bin, env, stdin);
    assert!(!ok, "expected failure, got {v}");
    assert!(v["cniVersion"].is_string(), "{v}");
    (
        v["code"].as_u64().unwrap_or_default(),
        v["msg"].as_str().unwrap_or_default().to_string(),
        v["details"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn stdin_errors_name_the_json_path() {
    // Wrong types, at the top and nested: msg is `<path> must be ..., not ...`.
    for (bin, conf, msg) in [
        (
            BRIDGE,
            bridge_conf(json!({"mtu": "big"})),
            "mtu must be a number, not a string",
        ),
        (
            BRIDGE,
            bridge_conf(json!({"runtimeConfig": {"mac": 5}})),
            "runtimeConfig.mac must be a string, not a number",
        ),
        (
            IPAM,
            bridge_conf(
                json!({"ipam": {"type": "ipsec-mesh-ipam", "metadata": "/m.json",
                                        "dataDir": ["/tmp"]}}),
            ),
            "ipam.dataDir must be a string, not an array",
        ),
        (
            IPAM,
            bridge_conf(
                json!({"ipam": {"type": "ipsec-mesh-ipam", "metadata": "/m.json",
                                        "routes": [{"dst": "0.0.0.0/0"}, {"dst": 10}]}}),
            ),
            "ipam.routes[1].dst must be a string, not a number",
        ),
    ] {
        assert_eq!(
            error_of(bin, ADD, &conf),
            (7, msg.to_string(), String::new())
        );
    }

    // Not JSON: code 6, the msg names where it broke off, details add the position.
    let text = "{\"cniVersion\": \"1.0.0\", \"name\": \"mesh\", \"type\": \"t\",\n \"ipam\": {\"routes\": [{\"dst\": ";
    for bin in [BRIDGE, IPAM] {
        let (code, msg, details) = error_of(bin, ADD, text);
        assert_eq!(code, 6);
        assert_eq!(
            msg,
            "the network configuration is not valid JSON at ipam.routes[0].dst"
        );
        assert_eq!(
            details,
            format!(
                "ipam.routes[0].dst: EOF while parsing a value (line 2, column {})",
                text.lines().last().unwrap().len()
            )
        );
    }
}

#[test]
fn metadata_prev_result_and_store_errors_name_the_json_path() {
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("m.json");
    let good = r#"{"network":{"cidr":"10.42.0.0/16","mtu":1500},"hosts":[{"id":"host-a","agent_ip":"192.0.2.1","subnets":["10.42.1.0/24"]}]}"#;
    let conf = |extra: Value| {
        let mut v = json!({"cniVersion": "1.0.0", "name": "mesh", "type": "ipsec-mesh-ipam",
               "ipam": {"type": "ipsec-mesh-ipam", "metadata": meta, "host": "host-a",
                        "dataDir": dir.path().join("d")}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    };

    // The mesh metadata file: file name, JSON path and position in msg.
    let bad = good.replace("1500", "\"big\"");
    std::fs::write(&meta, &bad).unwrap();
    let column = bad.find("\"big\"").unwrap() + "\"big\"".len();
    assert_eq!(
        error_of(IPAM, ADD, &conf(json!({}))),
        (
            101,
            format!(
                "mesh metadata: {}: network.mtu: invalid type: string \"big\", expected u32 \
                 (line 1, column {column})",
                meta.display()
            ),
            String::new()
        )
    );
    let bad = good.replace("[\"10.42.1.0/24\"]", "[\"10.42.1.0/24\", 42]");
    std::fs::write(&meta, &bad).unwrap();
    let (code, msg, _) = error_of(IPAM, ADD, &conf(json!({})));
    assert_eq!(code, 101);
    assert!(
        msg.contains(": hosts[0].subnets[1]: invalid type: integer `42`, expected a string"),
        "{msg}"
    );

    // prevResult on CHECK: the path continues inside it.
    std::fs::write(&meta, good).unwrap();
    let (ok, v) = run(IPAM, ADD, &conf(json!({})));
    assert!(ok, "{v}");
    let mut check = ADD.to_vec();
    check[0] = ("CNI_COMMAND", "CHECK");
    let prev = json!({"prevResult": {"cniVersion": "1.0.0",
                                     "ips": [{"address": "10.42.1.2/24", "gateway": 7}]}});
    let (code, msg, _) = error_of(IPAM, &check, &conf(prev));
    assert_eq!(code, 7);
    assert!(
        msg.starts_with("prevResult.ips[0].gateway: invalid type: integer `7`"),
        "{msg}"
    );

    // The allocation store (our own file): its path and the JSON path in it.
    let store = dir.path().join("d/allocations.json");
    let text = std::fs::read_to_string(&store).unwrap();
    let broken = text.replacen("\"container\": \"cn-errors-test\"", "\"container\": 7", 1);
    assert_ne!(broken, text, "the store format changed: {text}");
    std::fs::write(&store, &broken).unwrap();
    let mut del = ADD.to_vec();
    del[0] = ("CNI_COMMAND", "DEL");
    let (code, msg, _) = error_of(IPAM, &del, &conf(json!({})));
    assert_eq!(code, 104);
    assert!(msg.contains(&store.display().to_string()), "{msg}");
    assert!(
        msg.contains("(allocations[\"10.42.1.2\"].container: invalid type: integer `7`"),
        "{msg}"
    );
}
