//! How drivers stack: one constructor from a typed [`DataplaneConfig`] to the [`Driver`] the
//! CLI and the sidecar run. The CLI only turns flags into the config; which layers exist,
//! in which order they are reconciled, and which layer's per-peer state counts are decided
//! here.
//!
//! | `driver` | layers, reconciled in this order (cleaned up in reverse) | per-peer state from |
//! |---|---|---|
//! | `xfrm` | [`XfrmMesh`]: XFRM policies + SAs, firewall marks and guard, policy routes (route mode, `--xfrm-mode route`: first one XFRM interface per peer, [`super::xfrmi`]) | it |
//! | `vxlan` | [`VxlanMesh`] | its FDB and neighbours |
//! | `vxlan` + ESP | [`VxlanEsp`] policies (first, so VXLAN never leaves in clear and plaintext VXLAN is refused), [`VxlanMesh`], then [`VxlanEsp`] SAs (last, and cleaned up first: a host never decrypts VXLAN without a VXLAN device, whose absence would send the peer an ICMP error quoting the decrypted packet in clear; see [`EspPart`]) | the ESP SA layer's SAs |
//! | `charon` | [`CharonMesh`] (charon installs policies and SAs) | charon's SAs |
//! | `charon`, `policies: false` | [`XfrmMesh::policies_only`] (policies, marks, guard, routes: fail closed while charon negotiates), then [`CharonMesh`] (SAs only) | charon's SAs |

use super::charon::desired::CharonConfig;
use super::charon::CharonMesh;
use super::driver::{Driver, EspPart, Forwarding, Stack, VxlanEsp, XfrmMesh};
use super::vxlan::{VxlanConfig, VxlanMesh};
use crate::plan::{Marks, Plan, Psk};

/// Which dataplane driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Kernel XFRM policies and SAs, keys derived from the PSK (IKE-less).
    Xfrm,
    /// A VXLAN device with static entries per peer; ESP transport mode if `vxlan.esp`.
    Vxlan,
    /// strongSwan's charon over VICI.
    Charon,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::Xfrm => "xfrm",
            DriverKind::Vxlan => "vxlan",
            DriverKind::Charon => "charon",
        }
    }
}

/// Everything that decides the dataplane besides the plan.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    pub driver: DriverKind,
    /// The mark bits ours (identify the block policy and the firewall rules as ours).
    pub marks: Marks,
    /// Firewall backend, devices to mark traffic from, route table and rule priority.
    pub forwarding: Forwarding,
    pub vxlan: VxlanConfig,
    pub charon: CharonConfig,
}

