//! Shared helpers for root-only integration tests.
#![allow(dead_code)]

use std::process::{Command, Stdio};

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
