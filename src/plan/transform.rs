//! ESP transforms and the MTU left for containers under each encapsulation.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::model::Backend;

/// An ESP transform (names as strongSwan's proposal keywords).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub enum Transform {
    /// AES-GCM, 128-bit key, 128-bit ICV (`rfc4106(gcm(aes))`).
    #[serde(rename = "aes128gcm16")]
    Aes128Gcm16,
    /// AES-GCM, 256-bit key, 128-bit ICV (`rfc4106(gcm(aes))`). The default.
    #[default]
    #[serde(rename = "aes256gcm16")]
    Aes256Gcm16,
    /// AES-128-CBC with HMAC-SHA-256 truncated to 128 bits.
    #[serde(rename = "aes128-sha256")]
    Aes128Sha256,
    /// AES-256-CBC with HMAC-SHA-256 truncated to 128 bits.
    #[serde(rename = "aes256-sha256")]
    Aes256Sha256,
}

pub const ALL_TRANSFORMS: [Transform; 4] = [
    Transform::Aes128Gcm16,
    Transform::Aes256Gcm16,
    Transform::Aes128Sha256,
    Transform::Aes256Sha256,
];

impl Transform {
    pub fn name(self) -> &'static str {
        match self {
            Transform::Aes128Gcm16 => "aes128gcm16",
            Transform::Aes256Gcm16 => "aes256gcm16",
            Transform::Aes128Sha256 => "aes128-sha256",
            Transform::Aes256Sha256 => "aes256-sha256",
        }
    }

    pub fn is_aead(self) -> bool {
        matches!(self, Transform::Aes128Gcm16 | Transform::Aes256Gcm16)
    }

    /// Bytes of the encryption key as the kernel takes it (for GCM: key + 4-byte salt).
    pub fn enc_key_len(self) -> usize {
        match self {
            Transform::Aes128Gcm16 => 16 + 4,
            Transform::Aes256Gcm16 => 32 + 4,
            Transform::Aes128Sha256 => 16,
            Transform::Aes256Sha256 => 32,
        }
    }

    /// Bytes of the integrity key (0 for AEAD).
    pub fn auth_key_len(self) -> usize {
        if self.is_aead() {
            0
        } else {
            32
        }
    }

    /// Total key material per SA.
    pub fn key_len(self) -> usize {
        self.enc_key_len() + self.auth_key_len()
    }

    /// ICV length in bytes (16 for all supported transforms).
    pub fn icv_len(self) -> usize {
        16
    }

    /// IV carried in each packet.
    pub fn iv_len(self) -> usize {
        if self.is_aead() {
            8
        } else {
            16
        }
    }

    /// The ESP payload (data + 2-byte trailer) is padded to this many bytes.
    pub fn block_len(self) -> usize {
        if self.is_aead() {
            4
        } else {
            16
        }
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Transform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL_TRANSFORMS
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ALL_TRANSFORMS.iter().map(|t| t.name()).collect();
                format!(
                    "unknown transform {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// Worst-case bytes ESP transport mode adds to a packet (header, IV, ICV, trailer and the
/// largest padding): what an encrypted VXLAN device must leave room for.
pub fn esp_transport_overhead(t: Transform) -> u16 {
    (8 + t.iv_len() + t.icv_len() + 2 + (t.block_len() - 1)) as u16
}

/// How packets cross the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encapsulation {
    pub backend: Backend,
    pub transform: Transform,
    /// ESP in UDP (NAT-T, port 4500): 8 more bytes.
    pub udp_encap: bool,
    /// The underlay is IPv6 (40-byte outer header instead of 20).
    pub ipv6_underlay: bool,
}

/// Largest inner packet that fits in one underlay packet of `underlay_mtu` bytes.
///
/// ESP tunnel mode: outer IP + [UDP 8] + ESP header 8 + IV + payload padded with its 2-byte
/// trailer to the block size + ICV. VXLAN: outer IP + UDP 8 + VXLAN 8 + inner Ethernet 14
/// (50 bytes over IPv4, 70 over IPv6).
pub fn overlay_mtu(underlay_mtu: u16, e: Encapsulation) -> u16 {
    let ip = if e.ipv6_underlay { 40 } else { 20 };
    let mtu = underlay_mtu as usize;
    match e.backend {
        Backend::Vxlan => (mtu - ip - 8 - 8 - 14) as u16,
        Backend::Ipsec => {
            let t = e.transform;
            let udp = if e.udp_encap { 8 } else { 0 };
            let fixed = ip + udp + 8 + t.iv_len() + t.icv_len();
            let room = mtu - fixed;
            let padded = room - room % t.block_len();
            (padded - 2) as u16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipsec(t: Transform, udp: bool, v6: bool) -> Encapsulation {
        Encapsulation {
            backend: Backend::Ipsec,
            transform: t,
            udp_encap: udp,
            ipv6_underlay: v6,
        }
    }

    /// Size on the wire of an inner packet of `inner` bytes (the inverse computation).
    fn wire(inner: usize, e: Encapsulation) -> usize {
        let t = e.transform;
        let ip = if e.ipv6_underlay { 40 } else { 20 };
        let udp = if e.udp_encap { 8 } else { 0 };
        let payload = inner + 2;
        let padded = payload.div_ceil(t.block_len()) * t.block_len();
        ip + udp + 8 + t.iv_len() + padded + t.icv_len()
    }

    #[test]
    fn known_values() {
        assert_eq!(
            overlay_mtu(1500, ipsec(Transform::Aes256Gcm16, false, false)),
            1446
        );
        assert_eq!(
            overlay_mtu(1500, ipsec(Transform::Aes256Gcm16, true, false)),
            1438
        );
        assert_eq!(
            overlay_mtu(1500, ipsec(Transform::Aes128Sha256, false, false)),
            1438
        );
        assert_eq!(
            overlay_mtu(1500, ipsec(Transform::Aes256Gcm16, false, true)),
            1426
        );
        let vx = |v6| Encapsulation {
            backend: Backend::Vxlan,
            transform: Transform::default(),
            udp_encap: false,
            ipv6_underlay: v6,
        };
        assert_eq!(overlay_mtu(1500, vx(false)), 1450);
        assert_eq!(overlay_mtu(1500, vx(true)), 1430);
        assert_eq!(overlay_mtu(9000, vx(false)), 8950);
    }

    #[test]
    fn mtu_is_the_largest_that_fits() {
        for t in ALL_TRANSFORMS {
            for udp in [false, true] {
                for v6 in [false, true] {
                    for mtu in [1280u16, 1400, 1500, 1501, 1502, 1503, 8999, 9000] {
                        let e = ipsec(t, udp, v6);
                        let inner = overlay_mtu(mtu, e) as usize;
                        assert!(wire(inner, e) <= mtu as usize, "{t} {udp} {v6} {mtu}");
                        assert!(wire(inner + 1, e) > mtu as usize, "{t} {udp} {v6} {mtu}");
                    }
                }
            }
        }
    }

    /// Issue 18: the MTU left for containers depends on the underlay's family (outer header
    /// 20 or 40 bytes), not on the overlay's (the inner header is part of the inner packet).
    #[test]
    fn mtu_follows_the_underlay_family_not_the_overlays() {
        use crate::model::{Cluster, RawCluster, RawHost, RawNetwork};
        use crate::plan::{plan, PlanOptions};
        let mk = |v6_under: bool, v6_over: bool, backend: &str| {
            let agent = |n: u8| {
                if v6_under {
                    format!("fd77::{n}")
                } else {
                    format!("192.168.77.{n}")
                }
            };
            let subnet = |n: u8| {
                if v6_over {
                    format!("fd42:0:0:{n}::/64")
                } else {
                    format!("10.42.{n}.0/24")
                }
            };
            let c = Cluster::validate(&RawCluster {
                network: RawNetwork {
                    cidr: if v6_over { "fd42::/48" } else { "10.42.0.0/16" }.into(),
                    backend: Some(backend.into()),
                    mtu: Some(1500),
                },
                hosts: (1..=2)
                    .map(|n| RawHost {
                        id: format!("h{n}"),
                        agent_ip: agent(n),
                        subnets: vec![subnet(n)],
                        ..Default::default()
                    })
                    .collect(),
            })
            .unwrap();
            plan(&c, "h1", &PlanOptions::default(), None).unwrap().mtu
        };
        for v6_over in [false, true] {
            // ESP tunnel mode, aes256gcm16: 20 + 8 + 8 + 16 (+ padding) over IPv4, 40 + ... over IPv6.
            assert_eq!(
                mk(false, v6_over, "ipsec"),
                1446,
                "v4 underlay, v6 overlay {v6_over}"
            );
            assert_eq!(
                mk(true, v6_over, "ipsec"),
                1426,
                "v6 underlay, v6 overlay {v6_over}"
            );
            // VXLAN: 50 bytes over IPv4, 70 over IPv6.
            assert_eq!(
                mk(false, v6_over, "vxlan"),
                1450,
                "v4 underlay, v6 overlay {v6_over}"
            );
            assert_eq!(
                mk(true, v6_over, "vxlan"),
                1430,
                "v6 underlay, v6 overlay {v6_over}"
            );
        }
    }

    #[test]
    fn transport_overhead() {
        assert_eq!(esp_transport_overhead(Transform::Aes256Gcm16), 37);
        assert_eq!(esp_transport_overhead(Transform::Aes128Sha256), 57);
    }

    #[test]
    fn parse_names() {
        for t in ALL_TRANSFORMS {
            assert_eq!(t.name().parse::<Transform>().unwrap(), t);
        }
        let e = "aes".parse::<Transform>().unwrap_err();
        assert!(e.contains("aes256gcm16"), "{e}");
    }
}
