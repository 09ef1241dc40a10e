//! The XFRM objects ipsec-mesh manages, as comparable values: what the desired state is
//! made of, what a dump is parsed into, and what the diff compares.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::plan::ids::is_owned_reqid;
use crate::plan::Marks;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    In,
    Out,
    Fwd,
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::In => "in",
            Dir::Out => "out",
            Dir::Fwd => "fwd",
        })
    }
}

/// A value/mask pair (`xfrm_mark`); `Mark::NONE` matches everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl Mark {
    pub const NONE: Mark = Mark { value: 0, mask: 0 };
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// Transport protocol and destination port of a selector; [`L4::ANY`] selects all traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct L4 {
    pub proto: u8,
    pub dport: u16,
}

impl L4 {
    pub const ANY: L4 = L4 { proto: 0, dport: 0 };
}

/// What identifies a policy in the kernel: direction, selector and mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    pub dir: Dir,
    pub src: IpNet,
    pub dst: IpNet,
    pub l4: L4,
    pub mark: Mark,
    /// `XFRMA_IF_ID`: 0 for the policy-mode objects; a peer's XFRM interface id in route mode
    /// ([`crate::dataplane::xfrmi`]). Part of the kernel's identity of a policy.
    pub if_id: u32,
    /// The selector's interface index (`ip xfrm policy ... dev X`; 0: any). On the inbound
    /// policy check the kernel compares it with the device the packet arrived on.
    pub dev: u32,
}

impl PolicyId {
    /// ` dev #N` and ` if_id N` when set (empty for the policy-mode objects).
    pub fn scope_suffix(&self) -> String {
        let mut s = String::new();
        if self.dev != 0 {
            s.push_str(&format!(" dev #{}", self.dev));
        }
        if self.if_id != 0 {
            s.push_str(&format!(" if_id {:#x}", self.if_id));
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Block,
}

/// An ESP template: tunnel mode (the mesh) or transport mode (encrypted VXLAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tmpl {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub reqid: u32,
    pub transport: bool,
}

/// Who a desired or found object belongs to, for per-peer error reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// Shared by the whole mesh (the fail-closed block policy).
    Mesh,
    /// One peer, by host id (shared: every object of a peer carries it).
    Peer(std::sync::Arc<str>),
    /// Ours (reqid in range) but no longer wanted: a departed peer.
    Stale(u32),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Mesh => f.write_str("mesh"),
            Owner::Peer(h) => f.write_str(h),
            Owner::Stale(r) => write!(f, "departed peer (reqid {r:#x})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    pub id: PolicyId,
    pub priority: u32,
    pub action: Action,
    pub tmpl: Option<Tmpl>,
}

impl Policy {
    /// The settings that are compared after the identity.
    pub fn same_settings(&self, other: &Policy) -> bool {
        self.priority == other.priority && self.action == other.action && self.tmpl == other.tmpl
    }

    /// Whether a policy found in the kernel is ipsec-mesh's: a template with a reqid in our
    /// range, the fail-closed block policy (our exact mark, no template, block), or a
    /// route-mode inbound block policy (`in`/`fwd`, block, mark 0 under our mask: see
    /// [`super::desired::underlay_blocks`]).
    pub fn is_owned(&self, marks: &Marks) -> bool {
        match self.tmpl {
            Some(t) => is_owned_reqid(t.reqid),
            None if self.action != Action::Block => false,
            None if self.id.dir == Dir::Out => {
                self.id.mark
                    == (Mark {
                        value: marks.encrypt,
                        mask: marks.mask,
                    })
            }
            None => {
                self.id.mark
                    == (Mark {
                        value: 0,
                        mask: marks.mask,
                    })
            }
        }
    }
}

impl Policy {
    /// What identifies the policy, for a [`crate::dataplane::report::Change`]:
    /// `policy out A -> B [mark M]`.
    pub fn ident(&self) -> String {
        let mut s = format!("policy {} {} -> {}", self.id.dir, self.id.src, self.id.dst);
        if self.id.mark != Mark::NONE {
            s.push_str(&format!(" mark {}", self.id.mark));
        }
        s.push_str(&self.id.scope_suffix());
        s
    }

