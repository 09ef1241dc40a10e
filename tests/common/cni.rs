//! One CNI plugin runner for the tests: a plugin binary run as a runtime runs it (the CNI_*
//! variables, the network config on stdin, the answer on stdout), optionally inside a host's
//! network namespace. tests/cni_errors.rs (no root, no `common`) includes this file by path.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// The variables of the CNI spec: only those given are set (none leak from the test's own
/// environment).
const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// What a plugin answered: its exit status, stdout as JSON (`null` when empty), stderr.
#[derive(Debug)]
pub struct Answer {
    pub ok: bool,
    pub json: Value,
    pub stderr: String,
}

/// Start `bin` (inside network namespace `host_ns` when given) with `env` and `stdin`.
pub fn spawn(host_ns: Option<&str>, bin: &str, env: &[(&str, &str)], stdin: &str) -> Child {
    let mut cmd = match host_ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    for k in CNI_VARS {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child
}

/// The answer in `out`; panics when stdout is neither empty nor one JSON document.
pub fn answer(out: &Output) -> Answer {
    let text = String::from_utf8_lossy(&out.stdout);
    Answer {
        ok: out.status.success(),
        json: if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text.trim())
                .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {text:?}"))
        },
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `bin` to completion ([`spawn`], [`answer`]).
pub fn run(host_ns: Option<&str>, bin: &str, env: &[(&str, &str)], stdin: &str) -> Answer {
    answer(&spawn(host_ns, bin, env, stdin).wait_with_output().unwrap())
}
