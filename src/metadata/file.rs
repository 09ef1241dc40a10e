//! The native metadata file (JSON, see docs/architecture.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::digest;

use super::{json, json_error, MetadataError, MetadataSource, Snapshot};
use crate::model::{Cluster, RawCluster};

/// How often a watched file is re-read.
const POLL: Duration = Duration::from_millis(200);

pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    pub fn new(path: impl Into<PathBuf>) -> FileSource {
        FileSource { path: path.into() }
    }

    fn read(&self) -> Result<Vec<u8>, MetadataError> {
        std::fs::read(&self.path).map_err(|source| MetadataError::Read {
            path: self.path.clone(),
            source,
        })
    }
}

/// The version of a file's content: a short digest, so an unchanged rewrite is no change.
fn version_of(bytes: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse and validate metadata bytes; `path` names the origin in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Cluster, MetadataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = position(bytes, e.valid_up_to());
        MetadataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            column,
        }
    })?;
    let origin = path.display().to_string();
    let raw: RawCluster = json::from_str(text).map_err(|e| json_error(&origin, e))?;
    Cluster::validate(&raw).map_err(|error| MetadataError::Invalid { origin, error })
}

/// 1-based line and column of byte `offset`.
fn position(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    (line, offset - line_start + 1)
}

impl MetadataSource for FileSource {
    fn origin(&self) -> String {
        self.path.display().to_string()
    }

    fn load(&mut self) -> Result<Snapshot, MetadataError> {
        let bytes = self.read()?;
        let cluster = parse(&self.path, &bytes)?;
        Ok(Snapshot {
            cluster,
            version: version_of(&bytes),
            self_id: None,
        })
    }

    fn wait_for_change(
        &mut self,
        version: &str,
        max_wait: Duration,
    ) -> Result<Option<String>, MetadataError> {
        let deadline = Instant::now() + max_wait;
        loop {
            // A file that vanished or cannot be read is a change the caller must see (load
            // then reports the error and the caller keeps its last good state).
            let now = match self.read() {
                Ok(bytes) => version_of(&bytes),
                Err(_) => "unreadable".to_string(),
            };
            if now != version {
                return Ok(Some(now));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(left.min(POLL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
  "network": { "cidr": "10.42.0.0/16", "backend": "ipsec", "mtu": 1500 },
  "hosts": [
    { "id": "host-a", "agent_ip": "192.168.77.1", "subnets": ["10.42.1.0/24"] },
    { "id": "host-b", "agent_ip": "192.168.77.2", "subnets": ["10.42.2.0/24"], "name": "b", "labels": {} }
  ]
}"#;

    fn parse_str(s: &str) -> Result<Cluster, MetadataError> {
        parse(Path::new("meta.json"), s.as_bytes())
    }

    #[test]
    fn parses_design_example() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.hosts.len(), 2);
        assert_eq!(c.hosts[1].name.as_deref(), Some("b"));
    }

    /// Line and 1-based column just after the first `needle` in `text` (where serde_json
    /// reports an error about the value `needle`).
    fn after(text: &str, needle: &str) -> (usize, usize) {
        let at = text.find(needle).unwrap() + needle.len();
        let line = text[..at].matches('\n').count() + 1;
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        (line, at - line_start)
    }

    fn parse_error(s: &str) -> json::JsonError {
        match parse_str(s).unwrap_err() {
            MetadataError::Parse { origin, error } => {
                assert_eq!(origin, "meta.json");
                error
            }
            e => panic!("expected a parse error, got {e}"),
        }
    }

    #[test]
    fn unknown_field_names_its_object_and_position() {
        let bad = GOOD.replace(
            "\"subnets\": [\"10.42.1.0/24\"]",
            "\"subnet\": [\"10.42.1.0/24\"]",
        );
        let e = parse_error(&bad);
        assert_eq!(e.path, "hosts[0]");
        assert_eq!((e.line, e.column), after(&bad, "\"subnet\""));
        let msg = parse_str(&bad).unwrap_err().to_string();
        assert!(
            msg.starts_with("meta.json: hosts[0]: unknown field `subnet`, expected one of"),
            "{msg}"
        );
        assert!(
            msg.ends_with(&format!("(line 4, column {})", e.column)),
            "{msg}"
        );
    }

    #[test]
    fn missing_field_names_its_object() {
        let bad = GOOD.replace("\"agent_ip\": \"192.168.77.1\", ", "");
        let e = parse_error(&bad);
        assert_eq!(e.path, "hosts[0]");
        assert_eq!(e.message, "missing field `agent_ip`");
        let bad = GOOD.replace("\"cidr\": \"10.42.0.0/16\", ", "");
        let msg = parse_str(&bad).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "meta.json: network: missing field `cidr` (line 2, column {})",
                after(&bad, "\"mtu\": 1500 }").1
            )
        );
    }

