//! Delegation to an IPAM plugin, as the reference plugins do it: find the binary named by
//! `ipam.type` in `CNI_PATH`, run it with the same stdin and environment (only
//! `CNI_COMMAND` may differ), read its result or its error object.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use serde_json::Value;

use super::config::{Command, Env};
use super::spec::{code, CniError};

/// The plugin binary `kind` in the `CNI_PATH` directories (first match).
pub fn find(kind: &str, path: &[PathBuf]) -> Result<PathBuf, CniError> {
    use std::os::unix::fs::PermissionsExt;
    if path.is_empty() {
        return Err(CniError::env(format!(
            "CNI_PATH is empty: cannot find the IPAM plugin {kind:?}"
        )));
    }
    for dir in path {
        let p = dir.join(kind);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    Err(CniError::new(
        code::DELEGATE,
        format!(
            "IPAM plugin {kind:?} not found in CNI_PATH ({})",
            path.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        ),
    ))
}

/// Run `plugin` for `command` with `stdin`; the parsed stdout on success (None when it
/// printed nothing), the plugin's own error object otherwise (its code kept, its message
/// prefixed with the plugin's name).
pub fn exec(
    plugin: &Path,
    command: Command,
    env: &Env,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let name = plugin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fail = |msg: String| CniError::new(code::DELEGATE, format!("IPAM plugin {name}: {msg}"));
    let mut child = Process::new(plugin)
        .env("CNI_COMMAND", command.as_str())
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_ARGS", &env.args_raw)
        .env(
            "CNI_PATH",
            std::env::join_paths(&env.path).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", plugin.display())))?;
    if let Some(mut i) = child.stdin.take() {
        // A plugin that exits without reading stdin gives EPIPE here; its exit status and
        // output below tell what happened.
        let _ = i.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr_tail = stderr.lines().last().unwrap_or_default().to_string();
    let text = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<Value> = if text.trim().is_empty() {
        None
    } else {
        match crate::metadata::json::from_str::<Value>(text.trim()) {
            Ok(v) => Some(v),
            Err(e) => {
                return Err(fail(format!(
                    "{} printed something that is not JSON ({e})",
                    command.as_str()
                ))
                .with_details(stderr_tail))
            }
        }
    };
    if out.status.success() {
        return Ok(parsed);
    }
    match parsed.as_ref().and_then(CniError::from_json) {
        Some(mut e) => {
            e.msg = format!("IPAM plugin {name}: {}", e.msg);
            Err(e)
        }
        None => Err(
            fail(format!("{} failed ({})", command.as_str(), out.status)).with_details(stderr_tail),
        ),
    }
}

/// [`find`] then [`exec`].
pub fn run(
    kind: &str,
    command: Command,
    env: &Env,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let p = find(kind, &env.path)?;
    exec(&p, command, env, stdin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    fn env(path: &Path) -> Env {
        Env {
            command: Command::Add,
            container_id: "c1".into(),
            netns: "/x".into(),
            ifname: "eth0".into(),
            args: BTreeMap::new(),
            args_raw: "IgnoreUnknown=1;IP=10.42.1.9".into(),
            path: vec![PathBuf::from("/nonexistent"), path.to_path_buf()],
        }
    }

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn runs_and_reads_results_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "ok",
            r#"read -r line; echo "{\"cmd\":\"$CNI_COMMAND\",\"id\":\"$CNI_CONTAINERID\",\"args\":\"$CNI_ARGS\",\"in\":$line}""#,
        );
        script(
            dir.path(),
            "bad",
            r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"later"}'; exit 1"#,
        );
        script(dir.path(), "junk", "echo nope; echo oops >&2; exit 3");
        script(dir.path(), "quiet", "exit 0");
        let e = env(dir.path());
        let v = run("ok", Command::Del, &e, b"{\"a\":1}\n")
            .unwrap()
            .unwrap();
        assert_eq!(v["cmd"], "DEL");
        assert_eq!(v["id"], "c1");
        assert_eq!(
            v["args"], "IgnoreUnknown=1;IP=10.42.1.9",
            "CNI_ARGS reaches the IPAM"
        );
        assert_eq!(v["in"]["a"], 1);
        let err = run("bad", Command::Add, &e, b"{}").unwrap_err();
        assert_eq!((err.code, err.msg.as_str()), (11, "IPAM plugin bad: later"));
        let err = run("junk", Command::Add, &e, b"{}").unwrap_err();
        assert_eq!(err.code, code::DELEGATE);
        assert_eq!(err.details, "oops");
        assert_eq!(run("quiet", Command::Del, &e, b"{}").unwrap(), None);
        let err = run("missing", Command::Add, &e, b"{}").unwrap_err();
        assert_eq!(err.code, code::DELEGATE);
        assert!(
            err.msg.contains("not found in CNI_PATH (/nonexistent:"),
            "{err}"
        );
    }
}
