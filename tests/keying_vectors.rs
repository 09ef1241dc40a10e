//! docs/keying.md's known-answer vectors: the project, the table in the document and an
//! independent implementation (tests/keying_reference.py: Python's hmac/hashlib, written
//! from the spec) agree on every key, key id, SPI and reqid.

use std::process::Command;

use ipsec_mesh::plan::ids::{assign, SLOT_BITS};
use ipsec_mesh::plan::{KeyDeriver, Psk, Transform};

const DOC: &str = include_str!("../docs/keying.md");

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The vector rows of the document's table (between the markers).
fn doc_rows() -> Vec<String> {
    let start = DOC
        .find("<!-- vectors:begin -->")
        .expect("docs/keying.md has a vectors:begin marker");
    let end = DOC
        .find("<!-- vectors:end -->")
        .expect("vectors:end marker");
    DOC[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| psk") && !l.starts_with("|--"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The same row, computed by this project.
fn ours(psk: &[u8], src: &str, dst: &str, generation: u32, t: &str) -> String {
    let transform: Transform = t.parse().expect("transform");
    let k = KeyDeriver::new(&Psk::from_bytes(psk)).derive(src, dst, generation, transform);
    let ids = assign(&[src, dst], SLOT_BITS);
    let spi = ipsec_mesh::plan::ids::spi(ids[0], ids[1], generation);
    format!(
        "| {} | {src} | {dst} | {generation} | {t} | {}{} | {} | {spi:#010x} | {:#010x} |",
        hex(psk),
        hex(k.enc()),
        hex(k.auth()),
        k.id(),
        ids[0].reqid()
    )
}

#[test]
fn the_document_table_is_what_the_project_derives() {
    let rows = doc_rows();
    assert!(rows.len() >= 8, "{} vectors in docs/keying.md", rows.len());
    for row in rows {
        let f: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(f.len(), 9, "{row}");
        let got = ours(&unhex(f[0]), f[1], f[2], f[3].parse().unwrap(), f[4]);
        assert_eq!(got, row, "docs/keying.md vector differs from the project");
    }
}

#[test]
fn an_independent_implementation_agrees() {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/keying_reference.py"
        ))
        .output()
        .expect("python3 runs (the machine image has CPython 3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(py, doc_rows(), "Python reference vs docs/keying.md");
}
