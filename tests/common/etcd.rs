//! A REAL 3-member etcd cluster (Debian's etcd-server 3.4, never a mock) in network
//! namespaces, shared by tests/netns_etcd.rs and benches/etcd.rs (root only).
//!
//! ```text
//!   sw         bridge br0: the test underlay, 192.168.78.0/24
//!   e1 e2 e3   etcd members, 192.168.78.11-13 (client port 2379, peer port 2380), each its
//!              own data dir in the scratch dir; progress notifications every 1 s
//!   cl         the client: 192.168.78.100; etcdctl and the adapter (on a thread that entered
//!              this namespace) run here
//!   hN cN      a host on the underlay (192.168.78.20+N) and its container ([`Etcd::add_host`])
//! ```
//!
//! [`Etcd::ipv6`] builds the same on an IPv6-only underlay, fd78::/64 (members fd78::11-13,
//! the client fd78::100, hosts fd78::20+N; `nodad` addresses): etcd listens, peers and is
//! reached on IPv6 only, URLs in brackets (`http://[fd78::11]:2379`).
//!
//! No traffic leaves the namespaces; every process and namespace goes away on drop.
#![allow(dead_code)]

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";
pub const NET: &str = r#"{"cidr":"10.42.0.0/16","backend":"vxlan","mtu":1500}"#;

pub fn member_ip(n: usize) -> String {
    format!("192.168.78.{}", 10 + n)
}

/// Member `n`'s address on an IPv6 underlay ([`Etcd::ipv6`]).
pub fn member_ip6(n: usize) -> String {
    format!("fd78::{}", 10 + n)
}

