//! Shared helpers for root-only integration tests.
#![allow(dead_code)]

use std::process::{Command, Stdio};

/// The cluster generator (benches/common includes it too).
pub mod cluster;
/// The CNI plugin runner (cni_errors includes it too).
pub mod cni;
/// Our firewall objects of either backend, and the backend `--firewall auto` picks here.
pub mod firewall;
/// The fake rancher-metadata server and Rancher-shaped environments.
pub mod rancher;

/// A real 3-member etcd cluster in network namespaces (tests/netns_etcd.rs, benches/etcd.rs).
pub mod etcd;

pub use ipsec_mesh::dataplane::netns::{in_new_netns, is_root};

/// Root-only tests are `#[ignore = "needs root: ..."]`, so a plain `cargo test` reports them
/// as ignored (never as passed); `integration/run.sh` runs them as root with
/// `--include-ignored`. Run without root anyway, they fail: a root test never passes silently.
#[macro_export]
macro_rules! require_root {
    () => {
        assert!(
            $crate::common::is_root(),
            "{} needs root (network namespaces): run it through integration/run.sh as root",
            module_path!()
        );
    };
}

/// A test that needs an external program fails (never skips) when it is missing: the test
/// command installs it (integration/setup.sh).
#[track_caller]
pub fn require_program(path: &str, package: &str) {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: run integration/setup.sh (Debian package {package})"
    );
}