    #[test]
    fn wrong_type_at_a_nested_position_names_the_path() {
        let bad = GOOD.replace("[\"10.42.2.0/24\"]", "[7]");
        let e = parse_error(&bad);
        assert_eq!(e.path, "hosts[1].subnets[0]");
        assert_eq!(e.message, "invalid type: integer `7`, expected a string");
        assert_eq!((e.line, e.column), after(&bad, "[7"));

        let bad = GOOD.replace("\"mtu\": 1500", "\"mtu\": \"big\"");
        let (line, column) = after(&bad, "\"big\"");
        assert_eq!(
            parse_str(&bad).unwrap_err().to_string(),
            format!(
                "meta.json: network.mtu: invalid type: string \"big\", expected u32 (line {line}, column {column})"
            )
        );
        let bad = GOOD.replace("\"mtu\": 1500", "\"mtu\": -1");
        let e = parse_error(&bad);
        assert_eq!(e.path, "network.mtu");
        assert!(e.message.contains("-1"), "{e}");
        let bad = GOOD.replace("\"labels\": {}", "\"labels\": {\"zone\": 1, \"a.b\": 2}");
        assert_eq!(parse_error(&bad).path, "hosts[1].labels.zone");
        let bad = GOOD.replace("\"labels\": {}", "\"labels\": {\"a.b\": 2}");
        assert_eq!(parse_error(&bad).path, "hosts[1].labels[\"a.b\"]");
        let bad = GOOD
            .replace("\"hosts\": [", "\"hosts\": {")
            .replace("}\n  ]", "}\n  }");
        let e = parse_error(&bad);
        assert_eq!(e.path, "hosts");
        assert!(e.message.contains("expected a sequence"), "{e}");
    }

    #[test]
    fn truncated_json_keeps_line_column_and_the_open_path() {
        let bad = &GOOD[..GOOD.find("\"host-b\"").unwrap()];
        let e = parse_error(bad);
        assert_eq!(e.path, "hosts[1].id");
        assert!(e.message.starts_with("EOF while parsing"), "{e}");
        let last_line = bad.lines().last().unwrap();
        assert_eq!((e.line, e.column), (5, last_line.len()));

        let bad = GOOD.replace("\"mtu\": 1500 }", "\"mtu\": 1500 ]");
        let e = parse_error(&bad);
        assert_eq!(e.path, "network");
        assert_eq!(e.message, "expected `,` or `}`");
        assert_eq!((e.line, e.column), after(&bad, "1500 ]"));

        let e = parse_error("");
        assert_eq!(
            parse_str("").unwrap_err().to_string(),
            "meta.json: EOF while parsing a value (line 1, column 0)"
        );
        assert_eq!(e.path, "");
        let e = parse_error(&format!("{GOOD} {{}}"));
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            ("", "trailing characters")
        );
    }

    #[test]
    fn not_utf8_has_position() {
        let mut bytes = GOOD.as_bytes().to_vec();
        let at = GOOD.find("host-b").unwrap();
        bytes[at] = 0xff;
        let e = parse(Path::new("m.json"), &bytes).unwrap_err();
        assert!(matches!(e, MetadataError::NotUtf8 { line: 5, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "m.json: not valid UTF-8 (line 5, column {})",
                at - GOOD[..at].rfind('\n').unwrap()
            )
        );
    }

    #[test]
    fn validation_error_names_file_host_and_field() {
        let bad = GOOD.replace("10.42.2.0/24", "10.43.2.0/24");
        let msg = parse_str(&bad).unwrap_err().to_string();
        assert_eq!(
            msg,
            "meta.json: hosts[1] (id \"host-b\").subnets[0]: 10.43.2.0/24 is not inside the network cidr 10.42.0.0/16"
        );
    }

    #[test]
    fn missing_file_names_path() {
        let mut s = FileSource::new("/nonexistent/ipsec-mesh.json");
        let msg = s.load().unwrap_err().to_string();
        assert!(
            msg.starts_with("/nonexistent/ipsec-mesh.json: cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn watch_sees_a_change_and_a_removal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(&p, GOOD).unwrap();
        let mut s = FileSource::new(&p);
        let v = s.load().unwrap().version;
        assert_eq!(
            s.wait_for_change(&v, Duration::from_millis(50)).unwrap(),
            None
        );
        std::fs::write(&p, GOOD.replace("1500", "1400")).unwrap();
        let v2 = s
            .wait_for_change(&v, Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert_ne!(v, v2);
        assert_eq!(s.load().unwrap().version, v2);
        std::fs::remove_file(&p).unwrap();
        assert!(s
            .wait_for_change(&v2, Duration::from_secs(1))
            .unwrap()
            .is_some());
        assert!(s.load().is_err());
    }
}
