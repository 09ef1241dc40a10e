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

/// The pre-shared secret.
pub struct Psk(Zeroizing<Vec<u8>>);

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
        if buf.len() < PSK_MIN_LEN {
            return Err(PskError::TooShort {
                path: path.to_path_buf(),
                len: buf.len(),
            });
        }
        Ok(Psk(buf))
    }

    /// A PSK from bytes (tests, benchmarks). No length check.
    pub fn from_bytes(bytes: &[u8]) -> Psk {
        Psk(Zeroizing::new(bytes.to_vec()))
    }

    /// The secret, for drivers that must hand it on (charon's `load-shared`).
    pub fn expose(&self) -> &[u8] {
        &self.0
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

/// Derives SA keys; holds the extracted PRK so each key costs one HKDF-Expand.
pub struct KeyDeriver {
    prk: hkdf::Prk,
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
            prk: salt.extract(psk.expose()),
        }
    }

    /// The key of the SA from `src` to `dst`.
    pub fn derive(&self, src: &str, dst: &str, generation: u32, transform: Transform) -> SaKey {
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
        self.prk
            .expand(&info, Len(len))
            .and_then(|okm| okm.fill(&mut bytes))
            .expect("HKDF output length is far below its limit");
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"ipsec-mesh/v1 key-id");
        ctx.update(&bytes);
        let id = ctx.finish().as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
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
