//! Can this kernel hold ESP SAs? Asked when charon (with `kernel-netlink`) fails to set up
//! a CHILD_SA: when both ends lack ESP, the responder fails first and answers
//! `NO_PROPOSAL_CHOSEN`, so the initiator never sees its own kernel refuse, and only a local
//! probe can tell the operator the real cause.
//!
//! The probe is the xfrm driver's: one throwaway SA (documentation addresses, AES-CBC +
//! HMAC-SHA-256, an SPI and reqid outside ipsec-mesh's range) in a private network namespace
//! of its own, so it never touches the host's SAs (ESP support is kernel-wide). Where no
//! namespace can be made it probes in place and deletes only an SA its own add created.

/// `Some(false)`: the kernel refused an ESP SA for lack of ESP; `Some(true)`: it took one;
/// `None`: could not tell (no `CAP_NET_ADMIN`, no XFRM netlink, another error).
pub fn kernel_has_esp() -> Option<bool> {
    crate::dataplane::xfrm::kernel_has_esp()
}
