//! CNI plugins for the mesh: `ipsec-mesh-bridge` and `ipsec-mesh-ipam` (CNI spec 1.0.0 with
//! GC and STATUS of 1.1.0; configurations of 0.3.0 to 1.1.0 are accepted and answered in
//! their own version). They replace Rancher 1.2's `rancher-bridge` and `rancher-cni-ipam`.
//!
//! # Install
//!
//! `cargo build --release` builds both next to `ipsec-mesh`; copy them into the runtime's
//! CNI binary directory (`/opt/cni/bin`, or `/usr/lib/cni` on Debian), then let
//! `ipsec-mesh cni-config` write the network configuration for this host:
//!
//! ```text
//! ipsec-mesh cni-config --metadata /etc/ipsec-mesh/mesh.json > /etc/cni/net.d/10-ipsec-mesh.conflist
//! ipsec-mesh cni-config --metadata http://169.254.169.250/2015-12-19 --format conf --bridge docker0
//! ```
//!
//! It prints (the MTU is the planner's for this host: underlay minus tunnel overhead):
//!
//! ```json
//! { "cniVersion": "1.0.0", "name": "ipsec-mesh",
//!   "args": { "podman_labels": { "io.ipsec-mesh.subnets": "10.42.1.0/24",
//!                                "io.ipsec-mesh.gateways": "10.42.1.1" } },
//!   "plugins": [ { "type": "ipsec-mesh-bridge", "bridge": "cni0", "isGateway": true,
//!                  "isDefaultGateway": true, "hairpinMode": true, "ipMasq": true, "mtu": 1446,
//!                  "capabilities": { "ips": true, "mac": true },
//!                  "ipam": { "type": "ipsec-mesh-ipam", "metadata": "/etc/ipsec-mesh/mesh.json",
//!                            "ranges": [[ { "subnet": "10.42.1.0/24", "gateway": "10.42.1.1" } ]] } },
//!                { "type": "portmap", "capabilities": { "portMappings": true } } ] }
//! ```
//!
//! `--no-portmap` leaves the reference `portmap` plugin out (published ports then do
//! nothing), `--no-masquerade` writes `"ipMasq": false`. `ranges` (host-local's layout) and the
//! `podman_labels` are a snapshot of this host's subnets for people and tools (`podman network
//! inspect` shows labels; it reads subnets only from its own `bridge` + `host-local`): the IPAM
//! allocates from the metadata, which stays the source of truth, and logs a warning when
//! `ranges` no longer matches it (run `cni-config` again).
//!
//! # `ipsec-mesh-bridge`
//!
//! The reference `bridge` plugin's keys, with the mesh's MTU:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `bridge` | `cni0` | bridge device; created (with the MTU, up) or adopted |
//! | `isGateway` | false | put each IP's gateway (`/prefix`) on the bridge, enable forwarding |
//! | `isDefaultGateway` | false | also a default route via the gateway in the container (implies `isGateway`) |
//! | `hairpinMode` | false | hairpin on the container's bridge port |
//! | `ipMasq` | false (`cni-config`: true) | masquerade traffic to destinations outside the mesh (module [`masq`]: one nftables table per network, one rule per family; mesh traffic keeps its source) |
//! | `mtu` | planner | container MTU; with `linkMTUOverhead`, the underlay MTU it is taken from |
//! | `linkMTUOverhead` | - | Rancher's setting, applied: MTU = underlay MTU - overhead (underlay: `mtu`, else the metadata's, else the default route's device) |
//! | `mac` | kernel | container MAC (also `runtimeConfig.mac` or `CNI_ARGS` `MAC=`) |
//! | `metadata`, `host` | the `ipam` section's | mesh metadata for the planner's MTU |
//! | `transform`, `udpEncap` | `aes256gcm16`, false | what the MTU is planned for |
//! | `ipam` | required | the IPAM plugin (`type`), run from `CNI_PATH` with the same stdin |
//!
//! Without `mtu`, `linkMTUOverhead` or metadata the plugin refuses to guess (code 7): a
//! silently wrong MTU is what Rancher shipped. The host end of the veth is named
//! `veth` + 11 hex digits of SHA-256(container id, ifname), so a repeated ADD returns the same
//! result and DEL finds it even after the container's namespace is gone. DEL deletes only
//! that veth pair (never another interface of the container) and tolerates a missing
//! namespace or interface.
//!
//! # `ipsec-mesh-ipam`
//!
//! | key (`ipam.`) | default | meaning |
//! |---|---|---|
//! | `metadata` | required | SRC: metadata file or rancher-metadata URL |
//! | `host` | discovered | this host's id (else rancher's `/self/host`, else the host whose `agent_ip` is local) |
//! | `dataDir` | `/var/lib/cni/networks/ipsec-mesh` | allocation store (`allocations.json`, `lock`) |
//! | `routes` | none | routes put in the result as given |
//! | `keepReleasedSeconds` | 300 | a released address stays reserved this long for the same container and interface (0: off) |
//! | `ranges` | - | host-local's layout; informational (see above) |
//!
//! Static addresses, as host-local takes them: `CNI_ARGS` `IP=a[,b]` (`podman run --ip`),
//! `args.cni.ips`, and `runtimeConfig.ips` (the `ips` capability). Each must be an allocatable
//! address of this host's subnets (not the network, gateway or broadcast address, not the
//! VTEP), else ADD fails with code 109; one held by another container fails with 110.
//!
//! DEL keeps the address for its container id and interface for `keepReleasedSeconds`: a
//! DEL then ADD of the same container (`podman restart`, `stop` + `start`, `network reload`)
//! gets the same address back, and new containers are not given it meanwhile unless every
//! other address is taken. A new container id always gets a fresh address.
//!
//! One address per (network, container, ifname) from the first of this host's subnets with
//! room; network, gateway (first address) and broadcast are never handed out; the same
//! container and interface get the same address back; allocations are written under an
//! exclusive `flock`, so concurrent ADDs never collide. DEL releases, GC releases every
//! allocation of the network not in `cni.dev/valid-attachments`, STATUS fails (code 50) when
//! the metadata is unreachable or the subnets are full. It works under the reference `bridge`
//! plugin too, and `ipsec-mesh-bridge` works with the reference `host-local`.
//!
//! # Errors
//!
//! On failure a plugin prints `{"cniVersion", "code", "msg", "details"}` and exits 1. Codes:
//! the spec's 1 (version), 4 (environment), 6 (stdin not JSON), 7 (configuration), 11
//! (metadata service unreachable or store locked: retry), 50 (STATUS); ours: 100 kernel
//! refused a netlink request (or nft the masquerade table), 101 metadata invalid, 102 host
//! unknown or without subnet, 103 addresses exhausted, 104 allocation store unreadable, 105
//! CHECK mismatch, 106 IPAM plugin failed to run, 107 namespace cannot be entered, 108
//! interface name taken by someone else, 109 requested address not this host's to give, 110
//! requested address in use, 199 internal error. Logs go to stderr (`IPSEC_MESH_LOG`, default `warn`).

pub mod bridge;
pub mod config;
pub mod delegate;
pub mod generate;
pub mod ipam;
pub mod link;
pub mod masq;
pub mod mesh;
pub mod netns;
pub mod plugin;
pub mod spec;
pub mod store;
