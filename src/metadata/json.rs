//! Decoding external JSON so that every error says where it is.
//!
//! A plain `serde_json` error gives a position (`line 1 column 69`) but not the field. These
//! helpers decode through `serde_path_to_error` and report the JSON path the way validation
//! errors do (`network.mtu`, `hosts[2].subnets[0]`, `labels["io.rancher.x"]`), plus the line
//! and column when the input was text:
//!
//! `network.mtu: invalid type: string "big", expected u32 (line 1, column 69)`

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::{Path, Segment};

/// A JSON decode error: where (path and position) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// The JSON path (`hosts[2].subnets[0]`); empty for the document itself.
    pub path: String,
    /// 1-based line and column; 0 when the input was not text (a decoded [`Value`]).
    pub line: usize,
    pub column: usize,
    /// serde's message, without its position suffix.
    pub message: String,
}

impl JsonError {
    /// The same error inside `prefix` (a path: `prevResult`, `ipam`), for a document that was
    /// cut out of a bigger one.
    pub fn under(mut self, prefix: &str) -> JsonError {
        self.path = join(prefix, &self.path);
        self
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if self.line > 0 {
            write!(f, " (line {}, column {})", self.line, self.column)?;
        }
        Ok(())
    }
}

impl std::error::Error for JsonError {}

/// `prefix` followed by `path` (`prefix.path`, `prefix[0]...`).
fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() {
        path.to_string()
    } else if path.is_empty() || path.starts_with('[') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}.{path}")
    }
}

/// Decode a JSON text (the whole input: trailing characters are an error).
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    // The path-tracking decoder costs about as much as the parse itself (100,000 hosts:
    // BENCHMARKS.md), so a document is decoded plainly first and again with the path only
    // when it fails; the error is the same either way.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(convert)?;
    de.end().map_err(|e| plain(&e))?;
    Ok(value)
}

/// Decode a document as it is read (memory bounded by `T`, not by the document), with the
/// JSON path of an error.
pub fn from_reader<T: DeserializeOwned, R: std::io::Read>(r: R) -> Result<T, JsonError> {
    let mut de =
        serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(1 << 16, r));
    let value = serde_path_to_error::deserialize(&mut de).map_err(convert)?;
    de.end().map_err(|e| plain(&e))?;
    Ok(value)
}

/// [`from_slice`] of a string.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, JsonError> {
    from_slice(text.as_bytes())
}

/// Decode an already parsed document (no line and column to report).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, JsonError> {
    serde_path_to_error::deserialize(value).map_err(convert)
}

fn convert(e: serde_path_to_error::Error<serde_json::Error>) -> JsonError {
    let path = e.path().clone();
    let mut out = plain(e.inner());
    out.path = format_path(&path, &out.message);
    out
}

fn plain(e: &serde_json::Error) -> JsonError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = match full.strip_suffix(&suffix) {
        Some(m) if e.line() > 0 => m.to_string(),
        _ => full,
    };
    JsonError {
        path: String::new(),
        line: e.line(),
        column: e.column(),
        message,
    }
}

/// Whether a map key can be written as `.key` (else it is written `["key"]`).
fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The path as the validation errors print it: fields dotted, indices `[i]`, keys that are
/// not identifiers quoted (`labels["io.rancher.x"]`). A trailing unknown segment (a key
/// that did not parse) is left out, and so is the key an "unknown field" error names, so
/// that error reads `hosts[0]: unknown field `subnet``.
fn format_path(path: &Path, message: &str) -> String {
    let mut segments: Vec<&Segment> = path.iter().collect();
    while matches!(segments.last(), Some(Segment::Unknown)) {
        segments.pop();
    }
    if let Some(Segment::Map { key }) = segments.last() {
        if message.starts_with(&format!("unknown field `{key}`")) {
            segments.pop();
        }
    }
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !is_identifier(key) {
                    out.push_str(&format!("[{key:?}]"));
                } else {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        #[allow(dead_code)]
        n: u32,
        #[serde(default)]
        #[allow(dead_code)]
        labels: BTreeMap<String, String>,
    }

    fn err(text: &str) -> JsonError {
        from_str::<Doc>(text).unwrap_err()
    }

    #[test]
    fn wrong_type_names_the_nested_path_and_position() {
        let e = err(r#"{"items": [{"n": 1}, {"n": "x"}]}"#);
        assert_eq!(e.path, "items[1].n");
        assert_eq!((e.line, e.column), (1, 30));
        assert_eq!(
            e.to_string(),
            "items[1].n: invalid type: string \"x\", expected u32 (line 1, column 30)"
        );
    }

    #[test]
    fn keys_that_are_not_identifiers_are_quoted() {
        let e = err(r#"{"items": [{"n": 1, "labels": {"io.rancher.x": 5}}]}"#);
        assert_eq!(e.path, r#"items[0].labels["io.rancher.x"]"#);
    }

    #[test]
    fn unknown_field_names_the_object_missing_field_too() {
        let e = err(r#"{"items": [{"n": 1, "m": 2}]}"#);
        assert_eq!(e.path, "items[0]");
        assert!(e.message.starts_with("unknown field `m`"), "{e}");
        let e = err(r#"{"items": [{}, {}]}"#);
        assert_eq!(
            e.to_string(),
            "items[0]: missing field `n` (line 1, column 13)"
        );
        let e = err(r#"{}"#);
        assert_eq!(e.to_string(), "missing field `items` (line 1, column 2)");
    }

    #[test]
    fn syntax_errors_keep_the_position_and_the_enclosing_path() {
        let e = err("{\"items\": [{\"n\": 1},\n  {\"n\": 2 ");
        assert_eq!(e.path, "items[1]");
        assert_eq!(e.line, 2);
        assert!(e.message.starts_with("EOF while parsing"), "{e}");
        let e = err("");
        assert_eq!((e.path.as_str(), e.line), ("", 1));
        let e = err(r#"{"items": []} x"#);
        assert_eq!(e.to_string(), "trailing characters (line 1, column 15)");
    }

    #[test]
    fn values_have_no_position_and_prefixes_join() {
        let v = serde_json::json!({"items": [{"n": -1}]});
        let e = from_value::<Doc>(v).unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("items[0].n", 0));
        assert_eq!(
            e.clone().under("prevResult").to_string(),
            "prevResult.items[0].n: invalid value: integer `-1`, expected u32"
        );
        let e = from_value::<Vec<u32>>(serde_json::json!([1, "x"])).unwrap_err();
        assert_eq!(e.under("ips").path, "ips[1]");
    }
}
