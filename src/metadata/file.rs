//! The native metadata file (JSON, see DESIGN.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ring::digest;

use super::{json_error, MetadataError, MetadataSource, Snapshot};
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
    let raw: RawCluster = serde_json::from_str(text).map_err(|e| json_error(&origin, &e))?;
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

    #[test]
    fn unknown_field_is_an_error_with_position() {
        let bad = GOOD.replace(
            "\"subnets\": [\"10.42.1.0/24\"]",
            "\"subnet\": [\"10.42.1.0/24\"]",
        );
        let e = parse_str(&bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("meta.json:4:"), "{msg}");
        assert!(msg.contains("unknown field `subnet`"), "{msg}");
    }

    #[test]
    fn missing_field_is_named() {
        let bad = GOOD.replace("\"agent_ip\": \"192.168.77.1\", ", "");
        let msg = parse_str(&bad).unwrap_err().to_string();
        assert!(msg.contains("missing field `agent_ip`"), "{msg}");
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let bad = GOOD.replace("\"mtu\": 1500 }", "\"mtu\": 1500 ");
        match parse_str(&bad).unwrap_err() {
            MetadataError::Parse { line, column, .. } => {
                assert!(line >= 3 && column > 0, "{line}:{column}")
            }
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn not_utf8_has_position() {
        let mut bytes = GOOD.as_bytes().to_vec();
        let at = GOOD.find("host-b").unwrap();
        bytes[at] = 0xff;
        let e = parse(Path::new("m.json"), &bytes).unwrap_err();
        assert!(matches!(e, MetadataError::NotUtf8 { line: 5, .. }), "{e}");
        assert!(e.to_string().starts_with("m.json:5:"), "{e}");
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
    fn wrong_types_and_empty_input() {
        assert!(parse_str("")
            .unwrap_err()
            .to_string()
            .starts_with("meta.json:1:"));
        let bad = GOOD.replace("\"mtu\": 1500", "\"mtu\": \"big\"");
        assert!(parse_str(&bad)
            .unwrap_err()
            .to_string()
            .contains("invalid type"));
        let bad = GOOD.replace("\"mtu\": 1500", "\"mtu\": -1");
        assert!(parse_str(&bad).is_err());
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
