//! The CNI plugins under a real podman (4.3, CNI backend) on three hosts of a vxlan mesh
//! (root only; needs `podman crun conmon containernetworking-plugins busybox-static`, which
//! integration/setup.sh installs).
//!
//! Topology, all in network namespaces `pm<pid><tag>-*` (removed when the test ends, pass or
//! fail; no traffic leaves them):
//!
//! ```text
//!   sw      the underlay switch (bridge br0) and its router: 192.168.77.254, forwarding to
//!   inet    "the internet": 198.51.100.2 behind sw (198.51.100.1), a busybox httpd whose CGI
//!           prints the client's address; it has no route to the overlay
//!   h1..h3  hosts 192.168.77.N (default via .254), the mesh by `ipsec-mesh apply --driver
//!           vxlan`, podman with the config `ipsec-mesh cni-config` writes
//! ```
//!
//! podman cannot run under `ip netns exec` here (it remounts /sys, and each call gets a
//! throwaway mount namespace: /work/shared/TESTBED.md), so each host has one long-lived helper
//! process in its network namespace holding a mount namespace of its own, with private tmpfs
//! on /run, /var/lib and /var/tmp (podman's storage, state, netns mounts and the CNI cache
//! all live there and vanish with it: the machine's own podman state is never touched), and
//! every podman command enters it with `nsenter`. crun cannot load the cgroup v2 device
//! filter here nor use the hybrid tree, so containers run with `cgroups = "disabled"` and
//! rlimits the sandbox allows. The image is busybox-static, `podman import`ed (no registry).

// The hosts are entered with nsenter, not the shared netns helper.
#[allow(unused_imports)]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::sh;
use serde_json::Value;

const MESH: &str = env!("CARGO_BIN_EXE_ipsec-mesh");
const BRIDGE: &str = env!("CARGO_BIN_EXE_ipsec-mesh-bridge");
const NET: &str = "ipsec-mesh";
const IMAGE: &str = "localhost/meshbox:latest";

