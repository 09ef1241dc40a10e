//! Shared helpers for root-only integration tests.
#![allow(dead_code)]

use std::process::{Command, Stdio};

pub use ipsec_mesh::dataplane::netns::{in_new_netns, is_root};

/// Skip (loudly) when not root. CI runs as root, so there the test runs.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!(
                "SKIP {}: needs root (network namespaces); CI runs it as root",
                module_path!()
            );
            return;
        }
    };
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
