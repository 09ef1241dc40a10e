//! Root only: the VICI client against a real `charon-systemd` (Debian's strongSwan) in
//! fresh network namespaces, configured with charon-conf/strongswan-libipsec.conf.
//! Needs the packages integration/setup.sh installs.

#[allow(unused_imports)] // common re-exports helpers this suite does not use
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ipsec_mesh::dataplane::charon::{
    AuthConfig, ChildConfig, Client, ConnConfig, ConnectOptions, GetConns, GetShared, Initiate,
    ListConns, ListSas, LoadConn, LoadShared, SaAction, SaEvent, SharedKeyType, StartAction,
    Terminate, Unique, UnloadConn, UnloadShared, ViciError,
};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named netns with one charon-systemd in it. Dropping it stops charon (SIGTERM, then
/// SIGKILL) and deletes the netns, whatever happened in the test.
struct Charon {
    ns: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Charon {
    fn new(tag: &str, conf: &str) -> Charon {
        assert!(
            Path::new(common::CHARON).exists(),
            "{} is missing: run integration/setup.sh (charon-systemd, libcharon-extra-plugins)",
            common::CHARON
        );
        let ns = format!("imc-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        let dir = tempfile::tempdir().unwrap();
        let c = Charon {
            ns,
            dir,
            child: None,
        };
        ip(&["-n", &c.ns, "link", "set", "lo", "up"]);
        common::write_charon_conf(c.dir.path(), conf);
        c
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("strongswan.conf")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("charon.vici")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("charon.log")).unwrap_or_default()
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        self.child = Some(common::charon_start(&self.ns, &self.conf()));
    }

    /// SIGKILL: charon leaves its socket file behind.
    fn kill9(&mut self) {
        common::charon_kill9(&mut self.child);
    }

    fn stop(&mut self) {
        common::charon_stop(&mut self.child);
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(25),
        max_wait: Some(Duration::from_secs(15)),
        request_timeout: Duration::from_secs(15),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const PSK: &[u8] = b"charon-vici-test-psk-not-secret";

fn shared(me: &str, peer: &str) -> LoadShared {
    LoadShared {
        id: "ipsec-mesh-psk".into(),
        kind: SharedKeyType::Ike,
        data: PSK.to_vec().into(),
        owners: vec![me.into(), peer.into()],
    }
}

/// The conn shape of issue 4 for `me` -> `peer`.
fn conn(me: (&str, &str, &str), peer: (&str, &str, &str), rekey: bool) -> ConnConfig {
    let name = format!("ipsec-mesh-{}", peer.0);
    let mut c = ConnConfig::ikev2(&name, AuthConfig::psk(me.0), AuthConfig::psk(peer.0));
    c.local_addrs = vec![me.1.into()];
    c.remote_addrs = vec![peer.1.into()];
    c.proposals = vec!["aes256gcm16-prfsha256-ecp256".into()];
    c.mobike = false;
    c.unique = Some(Unique::Replace);
    c.dpd_delay = Some(30);
    c.rekey_time = Some(if rekey { 14400 } else { 0 });
    let mut ch = ChildConfig::tunnel(&name, vec![me.2.into()], vec![peer.2.into()]);
    ch.esp_proposals = vec!["aes256gcm16".into()];
    ch.rekey_time = Some(if rekey { 3600 } else { 0 });
    ch.start_action = StartAction::None;
    ch.dpd_action = SaAction::Restart;
    c.children = vec![ch];
    c
}

const A: (&str, &str, &str) = ("host-a", "192.168.77.1", "10.42.1.0/24");
const B: (&str, &str, &str) = ("host-b", "192.168.77.2", "10.42.2.0/24");

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn load_list_unload_and_errors_against_real_charon() {
    require_root!();
    let mut charon = Charon::new("a", "strongswan-libipsec.conf");
    let sock = charon.socket();
    rt().block_on(async {
        // the sidecar starts first: the socket does not exist yet
        let connecting = tokio::spawn(async move { Client::connect(&sock, &opts()).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!connecting.is_finished(), "connect must wait for charon");
        let t0 = Instant::now();
        charon.start();
        let client = connecting.await.unwrap().unwrap_or_else(|e| panic!("{e}\ncharon log:\n{}", charon.log()));
        eprintln!("charon start -> VICI client connected: {:?}", t0.elapsed());
        assert_eq!(client.daemon().unwrap().daemon, "charon-systemd");

        let t = Instant::now();
        client.call(&shared("host-a", "host-b")).await.unwrap();
        assert_eq!(client.call(&GetShared).await.unwrap(), vec!["ipsec-mesh-psk"]);
        let c = conn(A, B, true);
        client.call(&LoadConn(c.clone())).await.unwrap();
        eprintln!("load-shared + get-shared + load-conn: {:?}", t.elapsed());

        assert_eq!(client.call(&GetConns).await.unwrap(), vec![c.name.clone()]);
        let listed = client.list(&ListConns::default()).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let l = &listed[0];
        assert_eq!(l.name, c.name);
        assert_eq!((l.local_addrs.clone(), l.remote_addrs.clone()), (c.local_addrs.clone(), c.remote_addrs.clone()));
        assert_eq!((l.local_ids.clone(), l.remote_ids.clone()), (vec!["host-a".to_string()], vec!["host-b".to_string()]));
        assert_eq!(l.children.len(), 1);
        assert_eq!(l.children[0].name, c.name);
        assert_eq!(l.children[0].local_ts, vec![A.2]);
        assert_eq!(l.children[0].remote_ts, vec![B.2]);
        let only = client.list(&ListConns { ike: Some(c.name.clone()) }).await.unwrap();
        assert_eq!(only.len(), 1);
        assert!(client.list(&ListSas::default()).await.unwrap().is_empty());

        // errors surface as clear errors, and the connection stays usable
        let e = client.call(&Initiate::child("no-such-child", 5000)).await.unwrap_err();
        assert!(matches!(e, ViciError::CommandFailed { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "charon refused `initiate` (child=no-such-child): CHILD_SA config 'no-such-child' not found"
        );
        let mut bad = conn(A, B, true);
        bad.proposals = vec!["bogus-alg-modp9999".into()];
        let e = client.call(&LoadConn(bad)).await.unwrap_err();
        assert!(e.to_string().contains("invalid value for: proposals"), "{e}");
        let e = client.request("no-such-command", Default::default()).await.unwrap_err();
        assert!(matches!(e, ViciError::UnknownCommand { .. }), "{e}");
        assert!(matches!(client.subscribe(&["no-such-event"]).await, Err(ViciError::UnknownEvent { .. })));
        // the failed load-conn did not replace the good conn
        assert_eq!(client.call(&GetConns).await.unwrap(), vec![c.name.clone()]);

        client.call(&UnloadConn { name: c.name.clone() }).await.unwrap();
        assert!(client.call(&GetConns).await.unwrap().is_empty());
        assert!(client.list(&ListConns::default()).await.unwrap().is_empty());
        let e = client.call(&UnloadConn { name: c.name.clone() }).await.unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        client.call(&UnloadShared { id: "ipsec-mesh-psk".into() }).await.unwrap();
        assert!(client.call(&GetShared).await.unwrap().is_empty());
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn reconnects_after_charon_is_killed() {
    require_root!();
    let mut charon = Charon::new("k", "strongswan-libipsec.conf");
    let sock = charon.socket();
    charon.start();
    rt().block_on(async {
        let client = Client::connect(&sock, &opts()).await.unwrap();
        let mut events = client.subscribe(&["ike-updown"]).await.unwrap();
        charon.kill9();
        let e = client.call(&GetConns).await.unwrap_err();
        assert!(e.is_connection_lost(), "{e}");
        assert!(
            events.next().await.is_none(),
            "event stream ends when charon dies"
        );
        assert!(sock.exists(), "SIGKILL leaves the socket file behind");

        // the stale socket refuses; connect keeps trying until charon is back
        let s2 = sock.clone();
        let connecting = tokio::spawn(async move { Client::connect(&s2, &opts()).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!connecting.is_finished(), "stale socket must be retried");
        std::fs::remove_file(&sock).unwrap();
        let t = Instant::now();
        charon.start();
        let client = connecting.await.unwrap().unwrap();
        eprintln!("restart -> reconnected: {:?}", t.elapsed());
        assert!(
            client.call(&GetConns).await.unwrap().is_empty(),
            "a restarted charon has forgotten every conn"
        );
    });
}

#[test]
#[ignore = "needs root: integration/run.sh runs it as root (--include-ignored)"]
fn initiates_a_tunnel_between_two_namespaces_with_libipsec() {
    require_root!();
    let mut a = Charon::new("ta", "strongswan-libipsec.conf");
    let mut b = Charon::new("tb", "strongswan-libipsec.conf");
    let veth_a = format!("va{}", std::process::id());
    let veth_b = format!("vb{}", std::process::id());
    ip(&[
        "link", "add", "name", &veth_a, "netns", &a.ns, "type", "veth", "peer", "name", &veth_b,
        "netns", &b.ns,
    ]);
    ip(&[
        "-n",
        &a.ns,
        "addr",
        "add",
        "192.168.77.1/24",
        "dev",
        &veth_a,
    ]);
    ip(&[
        "-n",
        &b.ns,
        "addr",
        "add",
        "192.168.77.2/24",
        "dev",
        &veth_b,
    ]);
    ip(&["-n", &a.ns, "link", "set", &veth_a, "up"]);
    ip(&["-n", &b.ns, "link", "set", &veth_b, "up"]);
    // each host holds an address in its own subnet (the container bridge's gateway in
    // production): without one, libipsec cannot install the route for the child
    // ("error installing route with policy ... unable to install IPsec policies")
    ip(&["-n", &a.ns, "addr", "add", "10.42.1.1/24", "dev", "lo"]);
    ip(&["-n", &b.ns, "addr", "add", "10.42.2.1/24", "dev", "lo"]);
    a.start();
    b.start();
    let (sa, sb) = (a.socket(), b.socket());
    rt().block_on(async {
        let ca = Client::connect(&sa, &opts()).await.unwrap();
        let cb = Client::connect(&sb, &opts()).await.unwrap();
        ca.call(&shared("host-a", "host-b")).await.unwrap();
        cb.call(&shared("host-b", "host-a")).await.unwrap();
        ca.call(&LoadConn(conn(A, B, true))).await.unwrap();
        cb.call(&LoadConn(conn(B, A, false))).await.unwrap();
        let mut events = ca.subscribe(&SaEvent::NAMES).await.unwrap();

        let t = Instant::now();
        ca.call(&Initiate::child("ipsec-mesh-host-b", 10_000))
            .await
            .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
        eprintln!("initiate (IKE + CHILD, libipsec): {:?}", t.elapsed());

        let mut child_up = false;
        while !child_up {
            let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .unwrap()
                .unwrap();
            if let Some(SaEvent::ChildUpdown { up: true, sa }) = SaEvent::parse(&ev).unwrap() {
                assert_eq!(sa.child_sas[0].name, "ipsec-mesh-host-b");
                child_up = true;
            }
        }
        let sas = ca.list(&ListSas::default()).await.unwrap();
        assert_eq!(sas.len(), 1);
        assert_eq!(sas[0].state, "ESTABLISHED");
        let child = &sas[0].child_sas[0];
        assert_eq!(
            (child.state.as_str(), child.encap),
            ("INSTALLED", true),
            "{child:?}"
        );
        // the responder does not rekey (rekey_time = 0): only one side of the pair does
        let bsas = cb.list(&ListSas::default()).await.unwrap();
        assert_eq!(bsas[0].rekey_time, None, "{:?}", bsas[0]);
        assert!(sas[0].rekey_time.is_some());
        // traffic between the two subnets goes through the tunnel
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &a.ns,
                "ping",
                "-c1",
                "-W2",
                "-I",
                "10.42.1.1",
                "10.42.2.1",
            ])
            .output()
            .expect("ping (iputils-ping)");
        assert!(
            ping.status.success(),
            "{}",
            String::from_utf8_lossy(&ping.stdout)
        );
        let sas = ca.list(&ListSas::default()).await.unwrap();
        assert!(
            sas[0].child_sas[0].packets_out >= 1 && sas[0].child_sas[0].packets_in >= 1,
            "{:?}",
            sas[0]
        );

        let done = ca
            .call(&Terminate {
                ike: Some("ipsec-mesh-host-b".into()),
                timeout_ms: Some(5000),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(done.terminated, 1);
        assert!(ca.list(&ListSas::default()).await.unwrap().is_empty());
    });
}
