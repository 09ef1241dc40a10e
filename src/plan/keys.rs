//! Per-pair, per-direction ESP keys from one pre-shared secret (HKDF-SHA256, `ring`).
//!
//! `PRK = HKDF-Extract(salt = "ipsec-mesh/v1 psk", PSK)`, computed once per plan, then for the
//! SA from `src` to `dst`:
//! `key = HKDF-Expand(PRK, info = "ipsec-mesh/v1 esp" | transform | generation | src | dst)`
//! with every variable part length-prefixed, so no two (pair, direction, generation,
//! transform) share a key. A key's *id* is `SHA-256("ipsec-mesh/v1 key-id" | key)[..8]` in
//! hex: both ends compute the same id for the same SA, and it reveals nothing of the key.
//!
//! Secrets ([`Psk`], [`SaKey`]) are zeroed on drop, print as `<redacted>` and cannot be
//! serialized.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::{digest, hkdf};
use zeroize::Zeroizing;

use super::transform::Transform;

/// Shortest PSK accepted, in bytes.
pub const PSK_MIN_LEN: usize = 32;
/// Longest PSK accepted, in bytes (a sanity bound on what is read).
pub const PSK_MAX_LEN: usize = 4096;

/// First line of a key-ring PSK file (one secret per key generation; see [`Psk::from_file`]).
pub const RING_HEADER: &str = "# ipsec-mesh key ring v1";

