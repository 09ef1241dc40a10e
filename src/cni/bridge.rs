//! `ipsec-mesh-bridge`: the container's veth on a host bridge, addresses from a delegated
//! IPAM plugin, the MTU from the mesh.
//!
//! ADD: run the IPAM plugin (`ipam.type` from `CNI_PATH`), create or adopt the bridge, create
//! the veth pair with the host end named after the container (`veth` + 11 hex digits of
//! SHA-256(container id, ifname): stable, so a repeated ADD finds it and DEL can remove it
//! even when the namespace is gone) and the container end created directly inside the
//! namespace, attach it (hairpin as configured), put the addresses and routes in the
//! container, the gateway on the bridge. A repeated ADD of the same container reuses all of
//! it and returns the same result. If a fresh ADD fails half-way, the veth is removed and the
//! address released.
//!
//! DEL deletes the veth pair by its host end's name (so it never touches another interface in
//! the container, and needs no namespace: a namespace that is gone took the pair with it)
//! and releases the address; missing pieces are fine.
//!
//! MTU ([`choose_mtu`]): `linkMTUOverhead` set -> underlay MTU - overhead, where the underlay
//! MTU is `mtu` if given, else the metadata's network MTU, else that of the default route's
//! device; otherwise `mtu` if given, else the planner's MTU for this host (underlay minus the
//! tunnel overhead of the backend and transform).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ipnet::IpNet;
use serde_json::Map;

use super::config::{BridgeConf, Command, MeshRef, MTU_MIN};
use super::delegate;
use super::link::{self, Link};
use super::masq;
use super::mesh;
use super::netns;
use super::plugin::{Plugin, Request};
use super::spec::{code, CniError, CniResult, Interface, IpConfig, Route};
use super::store;
use crate::dataplane::sysctl;

/// The bridge plugin.
#[derive(Debug, Default)]
pub struct Bridge;

/// Host-side veth name for a container interface: `veth` + 11 hex digits.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{container_id}\0{ifname}").as_bytes(),
    );
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("veth{}", &hex[..11])
}

/// Where the MTU came from (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtuBasis {
    Explicit,
    Overhead { underlay: u32, overhead: u32 },
    Planner,
}

/// The container MTU (see the module docs). `planned` gives (mesh MTU, underlay MTU) for
/// the metadata; `default_route_mtu` the MTU of the default route's device.
pub fn choose_mtu(
    conf: &BridgeConf,
    planned: impl FnOnce(&MeshRef) -> Result<(u16, u16), CniError>,
    default_route_mtu: impl FnOnce() -> Option<u32>,
) -> Result<(u32, MtuBasis), CniError> {
    if let Some(overhead) = conf.link_mtu_overhead {
        let underlay = match (conf.mtu, &conf.mesh) {
            (Some(m), _) => m,
            (None, Some(mesh)) => planned(mesh)?.1 as u32,
            (None, None) => default_route_mtu().ok_or_else(|| {
                CniError::config(
                    "linkMTUOverhead is set but the underlay MTU is unknown: set mtu or metadata (there is no default route to take it from)",
                )
            })?,
        };
        let mtu = underlay
            .checked_sub(overhead)
            .filter(|m| *m >= MTU_MIN)
            .ok_or_else(|| {
                CniError::config(format!(
                "linkMTUOverhead {overhead} leaves no usable MTU out of the underlay's {underlay}"
            ))
            })?;
        return Ok((mtu, MtuBasis::Overhead { underlay, overhead }));
    }
    if let Some(m) = conf.mtu {
        return Ok((m, MtuBasis::Explicit));
    }
    match &conf.mesh {
        Some(mesh) => Ok((planned(mesh)?.0 as u32, MtuBasis::Planner)),
        None => Err(CniError::config(
            "cannot choose an MTU: set mtu, linkMTUOverhead, or metadata (here or in the ipam section) for the mesh MTU",
        )),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    crate::dataplane::rtnl::runtime()
        .map_err(|e| CniError::new(code::IO, format!("cannot start the netlink runtime: {e}")))
}

fn kernel<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> CniError {
    let what = what.to_string();
    move |e| CniError::new(code::NETLINK, format!("{what}: {e}"))
}

fn netns_error(path: &str, e: &std::io::Error) -> CniError {
    CniError::new(
        code::NETNS,
        format!("cannot enter the network namespace {path}: {e}"),
    )
}

/// Everything one ADD works with.
struct Ctx<'a> {
    conf: &'a BridgeConf,
    mtu: u32,
    netns_path: &'a str,
    ns: &'a File,
    ifname: &'a str,
    host_veth: String,
    ipam: CniResult,
}