fn require_podman() {
    require_root!();
    common::require_program("/usr/bin/podman", "podman");
    common::require_program("/usr/bin/crun", "crun");
    common::require_program("/usr/bin/conmon", "conmon");
    common::require_program("/usr/lib/cni/portmap", "containernetworking-plugins");
    common::require_program("/bin/busybox", "busybox-static");
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The namespace-holding helper of one host and the podman running there.
struct Host {
    n: u32,
    dir: PathBuf,
    helper: Child,
}

const HELPER: &str = r#"set -e
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /var/tmp
mount -t tmpfs tmpfs /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo ready > "$1"
exec sleep infinity
"#;

impl Host {
    fn start(n: u32, ns: &str, dir: &Path, masquerade: bool, meta: &Path) -> Host {
        let dir = dir.join(format!("h{n}"));
        let netd = dir.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        let bin_dir = Path::new(BRIDGE).parent().unwrap();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ncgroups = \"disabled\"\n\
                 default_ulimits = [\"nproc=4096:4096\", \"nofile=4096:4096\"]\n\
                 [network]\nnetwork_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"/run/podman-events.log\"\nruntime = \"crun\"\n",
                bin_dir.display(),
                netd.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"/var/lib/containers/storage\"\n\
             runroot = \"/run/containers/storage\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("helper.sh"), HELPER).unwrap();
        let ready = dir.join("ready");
        let helper = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["unshare", "--mount", "--propagation", "private", "sh"])
            .arg(dir.join("helper.sh"))
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the podman helper");
        let h = Host { n, dir, helper };
        let t = Instant::now();
        while !ready.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "h{n}: the podman helper did not get ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The network configuration, as a user writes it.
        let host = format!("h{n}");
        let mut args = vec![
            "cni-config".to_string(),
            "--metadata".into(),
            meta.display().to_string(),
            "--host".into(),
            host,
            "--name".into(),
            NET.into(),
            "--data-dir".into(),
            "/var/lib/cni/networks/ipsec-mesh".into(),
        ];
        if !masquerade {
            args.push("--no-masquerade".into());
        }
        let out = Command::new(MESH).args(&args).output().unwrap();
        assert!(out.status.success(), "cni-config: {}", text(&out));
        std::fs::write(netd.join("10-ipsec-mesh.conflist"), &out.stdout).unwrap();
        h.ok(&[
            "import",
            &h.dir
                .parent()
                .unwrap()
                .join("meshbox.tar")
                .display()
                .to_string(),
            IMAGE,
        ]);
        h
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.helper.id().to_string(), "-m", "-n", "podman"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .stdin(Stdio::null());
        c
    }

    fn podman(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let o = self.podman(args);
        assert!(
            o.status.success(),
            "h{}: podman {}: {}",
            self.n,
            args.join(" "),
            text(&o)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `podman run -d` of the image's web server (its CGI /cgi-bin/ip prints the client).
    #[track_caller]
    fn run(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name, "--network", NET];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
        self.ok(&args);
        self.ip(name)
    }

    /// The container's address on the mesh network.
    #[track_caller]
    fn ip(&self, name: &str) -> String {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        v[0]["NetworkSettings"]["Networks"][NET]["IPAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("h{}: {name} has no address on {NET}: {v}", self.n))
            .to_string()
    }

    /// A shell command inside the host's namespaces (as podman sees the host).
    fn host_sh(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.helper.id().to_string(),
                "-m",
                "-n",
                "sh",
                "-c",
                cmd,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    #[track_caller]
    fn host_ok(&self, cmd: &str) -> String {
        let o = self.host_sh(cmd);
        assert!(o.status.success(), "h{}: {cmd}: {}", self.n, text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Allocations in the IPAM store (address -> container id).
    fn allocations(&self) -> Vec<(String, String)> {
        let o = self.host_sh("cat /var/lib/cni/networks/ipsec-mesh/allocations.json");
        if !o.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        v["allocations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(ip, o)| (ip.clone(), o["container"].as_str().unwrap().to_string()))
            .collect()
    }

    /// Our masquerade tables on this host.
    fn masq_tables(&self) -> Vec<String> {
        self.host_ok("nft list tables")
            .lines()
            .filter(|l| l.contains("ipsec_mesh_masq_"))
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// Ports of the mesh bridge.
    fn bridge_ports(&self) -> usize {
        let o = self.host_sh("ip -o link show master cni0");
        String::from_utf8_lossy(&o.stdout).lines().count()
    }
}

/// Processes in namespace inode `ino` of kind `kind` (`mnt`, `net`).
fn pids_in(kind: &str, inos: &[u64]) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| *p != me)
        .filter(|p| {
            std::fs::metadata(format!("/proc/{p}/ns/{kind}"))
                .map(|m| inos.contains(&m.ino()))
                .unwrap_or(false)
        })
        .collect()
}

impl Drop for Host {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        // Whatever is left: conmon and podman in the helper's mount namespace, containers in
        // the network namespaces podman made (listed in the helper's private /run/netns).
        let hp = self.helper.id();
        let mnt: Vec<u64> = std::fs::metadata(format!("/proc/{hp}/ns/mnt"))
            .map(|m| vec![m.ino()])
            .unwrap_or_default();
        let nets: Vec<u64> = std::fs::read_dir(format!("/proc/{hp}/root/run/netns"))
            .map(|d| {
                d.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok().map(|m| m.ino()))
                    .collect()
            })
            .unwrap_or_default();
        for p in pids_in("net", &nets)
            .into_iter()
            .chain(pids_in("mnt", &mnt).into_iter().filter(|p| *p != hp as i32))
        {
            // SAFETY: kill(2) on processes of this test's own podman.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}

/// The test's world: namespaces, the internet's web server, the hosts (dropped first).
struct World {
    hosts: Vec<Host>,
    web: Option<Child>,
    ns: common::Namespaces,
}

impl Drop for World {
    fn drop(&mut self) {
        self.hosts.clear();
        if let Some(mut w) = self.web.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The CGI `/cgi-bin/ip`: the client's address (httpd listens on IPv6 and gives IPv4 clients
/// as `[::ffff:a.b.c.d]`).
const CGI: &str = "#!/bin/sh\necho 'Content-Type: text/plain'\necho\na=${REMOTE_ADDR#[::ffff:}\necho \"${a%]}\"\n";

/// The busybox rootfs with the web root (`/www/cgi-bin/ip` prints REMOTE_ADDR), as a tar.
fn image_tar(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "www/cgi-bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in [
        "sh", "ping", "wget", "httpd", "sleep", "ip", "cat", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    let cgi = root.join("www/cgi-bin/ip");
    std::fs::write(&cgi, CGI).unwrap();
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let tar = dir.join("meshbox.tar");
    sh(&format!(
        "tar -C {} -cf {} .",
        root.display(),
        tar.display()
    ));
    tar
}

/// The topology of the module docs with `hosts` hosts; `masquerade[i]` for host i+1.
fn world(tag: &str, masquerade: &[bool]) -> World {
    let mut ns = common::Namespaces::new("pm", tag);
    let sw = ns.add("sw");
    let inet = ns.add("inet");
    sh(&format!(
        "ip -n {sw} link add br0 type bridge && ip -n {sw} link set br0 up && \
         ip -n {sw} addr add 192.168.77.254/24 dev br0 && \
         ip link add wan netns {sw} type veth peer name eth0 netns {inet} && \
         ip -n {sw} addr add 198.51.100.1/24 dev wan && ip -n {sw} link set wan up && \
         ip -n {inet} addr add 198.51.100.2/24 dev eth0 && ip -n {inet} link set eth0 up && \
         ip -n {inet} route add default via 198.51.100.1 && \
         ip netns exec {sw} sysctl -qw net.ipv4.ip_forward=1"
    ));
    let n_hosts = masquerade.len() as u32;
    let hosts: Vec<String> = (1..=n_hosts)
        .map(|i| {
            format!(r#"{{"id":"h{i}","agent_ip":"192.168.77.{i}","subnets":["10.42.{i}.0/24"]}}"#)
        })
        .collect();
    let meta = ns.dir.path().join("mesh.json");
    std::fs::write(
        &meta,
        format!(
            r#"{{"network":{{"cidr":"10.42.0.0/16","backend":"vxlan","mtu":1500}},"hosts":[{}]}}"#,
            hosts.join(",")
        ),
    )
    .unwrap();
    image_tar(ns.dir.path());
    // The internet's web server (owned by the world as soon as it runs: killed on drop).
    let www = ns.dir.path().join("www");
    std::fs::create_dir_all(www.join("cgi-bin")).unwrap();
    let cgi = www.join("cgi-bin/ip");
    std::fs::write(&cgi, CGI.replacen("#!/bin/sh", "#!/bin/busybox sh", 1)).unwrap();
    std::fs::set_permissions(&cgi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let web = Command::new("ip")
        .args([
            "netns",
            "exec",
            &inet,
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "80",
            "-h",
        ])
        .arg(&www)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut w = World {
        hosts: Vec::new(),
        web: Some(web),
        ns,
    };
    for n in 1..=n_hosts {
        let h = w.ns.add(&format!("h{n}"));
        sh(&format!(
            "ip link add u{n} netns {h} type veth peer name sw{n} netns {sw} && \
             ip -n {sw} link set sw{n} master br0 && ip -n {sw} link set sw{n} up && \
             ip -n {h} link set u{n} up && ip -n {h} addr add 192.168.77.{n}/24 dev u{n} && \
             ip -n {h} route add default via 192.168.77.254"
        ));
        let out = Command::new("ip")
            .args(["netns", "exec", &h, MESH, "apply", "--metadata"])
            .arg(&meta)
            .args(["--host", &format!("h{n}"), "--driver", "vxlan"])
            .env("IPSEC_MESH_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "apply on h{n}: {}", text(&out));
        let host = Host::start(n, &h, w.ns.dir.path(), masquerade[n as usize - 1], &meta);
        w.hosts.push(host);
    }
    w
}

impl World {
    fn h(&self, n: u32) -> &Host {
        &self.hosts[n as usize - 1]
    }

    /// busybox wget from a plain namespace (not a container).
    fn wget_from(&self, role: &str, url: &str) -> Option<String> {
        let o = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.ns(role),
                "/bin/busybox",
                "timeout",
                "5",
                "/bin/busybox",
                "wget",
                "-q",
                "-O",
                "-",
                url,
            ])
            .output()
            .unwrap();
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

/// busybox wget inside container `c` on host `h`: the body, or None when it fails.
fn wget_in(h: &Host, c: &str, url: &str) -> Option<String> {
    // `timeout`, not wget's -T: Debian's busybox-static wget crashes with -T.
    let o = h.podman(&["exec", c, "timeout", "5", "wget", "-q", "-O", "-", url]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn pings(h: &Host, c: &str, dst: &str) -> bool {
    (0..3).any(|_| {
        h.podman(&["exec", c, "ping", "-c", "1", "-W", "2", dst])
            .status
            .success()
    })
}

/// Cross-host and same-host pings, published ports, masquerade out of the mesh and none
/// inside it, `podman network inspect`, the masquerade table's life cycle.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn podman_containers_mesh_publish_and_reach_out() {
    require_podman();
    // h3 has masquerade turned off (`cni-config --no-masquerade`): the control.
    let w = world("mesh", &[true, true, false]);
    let a = w.h(1).run("a", &["-p", "18080:80"]);
    let b = w.h(1).run("b", &[]);
    let c = w.h(2).run("c", &[]);
    let d = w.h(3).run("d", &[]);
    for (ip, n) in [(&a, 1), (&b, 1), (&c, 2), (&d, 3)] {
        assert!(ip.starts_with(&format!("10.42.{n}.")), "{ip} on h{n}");
    }
    // The MTU is the vxlan mesh's.
    assert!(w
        .h(1)
        .ok(&["exec", "a", "ip", "link", "show", "eth0"])
        .contains("mtu 1450"));

    // Every pair pings: same host and across the mesh.
    let all = [(1, "a", &a), (1, "b", &b), (2, "c", &c), (3, "d", &d)];
    for (hn, from, _) in all {
        for (_, to, ip) in all.iter().filter(|x| x.1 != from) {
            assert!(pings(w.h(hn), from, ip), "{from} -> {to} ({ip})");
        }
    }

    // Mesh traffic keeps its source address (no masquerade inside the mesh).
    let url = |ip: &str| format!("http://{ip}/cgi-bin/ip");
    assert_eq!(wget_in(w.h(2), "c", &url(&a)).as_deref(), Some(c.as_str()));
    assert_eq!(wget_in(w.h(3), "d", &url(&c)).as_deref(), Some(d.as_str()));
    assert_eq!(wget_in(w.h(1), "b", &url(&a)).as_deref(), Some(b.as_str()));

    // Out of the mesh: masqueraded to the host's address; h3 (masquerade off) cannot get
    // an answer back (the internet has no route to the overlay).
    let inet = url("198.51.100.2");
    assert_eq!(wget_in(w.h(1), "a", &inet).as_deref(), Some("192.168.77.1"));
    assert_eq!(wget_in(w.h(2), "c", &inet).as_deref(), Some("192.168.77.2"));
    assert_eq!(wget_in(w.h(3), "d", &inet), None, "no masquerade on h3");
    assert!(w.h(3).masq_tables().is_empty());

    // One table, one rule per family, whatever the number of containers.
    let tables = w.h(1).masq_tables();
    assert_eq!(tables.len(), 1, "{tables:?}");
    let table = tables[0].clone();
    let listing = w.h(1).host_ok(&format!("nft list {table}"));
    assert_eq!(listing.matches("masquerade").count(), 1, "{listing}");
    assert!(listing.contains("ip daddr != @mesh4"), "{listing}");
    for e in [
        "10.42.0.0/16",
        "192.168.77.1",
        "192.168.77.2",
        "192.168.77.3",
    ] {
        assert!(listing.contains(e), "{e} exempt: {listing}");
    }
    let e = w.h(1).run("e", &[]);
    assert!(e.starts_with("10.42.1."), "{e}");
    assert_eq!(
        w.h(1).host_ok(&format!("nft list {table}")),
        listing,
        "a container adds nothing"
    );
    assert!(pings(w.h(1), "e", &d));

    // Published port (portmap): from another host and from the internet, with the client's
    // own address (DNAT only).
    assert_eq!(
        w.wget_from("h3", "http://192.168.77.1:18080/cgi-bin/ip")
            .as_deref(),
        Some("192.168.77.3")
    );
    assert_eq!(
        w.wget_from("inet", "http://192.168.77.1:18080/cgi-bin/ip")
            .as_deref(),
        Some("198.51.100.2")
    );
    assert!(w
        .h(1)
        .ok(&["port", "a"])
        .contains("80/tcp -> 0.0.0.0:18080"));

    // podman network inspect shows the host's subnet and gateway (as labels: podman reads
    // subnets only from its reference bridge plugin).
    let v: Value = serde_json::from_str(&w.h(2).ok(&["network", "inspect", NET])).unwrap();
    let labels = &v[0]["labels"];
    assert_eq!(labels["io.ipsec-mesh.subnets"], "10.42.2.0/24", "{v}");
    assert_eq!(labels["io.ipsec-mesh.gateways"], "10.42.2.1", "{v}");

    // The last container's DEL removes the table; the published port is gone with its
    // container; nothing is left on the bridge or in the store.
    for c in ["a", "b"] {
        w.h(1).ok(&["rm", "-f", "-t", "0", c]);
    }
    assert_eq!(w.h(1).masq_tables(), [table], "e still runs");
    assert_eq!(
        w.wget_from("h3", "http://192.168.77.1:18080/cgi-bin/ip"),
        None
    );
    w.h(1).ok(&["rm", "-f", "-t", "0", "e"]);
    assert!(w.h(1).masq_tables().is_empty());
    assert_eq!(w.h(1).bridge_ports(), 0);
    assert!(
        w.h(1).allocations().is_empty(),
        "{:?}",
        w.h(1).allocations()
    );
    let nat = w.h(1).host_ok("iptables-save -t nat");
    assert!(!nat.contains("18080"), "portmap left its rules: {nat}");
}

/// `--ip` honoured and refused, 10 parallel runs, release, restart, network reload, stop and
/// start, and nothing left behind.
#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn podman_addresses_static_parallel_restart_and_release() {
    require_podman();
    let w = world("addr", &[true, true]);
    let h = w.h(1);
    assert_eq!(h.run("s", &["--ip", "10.42.1.200"]), "10.42.1.200");
    // Refused with the plugin's error, never silently.
    for (ip, needle) in [
        ("10.42.1.200", "10.42.1.200 is in use by container"),
        (
            "10.42.2.5",
            "10.42.2.5 is not in this host's subnets (10.42.1.0/24)",
        ),
        ("10.42.1.1", "10.42.1.1 is the gateway of 10.42.1.0/24"),
    ] {
        let o = h.podman(&[
            "run",
            "-d",
            "--name",
            "bad",
            "--network",
            NET,
            "--ip",
            ip,
            IMAGE,
            "sleep",
            "60",
        ]);
        assert!(!o.status.success(), "--ip {ip} was accepted: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "--ip {ip}: {needle:?} not in {err}");
        let _ = h.podman(&["rm", "-f", "bad"]);
    }
    assert_eq!(h.allocations().len(), 1, "{:?}", h.allocations());

    // 10 parallel runs: 10 distinct addresses, all reachable.
    let kids: Vec<Child> = (0..10)
        .map(|i| {
            h.command(&[
                "run",
                "-d",
                "--name",
                &format!("p{i}"),
                "--network",
                NET,
                IMAGE,
                "httpd",
                "-f",
                "-p",
                "80",
                "-h",
                "/www",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "p{i}: {}", text(&o));
    }
    let mut ips: Vec<String> = (0..10).map(|i| h.ip(&format!("p{i}"))).collect();
    let p0 = ips[0].clone();
    let p1 = ips[1].clone();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 10, "{ips:?}");
    assert!(!ips
        .iter()
        .any(|ip| ip == "10.42.1.200" || ip == "10.42.1.1"));
    for ip in &ips {
        assert!(pings(h, "s", ip), "s -> {ip}");
    }
    assert_eq!(h.allocations().len(), 11);
    assert_eq!(h.bridge_ports(), 11);
    // A container on the other host reaches them over the mesh.
    w.h(2).run("far", &[]);
    assert!(pings(w.h(2), "far", &p0));

    // podman restart, network reload, stop + start: same address each time.
    h.ok(&["restart", "-t", "0", "p0"]);
    assert_eq!(h.ip("p0"), p0, "restart keeps the address");
    h.ok(&["network", "reload", "p0"]);
    assert_eq!(h.ip("p0"), p0, "network reload keeps the address");
    assert!(
        pings(h, "p0", "10.42.1.200"),
        "and it works after the reload"
    );
    h.ok(&["stop", "-t", "0", "p0"]);
    h.ok(&["start", "p0"]);
    assert_eq!(h.ip("p0"), p0, "stop and start keep the address");
    h.ok(&["restart", "-t", "0", "s"]);
    assert_eq!(h.ip("s"), "10.42.1.200");

    // Release: rm gives the address up (kept a while for the same container id only: a new
    // container does not get it).
    h.ok(&["rm", "-f", "-t", "0", "p1"]);
    assert!(!h.allocations().iter().any(|(ip, _)| *ip == p1));
    assert_ne!(h.run("q", &[]), p1);

    // Nothing left behind once everything is removed.
    h.ok(&["rm", "-a", "-f", "-t", "0"]);
    assert!(h.allocations().is_empty(), "{:?}", h.allocations());
    assert_eq!(h.bridge_ports(), 0);
    assert!(h.masq_tables().is_empty());
    let left = h.host_ok("ls /run/netns");
    assert!(left.trim().is_empty(), "podman netns left: {left}");
    assert!(h.ok(&["ps", "-a", "-q"]).is_empty());
}
