//! Can this kernel hold ESP SAs? Asked when charon (with `kernel-netlink`) fails to set up
//! a CHILD_SA: when both ends lack ESP, the responder fails first and answers
//! `NO_PROPOSAL_CHOSEN`, so the initiator never sees its own kernel refuse, and only a local
//! probe can tell the operator the real cause.
//!
//! The probe adds one throwaway SA (documentation addresses, AES-CBC + HMAC-SHA-256, an SPI
//! and reqid outside ipsec-mesh's range) over the xfrm driver's netlink socket and deletes it
//! again. ESP support is kernel-wide, so the network namespace does not matter.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use crate::dataplane::xfrm::objects::{Sa, SaId};
use crate::dataplane::xfrm::socket::{SocketError, XfrmSocket};
use crate::dataplane::xfrm::{desired as xdesired, messages};
use crate::plan::{KeyDeriver, Psk, Transform};

/// `Some(false)`: the kernel refused an ESP SA for lack of ESP; `Some(true)`: it took one;
/// `None`: could not tell (no `CAP_NET_ADMIN`, no XFRM netlink, another error).
pub fn kernel_has_esp() -> Option<bool> {
    let mut sock = XfrmSocket::open().ok()?;
    let t = Transform::Aes128Sha256;
    let key = KeyDeriver::new(&Psk::from_bytes(&[0; 32])).derive("probe", "probe", 0, t);
    let sa = Sa {
        id: SaId {
            dst: "192.0.2.2".parse().expect("literal"),
            spi: 0x0000_0102,
        },
        src: "192.0.2.1".parse().expect("literal"),
        reqid: 0,
        inner_v6: false,
        crypto: xdesired::crypto(t, &key),
        encap: None,
        output_mark: None,
        replay_window: 0,
        esn: false,
        transport: false,
    };
    let r = sock
        .batch(vec![
            (messages::sa_add(&sa, 0), NLM_F_CREATE | NLM_F_EXCL),
            (messages::sa_del(&sa.id), 0),
        ])
        .map_err(|e: SocketError| tracing::debug!(error = %e, "ESP probe failed"))
        .ok()?;
    match r.into_iter().next() {
        Some(Ok(())) => Some(true),
        Some(Err(e))
            if e.errno == libc::EPROTONOSUPPORT
                || (e.errno == libc::ENOENT
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("type not found"))) =>
        {
            Some(false)
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "ESP probe inconclusive");
            None
        }
        None => None,
    }
}