/// Make sure the bridge exists and is up; create it with `mtu` when missing.
async fn ensure_bridge(h: &rtnetlink::Handle, name: &str, mtu: u32) -> Result<Link, CniError> {
    let err = kernel(format!("bridge {name}"));
    let found = link::get(h, name)
        .await
        .map_err(kernel(format!("bridge {name}")))?;
    let br = match found {
        Some(l) => l,
        None => {
            match link::add(h, link::bridge_message(name, mtu)).await {
                Ok(()) => {}
                // Another ADD created it in the meantime: adopt it.
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                Err(e) => return Err(err(e)),
            }
            link::get(h, name)
                .await
                .map_err(kernel(format!("bridge {name}")))?
                .ok_or_else(|| {
                    CniError::new(
                        code::NETLINK,
                        format!("bridge {name} vanished after creation"),
                    )
                })?
        }
    };
    if !br.is_bridge() {
        return Err(CniError::new(
            code::CONFLICT,
            format!(
                "{name} exists and is not a bridge (it is a {:?} link)",
                br.kind
            ),
        ));
    }
    if !br.up {
        link::change(h, link::up_message(br.index, None))
            .await
            .map_err(kernel(format!("setting bridge {name} up")))?;
    }
    Ok(br)
}

/// Turn on forwarding for the families of `ips` (the bridge is their gateway).
fn enable_forwarding(ips: &[IpConfig]) -> Result<(), CniError> {
    let v4 = ips.iter().any(|i| i.address.addr().is_ipv4());
    let v6 = ips.iter().any(|i| i.address.addr().is_ipv6());
    sysctl::enable_forwarding(v4, v6).map_err(|e| {
        CniError::new(
            code::IO,
            format!("enabling forwarding ({}): {}", e.path, e.source),
        )
    })
}

/// The gateway of an address: the IPAM's, else (for a gateway bridge) the subnet's first.
fn gateway_of(ip: &IpConfig, is_gateway: bool) -> Option<IpAddr> {
    ip.gateway.or_else(|| {
        is_gateway
            .then(|| store::gateway(&ip.address.trunc()))
            .flatten()
    })
}

/// The routes the container gets: the IPAM's, plus a default route per family when the
/// bridge is the default gateway.
fn container_routes(conf: &BridgeConf, ips: &[IpConfig], ipam_routes: &[Route]) -> Vec<Route> {
    let mut routes = ipam_routes.to_vec();
    if conf.is_default_gateway {
        for ip in ips {
            let v4 = ip.address.addr().is_ipv4();
            let dst: IpNet = if v4 {
                "0.0.0.0/0".parse().unwrap_or_default()
            } else {
                "::/0".parse().unwrap_or_default()
            };
            if routes.iter().any(|r| r.dst == dst) {
                continue;
            }
            if let Some(gw) = gateway_of(ip, true) {
                routes.push(Route::new(dst, Some(gw)));
            }
        }
    }
    routes
}

/// The gateway a route without `gw` uses: the first gateway of its family.
fn route_gateway(r: &Route, ips: &[IpConfig], is_gateway: bool) -> Option<IpAddr> {
    r.gw.or_else(|| {
        ips.iter()
            .filter(|i| i.address.addr().is_ipv4() == r.dst.addr().is_ipv4())
            .find_map(|i| gateway_of(i, is_gateway))
    })
}