/// Run a command (in the caller's thread namespace), panic with its stderr on failure,
/// return stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` on a thread that entered the named network namespace `ns` (sockets it creates live
/// there and stay there when handed to other threads; threads it spawns stay there too).
pub fn in_netns<T, F>(ns: &str, f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Named network namespaces of one test and a scratch directory; every namespace is deleted
/// on drop, also when the test panics. Names are `<kind><pid><tag>-<role>`, so parallel tests
/// and leftovers of a killed run never collide.
pub struct Namespaces {
    pub prefix: String,
    pub names: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Namespaces {
    pub fn new(kind: &str, tag: &str) -> Namespaces {
        Namespaces {
            prefix: format!("{kind}{}{tag}", std::process::id()),
            names: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// The full name of namespace `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Create namespace `role` (replacing a leftover of the same name) with `lo` up.
    pub fn add(&mut self, role: &str) -> String {
        let n = self.ns(role);
        let _ = Command::new("ip")
            .args(["netns", "del", &n])
            .stderr(Stdio::null())
            .status();
        sh(&format!("ip netns add {n}"));
        self.names.push(n.clone());
        sh(&format!("ip -n {n} link set lo up"));
        n
    }
}

impl Namespaces {
    /// Run `cmd` with `sh -c` inside namespace `role`; panic with its stderr on failure.
    pub fn sh(&self, role: &str, cmd: &str) -> String {
        sh(&format!("ip netns exec {} sh -c '{cmd}'", self.ns(role)))
    }

    /// Whether `cmd` succeeds inside namespace `role`.
    pub fn try_sh(&self, role: &str, cmd: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(role), "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// charon-systemd from Debian (installed by integration/setup.sh).
pub const CHARON: &str = "/usr/sbin/charon-systemd";

/// The documented override (charon-conf/README.md): a strongswan.conf in `dir` that includes
/// the shipped `charon-conf/<shipped>` and re-sets the VICI socket (`dir/charon.vici`) and
/// the log file (`dir/charon.log`). Returns its path.
pub fn write_charon_conf(dir: &std::path::Path, shipped: &str) -> std::path::PathBuf {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charon-conf")
        .join(shipped);
    let conf = dir.join("strongswan.conf");
    std::fs::write(
        &conf,
        format!(
            "include {}\ncharon {{\n  plugins {{ vici {{ socket = unix://{} }} }}\n  filelog {{ ipsec-mesh {{ path = {} }} }}\n}}\n",
            base.display(),
            dir.join("charon.vici").display(),
            dir.join("charon.log").display()
        ),
    )
    .unwrap();
    conf
}

/// Start charon-systemd in netns `ns` with `conf` (its own process group).
pub fn charon_start(ns: &str, conf: &std::path::Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    Command::new("ip")
        .args(["netns", "exec", ns, CHARON])
        .env("STRONGSWAN_CONF", conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start charon-systemd")
}

/// Send `sig` to a started charon.
pub fn charon_signal(child: &Option<std::process::Child>, sig: libc::c_int) {
    if let Some(c) = child {
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe { libc::kill(c.id() as libc::pid_t, sig) };
    }
}

/// SIGKILL: charon leaves its socket file behind.
pub fn charon_kill9(child: &mut Option<std::process::Child>) {
    charon_signal(child, libc::SIGKILL);
    if let Some(mut c) = child.take() {
        let _ = c.wait();
    }
}

/// SIGTERM, then SIGKILL after 5 s.
pub fn charon_stop(child: &mut Option<std::process::Child>) {
    charon_signal(child, libc::SIGTERM);
    if let Some(mut c) = child.take() {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Whether the running kernel can hold ESP SAs (`CONFIG_INET_ESP`): this machine's kernel
/// cannot (/work/shared/TESTBED.md), the VM kernel under qemu can. Probed once per test
/// process by adding one `cbc(aes)` + `hmac(sha256)` tunnel-mode SA in a throwaway network
/// namespace (created and deleted here, never the caller's). Root only: the namespace needs
/// it, and a probe that cannot run panics instead of guessing.
pub fn kernel_has_esp() -> bool {
    static ESP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ESP.get_or_init(probe_kernel_esp)
}

fn probe_kernel_esp() -> bool {
    let ns = format!("espprobe{}", std::process::id());
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ESP probe: spawn ip {}: {e}", args.join(" ")))
    };
    let _ = ip(&["netns", "del", &ns]);
    let add = ip(&["netns", "add", &ns]);
    assert!(
        add.status.success(),
        "ESP probe: ip netns add {ns}: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    let sa = ip(&[
        "-n",
        &ns,
        "xfrm",
        "state",
        "add",
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x101",
        "reqid",
        "1",
        "mode",
        "tunnel",
        "enc",
        "cbc(aes)",
        "0x000102030405060708090a0b0c0d0e0f",
        "auth-trunc",
        "hmac(sha256)",
        "0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        "128",
    ]);
    let del = ip(&["netns", "del", &ns]);
    assert!(
        del.status.success(),
        "ESP probe: ip netns del {ns}: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    let has = sa.status.success();
    eprintln!(
        "ESP probe: this kernel {} ESP SAs{}",
        if has { "holds" } else { "cannot hold" },
        if has {
            String::new()
        } else {
            format!(
                " (ip xfrm state add: {})",
                String::from_utf8_lossy(&sa.stderr).trim()
            )
        }
    );
    has
}

/// ipsec-mesh's SAs (reqid in its range) in `ip xfrm state` output `text`, as (src, dst, spi,
/// reqid), sorted. One block per SA starts with a line `src A dst B` (its `sel src` line is
/// inside the block).
pub fn parse_our_sas(text: &str) -> Vec<(String, String, u32, u32)> {
    let mut blocks: Vec<String> = Vec::new();
    for l in text.lines() {
        match blocks.last_mut() {
            Some(b) if !l.starts_with("src ") => {
                b.push(' ');
                b.push_str(l);
            }
            _ => blocks.push(l.to_string()),
        }
    }
    let mut v: Vec<(String, String, u32, u32)> = blocks
        .iter()
        .filter_map(|b| {
            let w: Vec<&str> = b.split_whitespace().collect();
            let after = |k: &str| w.iter().position(|x| *x == k).map(|i| w[i + 1]);
            let spi = u32::from_str_radix(after("spi")?.trim_start_matches("0x"), 16).ok()?;
            let reqid: u32 = after("reqid")?.parse().ok()?;
            ipsec_mesh::plan::ids::is_owned_reqid(reqid)
                .then(|| (w[1].to_string(), w[3].to_string(), spi, reqid))
        })
        .collect();
    v.sort();
    v
}
