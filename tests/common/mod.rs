//! Shared helpers for root-only integration tests.
#![allow(dead_code)]

use std::process::Command;

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