async fn setup(ctx: &Ctx<'_>, rt: &tokio::runtime::Handle) -> Result<CniResult, CniError> {
    let conf = ctx.conf;
    let host = netns::connect_here(rt).map_err(kernel("netlink socket"))?;
    let cont = netns::connect_in(ctx.ns, rt).map_err(|e| netns_error(ctx.netns_path, &e))?;

    let br = ensure_bridge(&host, &conf.bridge, ctx.mtu).await?;

    // The veth pair: reuse ours, replace a stale host end, refuse someone else's interface.
    let hv = link::get(&host, &ctx.host_veth)
        .await
        .map_err(kernel(&ctx.host_veth))?;
    let cv = link::get(&cont, ctx.ifname)
        .await
        .map_err(kernel(format!("{} in {}", ctx.ifname, ctx.netns_path)))?;
    let reuse =
        matches!((&hv, &cv), (Some(h), Some(c)) if c.is_veth() && c.peer_index == Some(h.index));
    if !reuse {
        if let Some(c) = &cv {
            return Err(CniError::new(
                code::CONFLICT,
                format!(
                    "an interface named {} (index {}) already exists in {} and is not this plugin's veth",
                    ctx.ifname, c.index, ctx.netns_path
                ),
            ));
        }
        if let Some(h) = &hv {
            link::delete(&host, h.index)
                .await
                .map_err(kernel(format!("removing stale {}", ctx.host_veth)))?;
        }
        let msg = link::veth_message(
            &ctx.host_veth,
            ctx.ifname,
            ctx.ns.as_raw_fd(),
            ctx.mtu,
            conf.mac,
        );
        link::add(&host, msg).await.map_err(kernel(format!(
            "creating veth {} <-> {}:{}",
            ctx.host_veth, ctx.netns_path, ctx.ifname
        )))?;
    }
    let missing =
        |what: &str| CniError::new(code::NETLINK, format!("{what} vanished during setup"));
    let hv = link::get(&host, &ctx.host_veth)
        .await
        .map_err(kernel(&ctx.host_veth))?
        .ok_or_else(|| missing(&ctx.host_veth))?;
    let cv = link::get(&cont, ctx.ifname)
        .await
        .map_err(kernel(ctx.ifname))?
        .ok_or_else(|| missing(ctx.ifname))?;

    // Host end: on the bridge, MTU, up, hairpin.
    link::change(&host, link::port_message(hv.index, br.index, ctx.mtu))
        .await
        .map_err(kernel(format!("attaching {} to {}", hv.name, br.name)))?;
    link::set_port(&host, link::hairpin_message(hv.index, conf.hairpin_mode))
        .await
        .map_err(kernel(format!("hairpin mode on {}", hv.name)))?;

    // Container end: MTU, up, addresses, routes.
    link::change(&cont, link::up_message(cv.index, Some(ctx.mtu)))
        .await
        .map_err(kernel(format!("setting {} up", ctx.ifname)))?;
    let mut ips = ctx.ipam.ips.clone();
    for ip in &mut ips {
        ip.interface = Some(2);
        ip.gateway = gateway_of(ip, conf.is_gateway);
        link::add_address(&cont, cv.index, &ip.address)
            .await
            .map_err(kernel(format!("adding {} to {}", ip.address, ctx.ifname)))?;
    }
    let routes = container_routes(conf, &ips, &ctx.ipam.routes);
    for r in &routes {
        let gw = route_gateway(r, &ips, conf.is_gateway);
        let msg = link::route_message(&r.dst, gw, cv.index)
            .map_err(kernel(format!("route {}", r.dst)))?;
        link::add_route(&cont, msg)
            .await
            .map_err(kernel(format!("adding route {} in the container", r.dst)))?;
    }

    // The bridge as the gateway.
    if conf.is_gateway {
        for ip in &ips {
            if let Some(gw) = ip.gateway {
                let a = IpNet::new(gw, ip.address.prefix_len())
                    .map_err(|e| CniError::new(code::DELEGATE, format!("gateway {gw}: {e}")))?;
                link::add_address(&host, br.index, &a)
                    .await
                    .map_err(kernel(format!("adding gateway {a} to {}", br.name)))?;
            }
        }
        enable_forwarding(&ips)?;
    }

    let br = link::get_index(&host, br.index)
        .await
        .map_err(kernel(&conf.bridge))?
        .unwrap_or(br);
    let hv = link::get_index(&host, hv.index)
        .await
        .map_err(kernel(&ctx.host_veth))?
        .unwrap_or(hv);
    let cv = link::get_index(&cont, cv.index)
        .await
        .map_err(kernel(ctx.ifname))?
        .unwrap_or(cv);
    let iface = |l: &Link, sandbox: Option<&str>| Interface {
        name: l.name.clone(),
        mac: super::config::format_mac(&l.mac),
        sandbox: sandbox.map(str::to_string),
        extra: Map::new(),
    };
    Ok(CniResult {
        cni_version: String::new(),
        interfaces: vec![
            iface(&br, None),
            iface(&hv, None),
            iface(&cv, Some(ctx.netns_path)),
        ],
        ips,
        routes,
        dns: ctx.ipam.dns.clone(),
    })
}