pub fn host_json(id: &str, n: u32) -> String {
    format!(r#"{{"id":"{id}","agent_ip":"192.168.77.{n}","subnets":["10.42.{n}.0/24"]}}"#)
}

/// [`super::in_netns`], where the etcd suites have always found it.
#[allow(unused_imports)]
pub use super::in_netns;

/// A 3-member etcd cluster and a client namespace.
pub struct Etcd {
    pub t: super::Namespaces,
    pub members: Vec<Option<Child>>,
    /// Client TLS: members serve https with --client-cert-auth (certificates in `dir`).
    pub tls: bool,
    /// An IPv6-only underlay ([`Etcd::ipv6`]).
    pub v6: bool,
}

impl Etcd {
    pub fn new(tag: &str) -> Etcd {
        Etcd::with_tls(tag, false)
    }

    pub fn with_tls(tag: &str, tls: bool) -> Etcd {
        Etcd::build(tag, tls, false)
    }

    /// The cluster on an IPv6-only underlay (see the module docs), plain http.
    pub fn ipv6(tag: &str) -> Etcd {
        Etcd::build(tag, false, true)
    }

    fn build(tag: &str, tls: bool, v6: bool) -> Etcd {
        assert!(
            super::is_root(),
            "a real etcd cluster in network namespaces needs root: run it through integration/run.sh as root"
        );
        super::require_program(ETCD, "etcd-server");
        super::require_program(ETCDCTL, "etcd-client");
        let mut t = super::Namespaces::new("et", tag);
        let sw = t.add("sw");
        super::sh(&format!(
            "ip -n {sw} link add br0 type bridge && ip -n {sw} link set br0 up"
        ));
        let mut attach = |role: &str, ip: &str, i: usize| {
            let ns = t.add(role);
            super::sh(&format!(
                "ip link add u{i} netns {ns} type veth peer name p{i} netns {sw} && \
                 ip -n {sw} link set p{i} master br0 && ip -n {sw} link set p{i} up && \
                 ip -n {ns} link set u{i} up && {}",
                addr_cmd(&ns, ip, &format!("u{i}"), v6)
            ));
        };
        for n in 1..=3 {
            let ip = if v6 { member_ip6(n) } else { member_ip(n) };
            attach(&format!("e{n}"), &ip, n);
        }
        attach("cl", if v6 { "fd78::100" } else { "192.168.78.100" }, 0);
        let mut e = Etcd {
            t,
            members: vec![None, None, None],
            tls,
            v6,
        };
        if tls {
            e.make_certs();
        }
        for n in 1..=3 {
            e.start(n);
        }
        e.wait_healthy(3);
        e
    }

    /// Member `n`'s address (of the underlay's family).
    pub fn member(&self, n: usize) -> String {
        if self.v6 {
            member_ip6(n)
        } else {
            member_ip(n)
        }
    }

    /// Member `n`'s `HOST:PORT` (`[ADDR]:PORT` on IPv6).
    pub fn member_port(&self, n: usize, port: u16) -> String {
        if self.v6 {
            format!("[{}]:{port}", member_ip6(n))
        } else {
            format!("{}:{port}", member_ip(n))
        }
    }

    pub fn cluster_flag(&self) -> String {
        (1..=3)
            .map(|n| format!("e{n}=http://{}", self.member_port(n, 2380)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start member `n` (1-based); its data dir survives a kill, so a restart rejoins.
    pub fn start(&mut self, n: usize) {
        let (client, peer) = (self.member_port(n, 2379), self.member_port(n, 2380));
        let dir = self.t.dir.path().join(format!("e{n}"));
        let log = File::create(self.t.dir.path().join(format!("e{n}.log"))).unwrap();
        let scheme = self.scheme();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.t.ns(&format!("e{n}")), ETCD]);
        if self.tls {
            let c = |f: &str| self.cert(f);
            cmd.args(["--cert-file", &c(&format!("e{n}.pem"))])
                .args(["--key-file", &c(&format!("e{n}.key"))])
                .args(["--trusted-ca-file", &c("ca.pem"), "--client-cert-auth"]);
        }
        let child = cmd
            .args(["--name", &format!("e{n}")])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen-client-urls", &format!("{scheme}://{client}")])
            .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
            .args(["--listen-peer-urls", &format!("http://{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
            .args(["--initial-cluster", &self.cluster_flag()])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.t.prefix])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--experimental-watch-progress-notify-interval", "1s"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[n - 1] = Some(child);
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// A file of the test's PKI.
    pub fn cert(&self, name: &str) -> String {
        self.t
            .dir
            .path()
            .join("pki")
            .join(name)
            .display()
            .to_string()
    }

    /// With openssl: a CA, a server certificate per member (its IP as SAN), a client
    /// certificate, and a second CA that signed nothing of the cluster's (for the negative
    /// cases).
    pub fn make_certs(&self) {
        super::require_program("/usr/bin/openssl", "openssl");
        let d = self.t.dir.path().join("pki");
        std::fs::create_dir_all(&d).unwrap();
        let d = d.display();
        let ca = |name: &str| {
            format!(
                "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
                 -subj /CN={name} -keyout {d}/{name}.key -out {d}/{name}.pem 2>/dev/null"
            )
        };
        super::sh(&ca("ca"));
        super::sh(&ca("other-ca"));
        let leaf = |name: &str, ext: &str, signer: &str| {
            format!(
                "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
                 -keyout {d}/{name}.key -out {d}/{name}.csr 2>/dev/null && \
                 printf '%s\n' '{ext}' > {d}/{name}.ext && \
                 openssl x509 -req -in {d}/{name}.csr -CA {d}/{signer}.pem -CAkey {d}/{signer}.key \
                 -CAcreateserial -days 2 -extfile {d}/{name}.ext -out {d}/{name}.pem 2>/dev/null"
            )
        };
        for n in 1..=3 {
            super::sh(&leaf(
                &format!("e{n}"),
                &format!(
                    "subjectAltName=IP:{}\nextendedKeyUsage=serverAuth,clientAuth",
                    self.member(n)
                ),
                "ca",
            ));
        }
        super::sh(&leaf("client", "extendedKeyUsage=clientAuth", "ca"));
        super::sh(&leaf("stranger", "extendedKeyUsage=clientAuth", "other-ca"));
    }

    /// kill -9 member `n`.
    pub fn kill9(&mut self, n: usize) {
        if let Some(mut c) = self.members[n - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigstop(&self, n: usize, sig: libc::c_int) {
        let pid = self.members[n - 1].as_ref().expect("member running").id();
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }

    pub fn endpoints(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|n| self.member_port(*n, 2379))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcdctl ARGS` from the client namespace against the running members.
    pub fn ctl_try(&self, args: &[&str]) -> Result<String, String> {
        let running: Vec<usize> = (1..=3).filter(|n| self.members[n - 1].is_some()).collect();
        let eps: Vec<String> = running
            .iter()
            .map(|n| format!("{}://{}", self.scheme(), self.member_port(*n, 2379)))
            .collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.t.ns("cl"), ETCDCTL]);
        if self.tls {
            cmd.arg(format!("--cacert={}", self.cert("ca.pem")))
                .arg(format!("--cert={}", self.cert("client.pem")))
                .arg(format!("--key={}", self.cert("client.key")));
        }
        let out = cmd
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        self.ctl_try(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    pub fn revision(&self) -> i64 {
        let v: Value = serde_json::from_str(&self.ctl(&["get", "/", "-w", "json"])).unwrap();
        v["header"]["revision"].as_i64().unwrap()
    }

    /// Wait until `count` members are healthy and there is a leader.
    pub fn wait_healthy(&self, count: usize) {
        let t = Instant::now();
        loop {
            if let Ok(out) = self.ctl_try(&["endpoint", "health", "-w", "json"]) {
                let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
                let ok = v
                    .as_array()
                    .map_or(0, |a| a.iter().filter(|e| e["health"] == true).count());
                if ok >= count && self.leader().is_some() {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "etcd: {count} healthy members not reached in 30 s; logs in {}",
                self.t.dir.path().display()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The leader (1-based), from `etcdctl endpoint status`.
    pub fn leader(&self) -> Option<usize> {
        let out = self.ctl_try(&["endpoint", "status", "-w", "json"]).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        v.as_array()?.iter().find_map(|e| {
            let s = &e["Status"];
            let me = s["header"]["member_id"].as_u64()?;
            (me == s["leader"].as_u64()? && me != 0)
                .then(|| e["Endpoint"].as_str())
                .flatten()
                .and_then(|ep| (1..=3).find(|n| ep.contains(&self.member_port(*n, 2379))))
        })
    }

    pub fn seed(&self, prefix: &str, hosts: &[u32]) {
        self.put(&format!("{prefix}/network"), NET);
        for n in hosts {
            self.put(
                &format!("{prefix}/hosts/h{n}"),
                &host_json(&format!("h{n}"), *n),
            );
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for n in 1..=3 {
            if self.members[n - 1].is_some() {
                self.sigstop(n, libc::SIGCONT);
            }
            self.kill9(n);
        }
    }
}

impl Etcd {
    /// Host `n`'s underlay address (192.168.78.20+n).
    pub fn host_ip(n: usize) -> String {
        format!("192.168.78.{}", 20 + n)
    }

    /// Host `n`'s underlay address of this cluster's family (fd78::20+n on IPv6).
    pub fn host_addr(&self, n: usize) -> String {
        if self.v6 {
            format!("fd78::{}", 20 + n)
        } else {
            Self::host_ip(n)
        }
    }

    /// Host `n`'s namespace on the underlay, its container namespace behind bridge cbr0.
    pub fn add_host(&mut self, n: usize) {
        let sw = self.t.ns("sw");
        let h = self.t.add(&format!("h{n}"));
        self.t.add(&format!("c{n}"));
        let ip = self.host_addr(n);
        super::sh(&format!(
            "ip link add u{n} netns {h} type veth peer name q{n} netns {sw} && \
             ip -n {sw} link set q{n} master br0 && ip -n {sw} link set q{n} up && \
             ip -n {h} link set u{n} up && {} && \
             ip netns exec {h} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
            addr_cmd(&h, &ip, &format!("u{n}"), self.v6)
        ));
    }
}

/// `ip addr add` of an underlay address: a /24, or on IPv6 a /64 without duplicate address
/// detection (usable at once).
fn addr_cmd(ns: &str, ip: &str, dev: &str, v6: bool) -> String {
    if v6 {
        format!("ip -n {ns} addr add {ip}/64 dev {dev} nodad")
    } else {
        format!("ip -n {ns} addr add {ip}/24 dev {dev}")
    }
}
