//! The xfrm driver's route mode (`--xfrm-mode route|auto`, dataplane/xfrmi) against the
//! running kernel, in a fresh network namespace per test (root only).
//!
//! What holds depends on whether the kernel has XFRM interfaces (`xfrm_interface`): this
//! machine's kernel has none, so `route` must fail with one clear error naming the missing
//! feature and leave the dataplane exactly as it was, and `auto` must fall back to policy
//! mode. Under a kernel with them (the VM kernel, integration/vm/test-root-suites.sh) `route`
//! and `auto` make one interface per peer; the real-ESP end-to-end checks of route mode are
//! the VM suite's (integration/vm/xfrm-e2e.sh, mode `route`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{in_new_netns, sh};

const BIN: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const PSK: &str = "a-test-only-psk-that-is-long-enough-0123456789";

/// Three hosts with Rancher-like addressing: a few random-looking /32s each.
const META: &str = r#"{"network":{"cidr":"10.42.0.0/16"},"hosts":[
 {"id":"host-1","agent_ip":"192.168.77.1","subnets":["10.42.7.19/32","10.42.200.3/32"]},
 {"id":"host-2","agent_ip":"192.168.77.2","subnets":["10.42.9.4/32","10.42.77.41/32","10.42.130.8/32"]},
 {"id":"host-3","agent_ip":"192.168.77.3","subnets":["10.42.31.2/32","10.42.4.250/32"]}]}"#;

fn mesh(dir: &std::path::Path, cmd: &str, mode: &str) -> Output {
    let meta = dir.join("meta.json");
    let psk = dir.join("psk");
    let mut args: Vec<String> = vec![cmd.into()];
    if cmd == "apply" {
        args.extend(
            [
                "--metadata",
                meta.to_str().unwrap(),
                "--host",
                "host-1",
                "--psk-file",
                psk.to_str().unwrap(),
            ]
            .map(String::from),
        );
    }
    args.extend(["--driver", "xfrm", "--xfrm-mode", mode].map(String::from));
    Command::new(BIN)
        .args(&args)
        .env("IPSEC_MESH_LOG", "info")
        .output()
        .unwrap()
}

fn files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("meta.json"), META).unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(&psk, PSK).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

/// Everything a driver could write in this namespace, as text (counters left out).
fn dataplane() -> String {
    let nft = sh("nft list ruleset 2>/dev/null || true");
    let nft: Vec<&str> = nft
        .lines()
        .map(|l| l.split(" counter packets").next().unwrap_or(l))
        .collect();
    [
        sh("ip -o link | sed 's/^[0-9]*: //' | cut -d' ' -f1-3 | sort"),
        sh("ip xfrm policy"),
        sh("ip xfrm state"),
        sh("ip rule"),
        sh("ip -4 route show table all; ip -6 route show table all"),
        sh("iptables-save | grep -v '^#' | sed 's/\\[[0-9]*:[0-9]*\\]//'"),
        nft.join("\n"),
    ]
    .join("\n---\n")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether this kernel makes XFRM interfaces (asked with iproute2, apart from the product's
/// own probe, in the test's namespace).
fn kernel_has_xfrmi() -> bool {
    let ok = Command::new("ip")
        .args(["link", "add", "imxt0", "type", "xfrm", "if_id", "7"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if ok {
        sh("ip link del imxt0");
    }
    ok
}

fn underlay() {
    sh(
        "ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 \
        && ip link set ul0 up && ip link set ul1 up",
    );
}

/// Our interfaces (`imx*` of kind xfrm).
fn our_links() -> Vec<String> {
    sh("ip -o -d link show type xfrm 2>/dev/null || true")
        .lines()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap().to_string())
        })
        .filter(|n| n.starts_with("imx"))
        .collect()
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn route_mode_fails_clearly_without_xfrm_interfaces_and_auto_falls_back_to_policy() {
    require_root!();
    in_new_netns(|| {
        underlay();
        let dir = files();
        let has = kernel_has_xfrmi();
        let before = dataplane();

        let o = mesh(dir.path(), "apply", "route");
        let out = text(&o);
        if has {
            // This kernel can: one interface per peer, 3 policies each + 2 inbound blocks.
            assert_eq!(our_links().len(), 2, "{out}");
            let pols = sh("ip xfrm policy | grep -c '^src' || true");
            assert_eq!(pols.trim(), "8", "{out}");
        } else {
            assert!(
                !o.status.success(),
                "route without xfrm_interface must fail: {out}"
            );
            assert!(
                out.contains("no XFRM interfaces") && out.contains("CONFIG_XFRM_INTERFACE"),
                "the error names the missing kernel feature: {out}"
            );
            assert_eq!(
                out.matches("CONFIG_XFRM_INTERFACE").count(),
                1,
                "one error, said once: {out}"
            );
            assert_eq!(dataplane(), before, "nothing written: {out}");
        }

        // auto: route where the kernel can, else policy mode (the choice is logged).
        let o = mesh(dir.path(), "apply", "auto");
        let out = text(&o);
        let policies = sh("ip xfrm policy");
        if has {
            assert!(out.contains("xfrm_mode=route"), "{out}");
            assert_eq!(our_links().len(), 2, "{out}");
        } else {
            assert!(out.contains("xfrm_mode=policy"), "{out}");
            assert!(
                out.contains("no XFRM interfaces"),
                "the reason is logged: {out}"
            );
            assert!(
                !out.contains("--xfrm-mode route: this kernel"),
                "not an error: {out}"
            );
            assert!(our_links().is_empty());
            // Policy mode: the block policy and 3 per remote prefix (5 remote /32s).
            assert!(
                policies.contains("action block") && policies.contains("mark 0x100000/0x300000"),
                "{policies}"
            );
            assert_eq!(
                policies.matches("\nsrc ").count() + 1,
                3 * 5 + 1,
                "{policies}"
            );
            assert!(
                !policies.contains("if_id"),
                "no interface ids in policy mode: {policies}"
            );
            // Without ESP the SAs are reported per peer (exit 1), as in policy mode.
            assert!(
                out.contains("CONFIG_INET_ESP") || o.status.success(),
                "{out}"
            );
        }

        // cleanup (any mode) leaves the namespace as it was before the first apply.
        let o = mesh(dir.path(), "cleanup", "auto");
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(dataplane(), before, "cleanup left something: {}", text(&o));
    })
    .unwrap();
}