/// Why the dataplane could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the PSK is needed: {0}")]
    NeedsPsk(&'static str),
    #[error("charon driver: {0}")]
    Charon(#[source] std::io::Error),
}

impl DataplaneConfig {
    /// Why this dataplane cannot work without the PSK, if it cannot.
    pub fn psk_needed(&self) -> Option<&'static str> {
        match self.driver {
            DriverKind::Xfrm => {
                Some("--driver xfrm needs --psk-file (the keys are derived from it)")
            }
            DriverKind::Vxlan if self.vxlan.esp => {
                Some("--vxlan-encrypt needs --psk-file (the ESP keys are derived from it)")
            }
            DriverKind::Charon => {
                Some("--driver charon needs --psk-file (charon authenticates peers with it)")
            }
            DriverKind::Vxlan => None,
        }
    }

    /// Things a one-shot `apply` must tell the operator about this dataplane for `plan`
    /// (the sidecar keeps what they need alive).
    pub fn one_shot_warnings(&self, plan: &Plan) -> Vec<&'static str> {
        let mut w = Vec::new();
        if plan.udp_encap && self.driver == DriverKind::Xfrm {
            w.push(
                "--udp-encap: the kernel decapsulates ESP-in-UDP only while a process holds \
                 the port-4500 encapsulation socket; `apply` exits, so run the sidecar \
                 (`ipsec-mesh run`) for UDP encapsulation",
            );
        }
        w
    }

    /// The forwarding settings with `--firewall auto` and `--xfrm-mode auto` made concrete
    /// (and said in the log; the mode only for the xfrm driver, which is the one that has it).
    fn forwarding(&self) -> Forwarding {
        let mut f = self.forwarding.clone();
        let (kind, why) = f.firewall.resolve();
        tracing::info!(firewall = %kind, why, "firewall backend");
        f.firewall = kind;
        if self.driver == DriverKind::Xfrm {
            let (mode, why) = f.xfrm_mode.resolve();
            tracing::info!(xfrm_mode = %mode, why, "xfrm mode");
            f.xfrm_mode = mode;
            // `one` asked for and impossible: said by the driver's first reconcile, which
            // then writes nothing.
            if mode == super::xfrmi::XfrmMode::Route
                && f.route_devices == super::xfrmi::RouteDevices::Auto
            {
                let (devices, why) = f
                    .route_devices
                    .resolve()
                    .unwrap_or((super::xfrmi::RouteDevices::PerPeer, String::new()));
                tracing::info!(route_devices = %devices, why, "xfrm route devices");
                f.route_devices = devices;
            }
        } else {
            f.xfrm_mode = super::xfrmi::XfrmMode::Policy;
        }
        f
    }

    /// The driver, stacked as the module docs say. `psk`: for charon (cleanup needs none).
    pub fn build(&self, psk: Option<&Psk>) -> Result<Box<dyn Driver>, BuildError> {
        Ok(match self.driver {
            DriverKind::Xfrm => Box::new(XfrmMesh::new(self.forwarding(), self.marks)),
            DriverKind::Vxlan => {
                let vxlan = Box::new(VxlanMesh {
                    config: self.vxlan.clone(),
                });
                if self.vxlan.esp {
                    let esp = |part| {
                        Box::new(VxlanEsp {
                            port: self.vxlan.port,
                            marks: self.marks,
                            part,
                        })
                    };
                    Box::new(Stack {
                        drivers: vec![esp(EspPart::Policies), vxlan, esp(EspPart::Sas)],
                        counters_from: 2,
                        name_from: 1,
                    })
                } else {
                    vxlan
                }
            }
            DriverKind::Charon => {
                let charon = Box::new(
                    CharonMesh::new(self.charon.clone(), psk).map_err(BuildError::Charon)?,
                );
                if self.charon.policies {
                    charon
                } else {
                    let policies = Box::new(XfrmMesh::policies_only(self.forwarding(), self.marks));
                    Box::new(Stack {
                        drivers: vec![policies, charon],
                        counters_from: 1,
                        name_from: 1,
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(driver: DriverKind) -> DataplaneConfig {
        DataplaneConfig {
            driver,
            marks: Marks::default(),
            forwarding: Forwarding::default(),
            vxlan: VxlanConfig::default(),
            charon: CharonConfig::default(),
        }
    }

    #[test]
    fn layers_stack_as_documented() {
        let names = |c: &DataplaneConfig| c.build(None).unwrap().name();
        let sas = |c: &DataplaneConfig| c.build(None).unwrap().has_sas();
        assert_eq!(names(&config(DriverKind::Xfrm)), "xfrm");
        assert_eq!(names(&config(DriverKind::Vxlan)), "vxlan");
        let mut esp = config(DriverKind::Vxlan);
        esp.vxlan.esp = true;
        assert_eq!(
            names(&esp),
            "vxlan",
            "the stack is named by its vxlan layer"
        );
        // Policies before the device, SAs after it (cleanup: the reverse): never a decrypted
        // VXLAN packet without the device (EspPart::Sas says why).
        assert_eq!(
            esp.build(None).unwrap().layers(),
            ["vxlan-esp-policies", "vxlan", "vxlan-esp"]
        );
        assert_eq!(names(&config(DriverKind::Charon)), "charon");
        let mut split = config(DriverKind::Charon);
        split.charon.policies = false;
        assert_eq!(names(&split), "charon");

        assert!(sas(&config(DriverKind::Xfrm)));
        assert!(!sas(&config(DriverKind::Vxlan)));
        assert!(sas(&esp));
        assert!(sas(&config(DriverKind::Charon)));
        assert!(sas(&split));
        assert!(config(DriverKind::Vxlan).psk_needed().is_none());
        assert!(esp.psk_needed().is_some());
    }
}
