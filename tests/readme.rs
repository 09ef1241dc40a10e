//! README.md's commands that need no root, run literally against the shipped `examples/`.
//!
//! The test reads README.md itself (not a copy): every ```sh block that contains a
//! `cargo run` line is run line by line with `sh -c` in the project directory, exactly as
//! printed, and must exit 0. A block with one command that is directly followed by a plain
//! ``` block must print exactly that block. Commands are also checked by what they claim:
//! `--format json` prints the plan contract's fields, `--all` prints every host's view,
//! `cni-config` prints a network configuration list for our two plugins.
//!
//! `cargo run` is run for real (it checks `default-run`): the outer `cargo test` has finished
//! building when tests run, so the nested cargo finds the binary fresh and only runs it.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const README: &str = include_str!("../README.md");

/// A fenced code block: its info string, its body, and the plain block right after it (the
/// documented output), if there is one.
#[derive(Debug)]
struct Block {
    lang: String,
    body: String,
    output: Option<String>,
    line: usize,
}

fn blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut raw: Vec<(String, String, usize, usize)> = Vec::new(); // lang, body, first, last
    let mut i = 0;
    while i < lines.len() {
        if let Some(lang) = lines[i].strip_prefix("```") {
            let start = i;
            let mut body = String::new();
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            raw.push((lang.trim().to_string(), body, start, i));
        }
        i += 1;
    }
    let mut out = Vec::new();
    let mut k = 0;
    while k < raw.len() {
        let (lang, body, first, last) = &raw[k];
        let output = raw
            .get(k + 1)
            .filter(|n| lang == "sh" && n.0.is_empty() && between_is_blank(&lines, *last, n.2))
            .map(|n| n.1.clone());
        k += if output.is_some() { 2 } else { 1 };
        out.push(Block {
            lang: lang.clone(),
            body: body.clone(),
            output,
            line: first + 1,
        });
    }
    out
}

fn between_is_blank(lines: &[&str], after: usize, before: usize) -> bool {
    lines[after + 1..before].iter().all(|l| l.trim().is_empty())
}

/// The text of the `## heading` section (up to the next `## `).
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no '## {heading}' section"));
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 4);
    &rest[..end]
}

/// Commands of a block: one per line, blank lines and whole-line comments skipped.
fn commands(body: &str) -> Vec<&str> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

struct Ran {
    cmd: String,
    stdout: String,
}

fn run(cmd: &str, line: usize) -> Ran {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "README.md line {line}: `{cmd}` exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ran {
        cmd: cmd.to_string(),
        stdout: String::from_utf8(out.stdout).expect("utf-8 output"),
    }
}

/// The host ids of the shipped example, read from the file the README names.
fn example_hosts() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap().to_string())
        .collect()
}

fn check_plan_json(r: &Ran) {
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed no JSON: {e}\n{}", r.cmd, r.stdout));
    let with_psk = r.cmd.contains("--psk-file");
    let host = v["host"].as_str().expect("host");
    assert!(r.cmd.contains(&format!("--host {host}")), "{}", r.cmd);
    assert!(v["backend"].is_string(), "backend: {v}");
    let peers = v["peers"].as_array().expect("peers[]");
    assert_eq!(
        peers.len(),
        example_hosts().len() - 1,
        "one peer per other host"
    );
    for p in peers {
        for f in ["host", "endpoint"] {
            assert!(p[f].is_string(), "peers[].{f}: {p}");
        }
        assert!(
            p["subnets"].as_array().is_some_and(|s| !s.is_empty()),
            "{p}"
        );
        for f in ["reqid", "spi_out", "spi_in"] {
            assert!(p[f].as_u64().is_some_and(|n| n > 0), "peers[].{f}: {p}");
        }
        for f in ["key_out_id", "key_in_id"] {
            if with_psk {
                let id = p[f].as_str().unwrap_or_else(|| panic!("peers[].{f}: {p}"));
                assert!(
                    id.len() >= 8 && id.chars().all(|c| c.is_ascii_hexdigit()),
                    "{f} is a hex fingerprint: {id}"
                );
            } else {
                assert!(p[f].is_null(), "no key ids without a PSK: {p}");
            }
        }
    }
}

fn check_plan_all(r: &Ran) {
    for h in example_hosts() {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(&format!("host {h} "))),
            "`{}` shows host {h}'s view:\n{}",
            r.cmd,
            r.stdout
        );
    }
}

fn check_cni_config(r: &Ran) {
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed no JSON: {e}\n{}", r.cmd, r.stdout));
    assert!(v["cniVersion"].is_string(), "{v}");
    let plugins = v["plugins"].as_array().expect("a conflist");
    assert_eq!(plugins[0]["type"], "ipsec-mesh-bridge", "{v}");
    assert_eq!(plugins[0]["ipam"]["type"], "ipsec-mesh-ipam", "{v}");
}

/// Every `cargo run` block of the README, in order (a block may depend on an earlier one,
/// e.g. the PSK file the Quickstart writes).
#[test]
fn readme_commands_run_as_printed() {
    let all = blocks(README);
    let quick = blocks(section(README, "Quickstart"));
    assert!(
        quick
            .iter()
            .any(|b| b.lang == "sh" && b.body.contains("cargo run")),
        "the Quickstart has a cargo run block"
    );
    let mut ran = 0;
    let mut seen = (false, false, false); // json, --all, cni-config
    for b in all
        .iter()
        .filter(|b| b.lang == "sh" && b.body.contains("cargo run"))
    {
        let cmds = commands(&b.body);
        let mut last = None;
        for c in &cmds {
            let r = run(c, b.line);
            if c.starts_with("cargo run") {
                if c.contains(" plan ") && c.contains("--format json") {
                    check_plan_json(&r);
                    seen.0 = true;
                }
                if c.contains(" plan ") && c.contains("--all") {
                    check_plan_all(&r);
                    seen.1 = true;
                }
                if c.contains(" cni-config ") {
                    check_cni_config(&r);
                    seen.2 = true;
                }
            }
            ran += 1;
            last = Some(r);
        }
        if let Some(want) = &b.output {
            assert_eq!(
                cmds.len(),
                1,
                "README.md line {}: output follows a one-command block",
                b.line
            );
            let got = last.unwrap().stdout;
            assert_eq!(
                got.trim_end(),
                want.trim_end(),
                "README.md line {}: `{}` prints what the README shows",
                b.line,
                cmds[0]
            );
        }
    }
    assert!(ran >= 4, "ran {ran} README commands");
    assert_eq!(
        seen,
        (true, true, true),
        "the README shows plan --format json, plan --all and cni-config as runnable commands"
    );
}

#[test]
fn block_parser_pairs_commands_with_their_output() {
    let text =
        "x\n```sh\necho hi\n```\n\n```\nhi\n```\n\n```sh\nls\n```\ntext\n```\nnot output\n```\n";
    let b = blocks(text);
    assert_eq!(b.len(), 3, "{b:?}");
    assert_eq!(b[0].output.as_deref(), Some("hi\n"));
    assert_eq!(b[1].output, None, "text between: not the command's output");
    assert_eq!(b[2].lang, "");
    assert_eq!(commands("# c\n\nfoo  # x\n"), vec!["foo  # x"]);
}