/// Remove the container's veth pair by its host end's name: deleting one end of a veth
/// deletes both, so nothing inside the container is touched but our own interface, and a
/// namespace that is already gone (with the pair) needs nothing. Missing pieces are fine.
async fn teardown(rt: &tokio::runtime::Handle, host_veth: &str) -> Result<(), CniError> {
    let host = netns::connect_here(rt).map_err(kernel("netlink socket"))?;
    match link::get(&host, host_veth).await {
        Ok(Some(l)) if l.is_veth() => link::delete(&host, l.index)
            .await
            .map_err(kernel(format!("deleting {host_veth}"))),
        Ok(Some(l)) => {
            tracing::warn!("{host_veth} is a {:?} link, not a veth: left alone", l.kind);
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(kernel(format!("looking up {host_veth}"))(e)),
    }
}

/// Write the network's masquerade table for a container that got `ips` (see [`masq`]).
fn masquerade(conf: &BridgeConf, network: &str, ips: &[IpConfig]) -> Result<(), CniError> {
    let own: Vec<IpNet> = ips.iter().map(|i| i.address.trunc()).collect();
    let (mut sources, mut exempt) = match &conf.mesh {
        Some(m) => {
            let mesh = mesh::load(&m.metadata, m.host.as_deref())?;
            masq::from_cluster(&mesh.snapshot.cluster, &mesh.self_id)
        }
        None => (Vec::new(), Vec::new()),
    };
    sources.extend(own.iter().copied());
    exempt.extend(own);
    let spec = masq::MasqSpec {
        table: masq::table_name(network),
        sources,
        exempt,
    };
    let _lock = masq::lock(&spec.table)?;
    masq::run(&masq::render(&spec))
}

/// After a DEL: remove the masquerade table when the bridge has no port left.
async fn unmasquerade(
    rt: &tokio::runtime::Handle,
    conf: &BridgeConf,
    network: &str,
) -> Result<(), CniError> {
    let table = masq::table_name(network);
    let _lock = masq::lock(&table)?;
    let host = netns::connect_here(rt).map_err(kernel("netlink socket"))?;
    let ports = match link::get(&host, &conf.bridge)
        .await
        .map_err(kernel(&conf.bridge))?
    {
        Some(br) => link::ports_of(&host, br.index)
            .await
            .map_err(kernel(format!("ports of {}", conf.bridge)))?,
        None => 0,
    };
    if ports == 0 {
        masq::run(&masq::render_delete(&table))?;
        tracing::info!(%table, "last container gone: masquerade table removed");
    }
    Ok(())
}

impl Bridge {
    fn mtu(conf: &BridgeConf, rt: &tokio::runtime::Runtime) -> Result<u32, CniError> {
        let (mtu, basis) = choose_mtu(conf, mesh::plan_mtu, || {
            rt.block_on(async {
                let h = netns::connect_here(rt.handle()).ok()?;
                link::default_route_mtu(&h).await.ok().flatten()
            })
        })?;
        tracing::debug!(mtu, ?basis, "container MTU");
        Ok(mtu)
    }
}

impl Plugin for Bridge {
    fn add(&self, r: &Request) -> Result<CniResult, CniError> {
        let conf = BridgeConf::parse(r.conf, r.env)?;
        let rt = runtime()?;
        let mtu = Bridge::mtu(&conf, &rt)?;
        let ns = netns::open(&r.env.netns).map_err(|e| netns_error(&r.env.netns, &e))?;
        if netns::current()
            .and_then(|me| netns::same(&me, &ns))
            .unwrap_or(false)
        {
            return Err(CniError::new(
                code::NETNS,
                format!(
                    "CNI_NETNS {} is the plugin's own (host) namespace",
                    r.env.netns
                ),
            ));
        }
        let host_veth = host_veth_name(&r.env.container_id, &r.env.ifname);
        let existed = rt
            .block_on(async {
                let h = netns::connect_here(rt.handle())?;
                link::get(&h, &host_veth).await
            })
            .map_err(kernel(&host_veth))?
            .is_some();

        let ipam =
            delegate::run(&conf.ipam_type, Command::Add, r.env, r.stdin)?.ok_or_else(|| {
                CniError::new(
                    code::DELEGATE,
                    format!("IPAM plugin {} printed no result", conf.ipam_type),
                )
            })?;
        let ipam = CniResult::from_json(&ipam).map_err(|e| {
            CniError::new(
                code::DELEGATE,
                format!(
                    "IPAM plugin {} returned an invalid result: {e}",
                    conf.ipam_type
                ),
            )
        })?;
        if ipam.ips.is_empty() {
            return Err(CniError::new(
                code::DELEGATE,
                format!("IPAM plugin {} returned no address", conf.ipam_type),
            ));
        }
        let ctx = Ctx {
            conf: &conf,
            mtu,
            netns_path: &r.env.netns,
            ns: &ns,
            ifname: &r.env.ifname,
            host_veth: host_veth.clone(),
            ipam,
        };
        let out = rt.block_on(setup(&ctx, rt.handle())).and_then(|res| {
            if conf.ip_masq {
                masquerade(&conf, &r.conf.name, &res.ips)?;
            }
            Ok(res)
        });
        if let Err(e) = &out {
            if !existed {
                tracing::warn!("ADD failed ({e}); undoing");
                if let Err(u) = rt.block_on(teardown(rt.handle(), &host_veth)) {
                    tracing::warn!("undo: {u}");
                }
                if let Err(u) = delegate::run(&conf.ipam_type, Command::Del, r.env, r.stdin) {
                    tracing::warn!("undo: releasing the address: {u}");
                }
            }
        }
        out
    }

    fn del(&self, r: &Request) -> Result<(), CniError> {
        let conf = BridgeConf::parse(r.conf, r.env)?;
        let rt = runtime()?;
        let host_veth = host_veth_name(&r.env.container_id, &r.env.ifname);
        // Keep going after a failure: release the address even if the link removal failed.
        let links = rt.block_on(teardown(rt.handle(), &host_veth));
        let ipam = delegate::run(&conf.ipam_type, Command::Del, r.env, r.stdin);
        let nat = if conf.ip_masq {
            rt.block_on(unmasquerade(rt.handle(), &conf, &r.conf.name))
        } else {
            Ok(())
        };
        links?;
        ipam?;
        nat
    }

    fn check(&self, r: &Request) -> Result<(), CniError> {
        let conf = BridgeConf::parse(r.conf, r.env)?;
        let prev = r
            .conf
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::config("CHECK needs prevResult"))?;
        let prev = CniResult::from_json(prev)
            .map_err(|e| CniError::config(e.under("prevResult").to_string()))?;
        delegate::run(&conf.ipam_type, Command::Check, r.env, r.stdin)?;
        let rt = runtime()?;
        let ns = netns::open(&r.env.netns).map_err(|e| netns_error(&r.env.netns, &e))?;
        let host_veth = host_veth_name(&r.env.container_id, &r.env.ifname);
        rt.block_on(check_links(&conf, &prev, r, &ns, &host_veth, rt.handle()))
    }

    fn gc(&self, r: &Request) -> Result<(), CniError> {
        let conf = BridgeConf::parse(r.conf, r.env)?;
        delegate::run(&conf.ipam_type, Command::Gc, r.env, r.stdin).map(|_| ())
    }

    fn status(&self, r: &Request) -> Result<(), CniError> {
        let conf = BridgeConf::parse(r.conf, r.env)?;
        delegate::run(&conf.ipam_type, Command::Status, r.env, r.stdin).map(|_| ())
    }
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

async fn check_links(
    conf: &BridgeConf,
    prev: &CniResult,
    r: &Request<'_>,
    ns: &File,
    host_veth: &str,
    rt: &tokio::runtime::Handle,
) -> Result<(), CniError> {
    let host = netns::connect_here(rt).map_err(kernel("netlink socket"))?;
    let cont = netns::connect_in(ns, rt).map_err(|e| netns_error(&r.env.netns, &e))?;
    let ifname = r.env.ifname.as_str();
    let br = link::get(&host, &conf.bridge)
        .await
        .map_err(kernel(&conf.bridge))?
        .filter(Link::is_bridge)
        .ok_or_else(|| check_failed(format!("bridge {} is missing", conf.bridge)))?;
    let hv = link::get(&host, host_veth)
        .await
        .map_err(kernel(host_veth))?
        .ok_or_else(|| check_failed(format!("host veth {host_veth} is missing")))?;
    if hv.controller != Some(br.index) {
        return Err(check_failed(format!(
            "{host_veth} is not a port of bridge {}",
            conf.bridge
        )));
    }
    let cv = link::get(&cont, ifname)
        .await
        .map_err(kernel(ifname))?
        .ok_or_else(|| check_failed(format!("{ifname} is missing in {}", r.env.netns)))?;
    if !cv.is_veth() || cv.peer_index != Some(hv.index) {
        return Err(check_failed(format!(
            "{ifname} in {} is not the peer of {host_veth}",
            r.env.netns
        )));
    }
    if !cv.up {
        return Err(check_failed(format!("{ifname} is down")));
    }
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.is_some());
    if let Some(i) = idx {
        let want = &prev.interfaces[i].mac;
        let have = super::config::format_mac(&cv.mac);
        if !want.is_empty() && !want.eq_ignore_ascii_case(&have) {
            return Err(check_failed(format!(
                "{ifname} has MAC {have}, prevResult says {want}"
            )));
        }
    }
    let addrs = link::addresses(&cont, cv.index)
        .await
        .map_err(kernel(ifname))?;
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == idx)
    {
        if !addrs.contains(&ip.address) {
            return Err(check_failed(format!(
                "{ifname} lacks {} (has {})",
                ip.address,
                addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    for v4 in [true, false] {
        let want: Vec<&Route> = prev
            .routes
            .iter()
            .filter(|r| r.dst.addr().is_ipv4() == v4)
            .collect();
        if want.is_empty() {
            continue;
        }
        let have = link::route_dsts(&cont, v4)
            .await
            .map_err(kernel("routes"))?;
        for w in want {
            if !have.iter().any(|(d, _)| *d == w.dst) {
                return Err(check_failed(format!(
                    "route to {} is missing in the container",
                    w.dst
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::config::{Env, NetConf};
    use serde_json::json;

    fn conf(extra: serde_json::Value) -> BridgeConf {
        let mut v = json!({"cniVersion": "1.0.0", "name": "n", "type": "ipsec-mesh-bridge",
                           "ipam": {"type": "host-local"}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        let env = Env::from_vars(|k| {
            let v = match k {
                "CNI_COMMAND" => "ADD",
                "CNI_CONTAINERID" => "c",
                "CNI_NETNS" => "/x",
                "CNI_IFNAME" => "eth0",
                _ => return None,
            };
            Some(v.to_string())
        })
        .unwrap();
        BridgeConf::parse(&NetConf::parse(v.to_string().as_bytes()).unwrap(), &env).unwrap()
    }

    fn planned(_: &MeshRef) -> Result<(u16, u16), CniError> {
        Ok((1446, 1500))
    }

    fn unreachable_plan(_: &MeshRef) -> Result<(u16, u16), CniError> {
        panic!("the planner must not be asked")
    }

    #[test]
    fn veth_names_are_stable_and_fit() {
        let a = host_veth_name("c1", "eth0");
        assert_eq!(a, host_veth_name("c1", "eth0"));
        assert_ne!(a, host_veth_name("c1", "eth1"));
        assert_ne!(a, host_veth_name("c2", "eth0"));
        assert!(a.starts_with("veth") && a.len() == 15, "{a}");
    }

    #[test]
    fn mtu_choice() {
        let c = conf(json!({"mtu": 1400}));
        assert_eq!(
            choose_mtu(&c, unreachable_plan, || None).unwrap(),
            (1400, MtuBasis::Explicit)
        );
        let c = conf(json!({"metadata": "/m"}));
        assert_eq!(
            choose_mtu(&c, planned, || None).unwrap(),
            (1446, MtuBasis::Planner)
        );
        // The overhead is applied to the underlay MTU: from mtu, the metadata, or the
        // default route's device.
        let c = conf(json!({"mtu": 1500, "linkMTUOverhead": 98}));
        assert_eq!(
            choose_mtu(&c, unreachable_plan, || None).unwrap(),
            (
                1402,
                MtuBasis::Overhead {
                    underlay: 1500,
                    overhead: 98
                }
            )
        );
        let c = conf(json!({"metadata": "/m", "linkMTUOverhead": 100}));
        assert_eq!(choose_mtu(&c, planned, || None).unwrap().0, 1400);
        let c = conf(json!({"linkMTUOverhead": 50}));
        assert_eq!(
            choose_mtu(&c, unreachable_plan, || Some(9000)).unwrap().0,
            8950
        );
        let e = choose_mtu(&c, unreachable_plan, || None).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        let c = conf(json!({"mtu": 1500, "linkMTUOverhead": 1450}));
        assert!(choose_mtu(&c, unreachable_plan, || None)
            .unwrap_err()
            .msg
            .contains("leaves no usable MTU"));
        let c = conf(json!({}));
        let e = choose_mtu(&c, unreachable_plan, || Some(1500)).unwrap_err();
        assert!(e.msg.contains("cannot choose an MTU"), "{e}");
    }

    #[test]
    fn default_routes_and_gateways() {
        let ips = vec![IpConfig {
            address: "10.42.1.5/24".parse().unwrap(),
            gateway: None,
            interface: None,
            version: None,
        }];
        let c = conf(json!({"isDefaultGateway": true}));
        let r = container_routes(
            &c,
            &ips,
            &[Route::new("169.254.169.250/32".parse().unwrap(), None)],
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].dst, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(r[1].gw, Some("10.42.1.1".parse().unwrap()));
        assert_eq!(
            route_gateway(&r[0], &ips, true),
            Some("10.42.1.1".parse().unwrap())
        );
        assert_eq!(route_gateway(&r[0], &ips, false), None);
        // An IPAM default route is not doubled.
        let r = container_routes(&c, &ips, &[Route::new("0.0.0.0/0".parse().unwrap(), None)]);
        assert_eq!(r.len(), 1);
        let c = conf(json!({}));
        assert!(container_routes(&c, &ips, &[]).is_empty());
    }
}