    /// The settings compared after the identity ([`Policy::same_settings`]), in words.
    pub fn settings(&self) -> String {
        let what = match (self.action, self.tmpl) {
            (Action::Block, _) => "block".to_string(),
            (Action::Allow, Some(t)) => format!("tmpl {} -> {} reqid {:#x}", t.src, t.dst, t.reqid),
            (Action::Allow, None) => "allow".to_string(),
        };
        format!("{what} priority {:#x}", self.priority)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "policy {} {} -> {}",
            self.id.dir, self.id.src, self.id.dst
        )?;
        if self.id.mark != Mark::NONE {
            write!(f, " mark {}", self.id.mark)?;
        }
        f.write_str(&self.id.scope_suffix())?;
        match (self.action, self.tmpl) {
            (Action::Block, _) => write!(f, " block"),
            (Action::Allow, Some(t)) => {
                write!(f, " tmpl {} -> {} reqid {:#x}", t.src, t.dst, t.reqid)
            }
            (Action::Allow, None) => write!(f, " allow"),
        }
    }
}

/// What identifies an ESP SA: destination and SPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SaId {
    pub dst: IpAddr,
    pub spi: u32,
}

/// Algorithms and keys of an SA.
#[derive(Clone, PartialEq, Eq)]
pub enum Crypto {
    /// `rfc4106(gcm(aes))`: key includes the 4-byte salt; ICV in bits.
    Aead {
        name: String,
        key: Zeroizing<Vec<u8>>,
        icv_bits: u32,
    },
    /// Encryption plus truncated HMAC.
    EncAuth {
        enc_name: String,
        enc_key: Zeroizing<Vec<u8>>,
        auth_name: String,
        auth_key: Zeroizing<Vec<u8>>,
        trunc_bits: u32,
    },
}

impl fmt::Debug for Crypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Crypto::Aead { name, icv_bits, .. } => {
                write!(f, "Aead({name}, icv {icv_bits}, <key redacted>)")
            }
            Crypto::EncAuth {
                enc_name,
                auth_name,
                trunc_bits,
                ..
            } => write!(
                f,
                "EncAuth({enc_name}, {auth_name}/{trunc_bits}, <keys redacted>)"
            ),
        }
    }
}

impl Crypto {
    pub fn describe(&self) -> String {
        match self {
            Crypto::Aead { name, icv_bits, .. } => format!("{name} icv {icv_bits}"),
            Crypto::EncAuth {
                enc_name,
                auth_name,
                trunc_bits,
                ..
            } => format!("{enc_name} + {auth_name}/{trunc_bits}"),
        }
    }
}

/// The inner family of a tunnel-mode SA: its selector's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Inner {
    V4,
    V6,
    /// Both families (a dual-stack overlay over one underlay family): the selector's family
    /// is `AF_UNSPEC` and the state carries `XFRM_STATE_AF_UNSPEC` (`ip xfrm state ... flag
    /// af-unspec`). Without the flag the kernel sets an unspecified selector family to the
    /// SA's (outer) family; with it, the state keeps an inner mode for each family
    /// (`inner_mode` and `inner_mode_iaf`) and picks one per packet, and outbound state
    /// lookups skip the selector check for it (`xfrm_state_look_at`).
    Any,
}

impl Inner {
    pub fn of(v6: bool) -> Inner {
        if v6 {
            Inner::V6
        } else {
            Inner::V4
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sa {
    pub id: SaId,
    pub src: IpAddr,
    pub reqid: u32,
    /// Family of the inner traffic (the SA selector's, which is "any"): one family, or both
    /// for a dual-stack overlay.
    pub inner: Inner,
    pub crypto: Crypto,
    /// ESP-in-UDP source and destination port.
    pub encap: Option<(u16, u16)>,
    /// Mark put on decrypted packets (`XFRMA_SET_MARK`).
    pub output_mark: Option<Mark>,
    /// Anti-replay window in packets (0 = off). With `esn` it lives in the ESN replay state.
    pub replay_window: u32,
    /// Extended (64-bit) sequence numbers (`XFRM_STATE_ESN`): the counter never wraps, so
    /// an AES-GCM IV (the sequence number) never repeats under one key. See [`super::seq`].
    pub esn: bool,
    /// Transport mode (encrypted VXLAN) instead of tunnel mode.
    pub transport: bool,
    /// `XFRMA_IF_ID`: 0, or the peer's XFRM interface id in route mode.
    pub if_id: u32,
}

impl fmt::Display for Sa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sa {} -> {} spi {:#010x} reqid {:#x} {}",
            self.src,
            self.id.dst,
            self.id.spi,
            self.reqid,
            self.crypto.describe()
        )?;
        if let Some((s, d)) = self.encap {
            write!(f, " encap udp {s}/{d}")?;
        }
        if self.transport {
            write!(f, " transport")?;
        }
        if self.if_id != 0 {
            write!(f, " if_id {:#x}", self.if_id)?;
        }
        Ok(())
    }
}