/// The pre-shared secret: one for every key generation, or a key ring (a secret per
/// generation, so the PSK can be replaced across a fleet one host at a time).
pub struct Psk {
    /// `(None, s)`: `s` keys every generation; `(Some(g), s)`: generation `g` only.
    secrets: Vec<(Option<u32>, Zeroizing<Vec<u8>>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("PSK file {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("PSK file {path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "PSK file {path}: mode {mode:04o} lets group or others access it; run: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("PSK file {path}: the secret is {len} bytes; at least {PSK_MIN_LEN} are required")]
    TooShort { path: PathBuf, len: usize },
    #[error("PSK file {path}: larger than {PSK_MAX_LEN} bytes")]
    TooLong { path: PathBuf },
    #[error("PSK file {path}: key ring line {line}: {why}")]
    Ring {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

impl Psk {
    /// Read a PSK file: owner-only permissions, at least [`PSK_MIN_LEN`] bytes once one
    /// trailing newline (`\n` or `\r\n`) is removed.
    pub fn from_file(path: &Path) -> Result<Psk, PskError> {
        let read_err = |source| PskError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let meta = f.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(PskError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(PskError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut buf = Zeroizing::new(Vec::with_capacity(128));
        (&mut f)
            .take(PSK_MAX_LEN as u64 + 3)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        if buf.ends_with(b"\n") {
            buf.pop();
            if buf.ends_with(b"\r") {
                buf.pop();
            }
        }
        if buf.len() > PSK_MAX_LEN {
            return Err(PskError::TooLong {
                path: path.to_path_buf(),
            });
        }
        if buf.starts_with(RING_HEADER.as_bytes()) {
            return Psk::parse_ring(path, &buf);
        }
        if buf.len() < PSK_MIN_LEN {
            return Err(PskError::TooShort {
                path: path.to_path_buf(),
                len: buf.len(),
            });
        }
        Ok(Psk {
            secrets: vec![(None, buf)],
        })
    }

    /// A key ring: the header line, then `GENERATION SECRET` per line (blank lines and
    /// `#` comments allowed); each secret is the rest of its line, at least
    /// [`PSK_MIN_LEN`] bytes; a generation appears once. Errors never show a secret.
    fn parse_ring(path: &Path, text: &[u8]) -> Result<Psk, PskError> {
        let err = |line: usize, why: String| PskError::Ring {
            path: path.to_path_buf(),
            line,
            why,
        };
        let mut secrets: Vec<(Option<u32>, Zeroizing<Vec<u8>>)> = Vec::new();
        for (i, raw) in text.split(|&b| b == b'\n').enumerate().skip(1) {
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = line.trim_ascii();
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let n = i + 1;
            let split = line
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .ok_or_else(|| err(n, "expected `GENERATION SECRET`".into()))?;
            let gen = std::str::from_utf8(&line[..split])
                .ok()
                .and_then(|g| g.parse::<u32>().ok())
                .ok_or_else(|| err(n, "the generation is not a number (0 to 4294967295)".into()))?;
            let secret = line[split..].trim_ascii();
            if secret.len() < PSK_MIN_LEN {
                return Err(err(
                    n,
                    format!(
                        "generation {gen}: the secret is {} bytes; at least {PSK_MIN_LEN} are required",
                        secret.len()
                    ),
                ));
            }
            if secrets.iter().any(|(g, _)| *g == Some(gen)) {
                return Err(err(n, format!("generation {gen} is listed twice")));
            }
            secrets.push((Some(gen), Zeroizing::new(secret.to_vec())));
        }
        if secrets.is_empty() {
            return Err(err(1, "the key ring lists no generation".into()));
        }
        Ok(Psk { secrets })
    }

    /// A PSK from bytes (tests, benchmarks): one secret for every generation. No length check.
    pub fn from_bytes(bytes: &[u8]) -> Psk {
        Psk {
            secrets: vec![(None, Zeroizing::new(bytes.to_vec()))],
        }
    }

    /// A key ring from `(generation, secret)` pairs (tests). No length check.
    pub fn ring(entries: &[(u32, &[u8])]) -> Psk {
        Psk {
            secrets: entries
                .iter()
                .map(|(g, s)| (Some(*g), Zeroizing::new(s.to_vec())))
                .collect(),
        }
    }

    /// Whether this PSK has a secret for `generation`.
    pub fn covers(&self, generation: u32) -> bool {
        self.secrets
            .iter()
            .any(|(g, _)| g.is_none() || *g == Some(generation))
    }

    /// The generations of a key ring (`None`: one secret for every generation).
    pub fn generations(&self) -> Option<Vec<u32>> {
        let v: Vec<u32> = self.secrets.iter().filter_map(|(g, _)| *g).collect();
        (v.len() == self.secrets.len()).then_some(v)
    }

    /// The secret, for drivers that must hand it on (charon's `load-shared`): the only one,
    /// or a key ring's highest generation.
    pub fn expose(&self) -> &[u8] {
        self.secrets
            .iter()
            .max_by_key(|(g, _)| *g)
            .map(|(_, s)| s.as_slice())
            .unwrap_or_default()
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// Key material of one SA.
#[derive(Clone, PartialEq, Eq)]
pub struct SaKey {
    bytes: Zeroizing<Vec<u8>>,
    transform: Transform,
    id: String,
}

impl SaKey {
    /// The key as the kernel's encryption (or AEAD) algorithm takes it.
    pub fn enc(&self) -> &[u8] {
        &self.bytes[..self.transform.enc_key_len()]
    }

    /// The integrity key (empty for AEAD transforms).
    pub fn auth(&self) -> &[u8] {
        &self.bytes[self.transform.enc_key_len()..]
    }

    /// The public fingerprint (16 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn transform(&self) -> Transform {
        self.transform
    }
}

impl fmt::Debug for SaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaKey({} id={} <redacted>)", self.transform, self.id)
    }
}

/// Derives SA keys; holds the extracted PRK of each secret so each key costs one
/// HKDF-Expand.
pub struct KeyDeriver {
    prks: Vec<(Option<u32>, hkdf::Prk)>,
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl KeyDeriver {
    pub fn new(psk: &Psk) -> KeyDeriver {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ipsec-mesh/v1 psk");
        KeyDeriver {
            prks: psk
                .secrets
                .iter()
                .map(|(g, s)| (*g, salt.extract(s)))
                .collect(),
        }
    }

    /// The generations a key ring lists, for messages ("all" for a single secret).
    pub fn generations_listed(&self) -> String {
        if self.prks.iter().any(|(g, _)| g.is_none()) {
            return "all".into();
        }
        let mut v: Vec<u32> = self.prks.iter().filter_map(|(g, _)| *g).collect();
        v.sort_unstable();
        v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    }

    /// Whether a key can be derived for `generation` (a key ring lists it).
    pub fn covers(&self, generation: u32) -> bool {
        self.prks
            .iter()
            .any(|(g, _)| g.is_none() || *g == Some(generation))
    }

    /// The key of the SA from `src` to `dst`. With a key ring, the secret of `generation`
    /// (callers check [`covers`](Self::covers); an uncovered generation uses the first
    /// secret, never a missing one).
    pub fn derive(&self, src: &str, dst: &str, generation: u32, transform: Transform) -> SaKey {
        let prk = &self
            .prks
            .iter()
            .find(|(g, _)| *g == Some(generation))
            .or_else(|| self.prks.iter().find(|(g, _)| g.is_none()))
            .or(self.prks.first())
            .expect("a PSK has at least one secret")
            .1;
        let tname = transform.name().as_bytes();
        let gen = generation.to_be_bytes();
        let (tl, sl, dl) = (
            (tname.len() as u16).to_be_bytes(),
            (src.len() as u16).to_be_bytes(),
            (dst.len() as u16).to_be_bytes(),
        );
        let info: [&[u8]; 8] = [
            b"ipsec-mesh/v1 esp",
            &tl,
            tname,
            &gen,
            &sl,
            src.as_bytes(),
            &dl,
            dst.as_bytes(),
        ];
        let len = transform.key_len();
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        prk.expand(&info, Len(len))
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("HKDF output length is far below its limit");
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"ipsec-mesh/v1 key-id");
        ctx.update(&bytes);
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(16);
        for b in &ctx.finish().as_ref()[..8] {
            id.push(HEX[usize::from(b >> 4)] as char);
            id.push(HEX[usize::from(b & 0xf)] as char);
        }
        SaKey {
            bytes,
            transform,
            id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk() -> Psk {
        Psk::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn keys_differ_by_direction_pair_generation_and_transform() {
        let d = KeyDeriver::new(&psk());
        let t = Transform::Aes256Gcm16;
        let ab = d.derive("a", "b", 1, t);
        assert_eq!(ab.enc().len(), 36);
        assert!(ab.auth().is_empty());
        assert_eq!(ab, d.derive("a", "b", 1, t));
        for other in [
            d.derive("b", "a", 1, t),
            d.derive("a", "c", 1, t),
            d.derive("a", "b", 2, t),
            d.derive("ab", "", 1, t),
        ] {
            assert_ne!(ab.enc(), other.enc());
            assert_ne!(ab.id(), other.id());
        }
        let cbc = d.derive("a", "b", 1, Transform::Aes128Sha256);
        assert_eq!((cbc.enc().len(), cbc.auth().len()), (16, 32));
        assert_ne!(&cbc.enc()[..16], &ab.enc()[..16]);
        let other_psk = KeyDeriver::new(&Psk::from_bytes(b"another secret, also 32 bytes...."));
        assert_ne!(other_psk.derive("a", "b", 1, t).id(), ab.id());
    }

    #[test]
    fn key_id_is_stable_hex_and_secrets_do_not_print() {
        let k = KeyDeriver::new(&psk()).derive("host-a", "host-b", 1, Transform::Aes256Gcm16);
        assert_eq!(k.id().len(), 16);
        assert!(k.id().chars().all(|c| c.is_ascii_hexdigit()));
        let dbg = format!("{k:?} {:?}", psk());
        assert!(dbg.contains("redacted"));
        let hex: String = k.enc().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!dbg.contains(&hex[..8]));
        assert!(!dbg.contains("0123456789abcdef"));
    }

    fn write(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn key_ring_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = "old-secret-old-secret-old-secret-1";
        let b = "new-secret-new-secret-new-secret-2";
        let text = format!("{RING_HEADER}\n# rotation 2026-12\n\n3 {a}\r\n4\t{b}  \n");
        let ring = Psk::from_file(&write(dir.path(), "ring", text.as_bytes(), 0o600)).unwrap();
        assert_eq!(ring.generations(), Some(vec![3, 4]));
        assert!(ring.covers(3) && ring.covers(4) && !ring.covers(5));
        assert_eq!(ring.expose(), b.as_bytes(), "charon gets the newest secret");
        // Generation 3 of the ring derives exactly what the plain secret does.
        let plain = KeyDeriver::new(&Psk::from_bytes(a.as_bytes()));
        let d = KeyDeriver::new(&ring);
        let t = Transform::Aes256Gcm16;
        assert_eq!(d.derive("x", "y", 3, t), plain.derive("x", "y", 3, t));
        assert_ne!(d.derive("x", "y", 4, t), plain.derive("x", "y", 4, t));
        assert_eq!(d.generations_listed(), "3, 4");
        assert_eq!(plain.generations_listed(), "all");
        assert!(plain.covers(12345));

        let bad = |name: &str, body: &str| {
            let f = write(
                dir.path(),
                name,
                format!("{RING_HEADER}\n{body}").as_bytes(),
                0o600,
            );
            Psk::from_file(&f).unwrap_err().to_string()
        };
        let e = bad("short", "1 tooshort-secret\n");
        assert!(e.contains("line 2") && e.contains("at least 32"), "{e}");
        assert!(!e.contains("tooshort"), "no secret in errors: {e}");
        let e = bad("dup", &format!("1 {a}\n1 {b}\n"));
        assert!(e.contains("line 3") && e.contains("listed twice"), "{e}");
        assert!(!e.contains(a) && !e.contains(b), "{e}");
        let e = bad("nogen", &format!("x {a}\n"));
        assert!(e.contains("not a number"), "{e}");
        let e = bad("empty", "# nothing\n");
        assert!(e.contains("lists no generation"), "{e}");
        let e = bad("one-field", "7\n");
        assert!(e.contains("GENERATION SECRET"), "{e}");
    }

    #[test]
    fn psk_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let secret = b"0123456789abcdef0123456789abcdef";
        let mut with_nl = secret.to_vec();
        with_nl.extend_from_slice(b"\r\n");
        let ok = write(dir.path(), "ok", &with_nl, 0o600);
        assert_eq!(Psk::from_file(&ok).unwrap().expose(), secret);

        let open = write(dir.path(), "open", secret, 0o644);
        let e = Psk::from_file(&open).unwrap_err();
        assert!(
            matches!(e, PskError::Permissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
        let group = write(dir.path(), "group", secret, 0o640);
        assert!(matches!(
            Psk::from_file(&group),
            Err(PskError::Permissions { .. })
        ));

        let short = write(dir.path(), "short", b"tooshort-but-secret\n", 0o600);
        let e = Psk::from_file(&short).unwrap_err();
        assert!(matches!(e, PskError::TooShort { len: 19, .. }), "{e}");
        assert!(
            !e.to_string().contains("tooshort"),
            "the secret must not appear: {e}"
        );

        let e = Psk::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, PskError::Read { .. }));
        assert!(e.to_string().contains("missing"));

        assert!(matches!(
            Psk::from_file(dir.path()),
            Err(PskError::NotAFile { .. }) | Err(PskError::Permissions { .. })
        ));

        let long = write(dir.path(), "long", &vec![b'x'; PSK_MAX_LEN + 1], 0o600);
        assert!(matches!(
            Psk::from_file(&long),
            Err(PskError::TooLong { .. })
        ));
    }
}
