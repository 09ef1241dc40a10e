//! The rancher-metadata source against an in-test HTTP/1.1 server that serves recorded answers
//! (tests/fixtures/rancher/*.json, in the real API's format) and implements the long-poll
//! `GET /version?wait=true&value=<v>&maxWait=<s>`.
//!
//! Real rancher-metadata behaviour it copies: `/version` is a UUID; answers come as
//! `text/plain` (JSON inside, because the client asks `Accept: application/json`);
//! `/self/host` can be `200 null` or 404; `"links": null` and `hostname: null` in generated
//! environments, with random /32 addressing ([`rancher_environment`]). Not copied yet: the
//! 5 s re-check tick of held long-polls, the re-ordering of answers on reload, sidekicks with
//! `primary_ip: null`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipsec_mesh::metadata::rancher::RancherSource;
use ipsec_mesh::metadata::{self, json, MetadataError, MetadataSource};
use ipsec_mesh::model::{Backend, Invalid};
use serde_json::Value;

const PREFIX: &str = "/2015-12-19";
/// The first `/version`: like the real server's, a UUID (it changes on every reload).
const V0: &str = "6c1f0b0e-8a43-4d8e-9a1f-3b2d7e5c9a10";
const HOST1: &str = "0f8d6c3e-5b0a-4c1e-9a53-2f1b7e4d9a01";
const HOST2: &str = "b3a4c1d2-7e8f-4a6b-9c0d-1e2f3a4b5c02";
const HOST3: &str = "c7e8f9a0-1b2c-4d3e-8f4a-5b6c7d8e9f03";

// ------------------------------------------------------------------------------------------
// The fake metadata service.
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Reply {
    Answer {
        status: u16,
        body: String,
    },
    /// Read the request, never answer.
    Hang,
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    accept: Option<String>,
}

struct State {
    version: String,
    answers: HashMap<String, Reply>,
    seen: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

struct FakeMetadata {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rancher")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).unwrap()
}

impl FakeMetadata {
    fn start() -> FakeMetadata {
        let mut answers = HashMap::new();
        for (path, file) in [
            ("/self/host", "self_host.json"),
            ("/hosts", "hosts.json"),
            ("/containers", "containers.json"),
            ("/networks", "networks.json"),
        ] {
            answers.insert(
                path.to_string(),
                Reply::Answer {
                    status: 200,
                    body: fixture(file),
                },
            );
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                version: V0.to_string(),
                answers,
                seen: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || serve(conn, &s));
            }
        });
        FakeMetadata { addr, shared }
    }

    fn base(&self) -> String {
        format!("http://{}{PREFIX}", self.addr)
    }

    fn source(&self) -> RancherSource {
        RancherSource::new(&self.base()).unwrap()
    }

    fn set(&self, path: &str, reply: Reply) {
        let mut st = self.shared.state.lock().unwrap();
        st.answers.insert(path.to_string(), reply);
    }

    fn set_json(&self, path: &str, v: &Value) {
        self.set(
            path,
            Reply::Answer {
                status: 200,
                body: serde_json::to_string_pretty(v).unwrap(),
            },
        );
    }

    /// Change the answers and the version together, waking held long-polls.
    fn change(&self, version: &str, f: impl FnOnce(&mut HashMap<String, Reply>)) {
        let mut st = self.shared.state.lock().unwrap();
        f(&mut st.answers);
        st.version = version.to_string();
        self.shared.changed.notify_all();
    }

    fn seen(&self) -> Vec<Seen> {
        self.shared.state.lock().unwrap().seen.clone()
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(conn: TcpStream, s: &Shared) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut accept = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("accept") {
                accept = Some(v.trim().to_string());
            }
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    s.state.lock().unwrap().seen.push(Seen {
        target: target.clone(),
        accept,
    });

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let reply = match path.strip_prefix(PREFIX) {
        Some("/version") => {
            let params: HashMap<&str, String> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, percent_decode(v)))
                .collect();
            let mut st = s.state.lock().unwrap();
            if params.get("wait").map(String::as_str) == Some("true") {
                let value = params.get("value").cloned().unwrap_or_default();
                let max_wait: u64 = params
                    .get("maxWait")
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(5);
                let deadline = Instant::now() + Duration::from_secs(max_wait);
                while st.version == value && !s.stop.load(Ordering::SeqCst) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    st = s.changed.wait_timeout(st, left).unwrap().0;
                }
            }
            Reply::Answer {
                status: 200,
                body: serde_json::to_string(&st.version).unwrap(),
            }
        }
        Some(p) => s
            .state
            .lock()
            .unwrap()
            .answers
            .get(p)
            .cloned()
            .unwrap_or(Reply::Answer {
                status: 404,
                body: "{\"code\":\"Not Found\"}".into(),
            }),
        None => Reply::Answer {
            status: 404,
            body: "Not Found".into(),
        },
    };
    match reply {
        Reply::Hang => {
            while !s.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(50));
            }
        }
        Reply::Answer { status, body } => {
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                500 => "Internal Server Error",
                _ => "Other",
            };
            let mut conn = conn;
            let _ = write!(
                conn,
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.flush();
        }
    }
}

fn container_named<'a>(containers: &'a mut Value, name: &str) -> &'a mut Value {
    containers
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in the fixture"))
}

fn subnets_of(snap: &metadata::Snapshot, id: &str) -> Vec<String> {
    snap.cluster
        .host(id)
        .unwrap_or_else(|| panic!("no host {id}"))
        .subnets
        .iter()
        .map(|s| s.to_string())
        .collect()
}

// ------------------------------------------------------------------------------------------
// Tests.
// ------------------------------------------------------------------------------------------

#[test]
fn load_maps_hosts_network_and_aggregated_subnets() {
    let server = FakeMetadata::start();
    let mut src = server.source();
    assert_eq!(src.origin(), server.base());
    let snap = src.load().unwrap();

    assert_eq!(snap.version, V0);
    assert_eq!(snap.self_id.as_ref().unwrap().as_str(), HOST1);
    let net = &snap.cluster.network;
    assert_eq!(net.cidr.to_string(), "10.42.0.0/16");
    assert_eq!(net.backend, Backend::Ipsec);
    assert_eq!(net.mtu, 1460, "mtu comes from the network's cniConfig");

    assert_eq!(snap.cluster.hosts.len(), 3);
    let h1 = snap.cluster.host(HOST1).unwrap();
    assert_eq!(h1.agent_ip.to_string(), "192.168.77.11");
    assert_eq!(h1.name.as_deref(), Some("rancher-node-1"));
    assert_eq!(h1.labels.get("zone").map(String::as_str), Some("a"));
    // 10.42.1.4 (ipsec agent) + .5 .6 .7 (users) -> one /30; .9 (healthcheck, a system
    // container) stays a /32. Not counted: .8 (stopped), the router sidekick (network from
    // the agent), the cni-driver (host network), shop-web-3 (starting, no primary_ip yet).
    assert_eq!(subnets_of(&snap, HOST1), ["10.42.1.4/30", "10.42.1.9/32"]);
    // .10 (agent) + .11 (starting) -> /31; 172.17.0.2 is on the bridge network.
    assert_eq!(
        subnets_of(&snap, HOST2),
        ["10.42.2.10/31", "10.42.200.3/32"]
    );
    // The stopped 10.42.3.3 is not counted.
    assert_eq!(subnets_of(&snap, HOST3), ["10.42.3.2/32"]);

    // The version was read first, and every request asked for JSON.
    let seen = server.seen();
    assert_eq!(seen[0].target, format!("{PREFIX}/version"));
    for path in ["/self/host", "/hosts", "/containers", "/networks"] {
        assert!(
            seen.iter().any(|s| s.target == format!("{PREFIX}{path}")),
            "{path} not requested: {seen:?}"
        );
    }
    assert!(
        seen.iter()
            .all(|s| s.accept.as_deref() == Some("application/json")),
        "{seen:?}"
    );
}

#[test]
fn open_picks_the_rancher_source_for_http_urls() {
    let server = FakeMetadata::start();
    let mut src = metadata::open(&server.base()).unwrap();
    let snap = src.load().unwrap();
    assert_eq!(snap.self_id.unwrap().as_str(), HOST1);
}

#[test]
fn long_poll_returns_the_new_version_promptly_after_a_change() {
    let server = FakeMetadata::start();
    let mut src = server.source();
    let snap = src.load().unwrap();

    let version = snap.version.clone();
    let waiter = thread::spawn(move || {
        let started = Instant::now();
        let r = src.wait_for_change(&version, Duration::from_secs(20));
        (r, started.elapsed(), src)
    });
    // Let the request reach the server and be held there.
    let t0 = Instant::now();
    while !server.seen().iter().any(|s| s.target.contains("wait=true")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no long-poll seen");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "the long-poll returned before any change"
    );

    // host3's agent goes away, a new container starts on host1.
    let mut containers = fixture_json("containers.json");
    containers
        .as_array_mut()
        .unwrap()
        .retain(|c| c["host_uuid"] != HOST3);
    let batch = container_named(&mut containers, "nightly-batch-1");
    batch["state"] = "running".into();
    server.change("32", |answers| {
        answers.insert(
            "/containers".into(),
            Reply::Answer {
                status: 200,
                body: containers.to_string(),
            },
        );
    });

    let (r, elapsed, mut src) = waiter.join().unwrap();
    assert_eq!(r.unwrap(), Some("32".to_string()));
    assert!(
        elapsed < Duration::from_secs(20),
        "returned at maxWait, not on the change"
    );
    let wait = server
        .seen()
        .into_iter()
        .find(|s| s.target.contains("wait=true"))
        .unwrap();
    assert_eq!(
        wait.target,
        format!("{PREFIX}/version?wait=true&value={V0}&maxWait=20")
    );

    let snap = src.load().unwrap();
    assert_eq!(snap.version, "32");
    assert_eq!(
        subnets_of(&snap, HOST1),
        ["10.42.1.4/30", "10.42.1.8/31"],
        "10.42.1.8 and .9 now aggregate"
    );
    assert!(
        subnets_of(&snap, HOST3).is_empty(),
        "a host without containers has no subnets"
    );
}

#[test]
fn long_poll_returns_none_after_max_wait_without_a_change() {
    let server = FakeMetadata::start();
    let mut src = server.source();
    let started = Instant::now();
    let r = src
        .wait_for_change(V0, Duration::from_millis(1000))
        .unwrap();
    assert_eq!(r, None);
    // The server held the request for maxWait (1s) before answering the same version.
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn long_poll_with_a_stale_version_returns_at_once_and_encodes_the_value() {
    let server = FakeMetadata::start();
    let mut src = server.source();
    let r = src
        .wait_for_change("30 old&x", Duration::from_secs(30))
        .unwrap();
    assert_eq!(r, Some(V0.to_string()));
    let seen = server.seen();
    assert_eq!(
        seen[0].target,
        format!("{PREFIX}/version?wait=true&value=30%20old%26x&maxWait=30")
    );
}

#[test]
fn server_down_is_a_clear_http_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let base = format!("http://{addr}{PREFIX}");
    let mut src = RancherSource::new(&base).unwrap();
    let e = src.load().unwrap_err();
    match &e {
        MetadataError::Http { url, message } => {
            assert_eq!(url, &format!("{base}/version"));
            assert!(message.contains("cannot connect"), "{e}");
        }
        other => panic!("expected Http, got {other:?}"),
    }
    let e = src.wait_for_change(V0, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, MetadataError::Http { .. }), "{e}");
    assert!(e.to_string().contains("/version?wait=true"), "{e}");
}

#[test]
fn http_500_names_url_and_status() {
    let server = FakeMetadata::start();
    server.set(
        "/networks",
        Reply::Answer {
            status: 500,
            body: "{\"message\": \"metadata store not ready\"}".into(),
        },
    );
    let e = server.source().load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Http { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}/networks: ", server.base())),
        "{msg}"
    );
    assert!(msg.contains("500"), "{msg}");
    assert!(msg.contains("metadata store not ready"), "{msg}");
}

/// The parse error of a load, with its origin checked to be `{base}{path}`.
fn parse_error(server: &FakeMetadata, path: &str) -> (String, json::JsonError) {
    let e = server.source().load().unwrap_err();
    let msg = e.to_string();
    match e {
        MetadataError::Parse { origin, error } => {
            assert_eq!(origin, format!("{}{path}", server.base()), "{msg}");
            (msg, error)
        }
        other => panic!("expected Parse, got {other:?}"),
    }
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the answer"))
        + 1
}

#[test]
fn garbled_json_is_a_parse_error_with_path_and_position() {
    let server = FakeMetadata::start();
    let body = fixture("hosts.json").replacen("\"agent_ip\":", "\"agent_ip\" ", 1);
    server.set("/hosts", Reply::Answer { status: 200, body });
    let (msg, error) = parse_error(&server, "/hosts");
    // The colon after the first host's first key is missing: the error is in hosts[0].
    assert_eq!(error.path, "[0]", "{msg}");
    assert_eq!(error.line, 3, "{msg}");
    assert!(error.column > 1, "{msg}");
    assert!(error.message.contains("expected `:`"), "{msg}");
    assert_eq!(
        msg,
        format!(
            "{}/hosts: [0]: expected `:` (line 3, column {})",
            server.base(),
            error.column
        )
    );
}

#[test]
fn missing_required_field_names_the_host() {
    let server = FakeMetadata::start();
    let mut hosts = fixture_json("hosts.json");
    hosts[1].as_object_mut().unwrap().remove("agent_ip");
    server.set_json("/hosts", &hosts);
    let (msg, error) = parse_error(&server, "/hosts");
    assert_eq!(error.path, "[1]", "{msg}");
    assert_eq!(error.message, "missing field `agent_ip`", "{msg}");
    assert!(
        msg.contains("/hosts: [1]: missing field `agent_ip` (line "),
        "{msg}"
    );
}

#[test]
fn a_bad_field_in_an_answer_names_url_json_path_and_position() {
    // /hosts: a number where the agent_ip string belongs, in the third host.
    let server = FakeMetadata::start();
    let mut hosts = fixture_json("hosts.json");
    hosts[2]["agent_ip"] = 1921687713.into();
    let body = serde_json::to_string_pretty(&hosts).unwrap();
    server.set_json("/hosts", &hosts);
    let (msg, error) = parse_error(&server, "/hosts");
    let line = line_of(&body, "1921687713");
    // Answers are decoded as they arrive: the reader has taken the character after the
    // number (the comma) when it sees the number is of the wrong type.
    let column = body
        .lines()
        .nth(line - 1)
        .unwrap()
        .trim_end_matches(',')
        .len()
        + 1;
    assert_eq!(
        msg,
        format!(
            "{}/hosts: [2].agent_ip: invalid type: integer `1921687713`, expected a string \
             (line {line}, column {column})",
            server.base()
        )
    );
    assert_eq!((error.line, error.column), (line, column));

    // /containers: a label value that is not a string (its key is quoted in the path).
    let server = FakeMetadata::start();
    let mut containers = fixture_json("containers.json");
    let index = containers
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["name"] == "shop-db-1")
        .unwrap();
    containers[index]["labels"]["io.rancher.stack.name"] = true.into();
    server.set_json("/containers", &containers);
    let (msg, error) = parse_error(&server, "/containers");
    assert_eq!(
        error.path,
        format!("[{index}].labels[\"io.rancher.stack.name\"]"),
        "{msg}"
    );
    assert!(
        error.message.starts_with("invalid type: boolean `true`"),
        "{msg}"
    );

    // /self/host: the document itself is an object, so the path is the field.
    let server = FakeMetadata::start();
    let mut me = fixture_json("self_host.json");
    me["uuid"] = serde_json::json!([HOST1]);
    server.set_json("/self/host", &me);
    let (msg, error) = parse_error(&server, "/self/host");
    assert_eq!(error.path, "uuid", "{msg}");

    // /networks: a wrong type; and an answer that is not a list at all.
    let server = FakeMetadata::start();
    let mut networks = fixture_json("networks.json");
    networks[1]["is_default"] = "yes".into();
    server.set_json("/networks", &networks);
    let (msg, error) = parse_error(&server, "/networks");
    assert_eq!(error.path, "[1].is_default", "{msg}");
    server.set_json("/networks", &serde_json::json!({ "uuid": "x" }));
    let (msg, error) = parse_error(&server, "/networks");
    assert_eq!(error.path, "", "{msg}");
    assert!(
        msg.contains("/networks: invalid type: map, expected a sequence (line 1, "),
        "{msg}"
    );
}

#[test]
fn a_bad_mtu_in_the_managed_networks_cni_config_names_its_path() {
    let server = FakeMetadata::start();
    let mut networks = fixture_json("networks.json");
    let index = networks
        .as_array()
        .unwrap()
        .iter()
        .position(|n| n["name"] == "ipsec")
        .unwrap();
    let uuid = networks[index]["uuid"].as_str().unwrap().to_string();
    let files = networks[index]["metadata"]["cniConfig"]
        .as_object_mut()
        .unwrap();
    let file = files.keys().next().unwrap().clone();
    files[&file]["mtu"] = "big".into();
    server.set_json("/networks", &networks);
    let e = server.source().load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert_eq!(
        msg,
        format!(
            "{}/networks: [{index}] (uuid {uuid:?}).metadata.cniConfig[{file:?}].mtu: \"big\" \
             is not an MTU (a whole number of bytes)",
            server.base()
        )
    );
}

#[test]
fn duplicate_agent_ip_is_a_validation_error() {
    let server = FakeMetadata::start();
    let mut hosts = fixture_json("hosts.json");
    hosts[2]["agent_ip"] = hosts[0]["agent_ip"].clone();
    server.set_json("/hosts", &hosts);
    let e = server.source().load().unwrap_err();
    match &e {
        MetadataError::Invalid { origin, error } => {
            assert_eq!(origin, &server.base());
            assert!(
                matches!(error.what, Invalid::DuplicateAgentIp { .. }),
                "{e}"
            );
            assert!(error.location.to_string().contains(HOST3), "{e}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn unparsable_primary_ip_names_the_container() {
    let server = FakeMetadata::start();
    let mut containers = fixture_json("containers.json");
    let c = container_named(&mut containers, "shop-db-1");
    c["primary_ip"] = "10.42.1.777".into();
    let uuid = c["uuid"].as_str().unwrap().to_string();
    server.set_json("/containers", &containers);
    let e = server.source().load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!("{}/containers: ", server.base())),
        "{msg}"
    );
    let index = containers
        .as_array()
        .unwrap()
        .iter()
        .position(|c| c["uuid"] == uuid.as_str())
        .unwrap();
    assert_eq!(
        msg,
        format!(
            "{}/containers: [{index}] (uuid {uuid:?}, name \"shop-db-1\").primary_ip: \
             \"10.42.1.777\" is not an IP address",
            server.base()
        )
    );
}

#[test]
fn managed_network_missing_from_the_network_list_is_a_clear_error() {
    let server = FakeMetadata::start();
    let mut networks = fixture_json("networks.json");
    networks
        .as_array_mut()
        .unwrap()
        .retain(|n| n["name"] != "ipsec");
    server.set_json("/networks", &networks);
    let e = server.source().load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Rancher { .. }), "{msg}");
    assert!(msg.contains("/networks: "), "{msg}");
    assert!(msg.contains("not in the network list"), "{msg}");
}

#[test]
fn a_hung_request_times_out() {
    let server = FakeMetadata::start();
    server.set("/containers", Reply::Hang);
    let mut src = server
        .source()
        .with_request_timeout(Duration::from_millis(300));
    let e = src.load().unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, MetadataError::Http { .. }), "{msg}");
    assert!(msg.contains("/containers: "), "{msg}");
    assert!(msg.contains("no complete answer within 0.3s"), "{msg}");
}

#[test]
fn a_null_or_404_self_host_is_a_clear_error_and_host_makes_it_unneeded() {
    let server = FakeMetadata::start();
    for (status, body, needle) in [
        (
            200,
            "null",
            "null: rancher-metadata knows this container but not its host",
        ),
        (
            404,
            "Not found",
            "HTTP status 404 Not Found: rancher-metadata does not know",
        ),
    ] {
        server.set(
            "/self/host",
            Reply::Answer {
                status,
                body: body.into(),
            },
        );
        let e = server.source().load().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert!(e.contains("pass --host") && e.contains("/self/host"), "{e}");
        // With --host the answer is never asked for, and the snapshot is complete.
        let before = server.seen().len();
        let mut src = server.source();
        src.set_self_host(HOST2);
        let snap = src.load().unwrap();
        assert_eq!(snap.self_id.as_ref().unwrap().as_str(), HOST2);
        assert_eq!(snap.cluster.hosts.len(), 3);
        assert!(
            server.seen()[before..]
                .iter()
                .all(|s| s.target != format!("{PREFIX}/self/host")),
            "/self/host asked for despite --host"
        );
    }
    let mut src = server.source();
    src.set_self_host("no-such-uuid");
    let e = src.load().unwrap_err().to_string();
    assert!(
        e.contains("--host \"no-such-uuid\" is not the uuid of a listed host"),
        "{e}"
    );
    // The same through the CLI: `plan --host` works while /self/host answers null.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ipsec-mesh"))
        .args(["plan", "--metadata", &server.base(), "--host", HOST1])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn stopping_containers_still_count_as_rancher_does() {
    let server = FakeMetadata::start();
    let mut containers = fixture_json("containers.json");
    // plugin-manager's IsContainerConsideredRunning: running, starting, stopping.
    container_named(&mut containers, "nightly-batch-1")["state"] = "stopping".into();
    server.set_json("/containers", &containers);
    let snap = server.source().load().unwrap();
    assert_eq!(subnets_of(&snap, HOST1), ["10.42.1.4/30", "10.42.1.8/31"]);
    container_named(&mut containers, "nightly-batch-1")["state"] = "stopped".into();
    server.set_json("/containers", &containers);
    let snap = server.source().load().unwrap();
    assert_eq!(subnets_of(&snap, HOST1), ["10.42.1.4/30", "10.42.1.9/32"]);
}

/// Add `hosts` hosts with `per_host` containers each to the fixture's answers, Rancher-shaped:
/// every container a /32 drawn at random (fixed seed, no duplicates) from the managed
/// network's 10.42.0.0/16, `"links": null`, `hostname: null`, states spread as a live
/// environment has them. Returns the sizes of the `/hosts` and `/containers` bodies.
fn rancher_environment(server: &FakeMetadata, hosts: usize, per_host: usize) -> (usize, usize) {
    let mut hs = fixture_json("hosts.json");
    let mut cs = fixture_json("containers.json");
    let host_t = hs[1].clone();
    let cont_t = container_named(&mut cs, "shop-web-1").clone();
    let mut used: std::collections::HashSet<u32> = cs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["primary_ip"].as_str()?.parse::<std::net::Ipv4Addr>().ok())
        .map(u32::from)
        .collect();
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    let states = [
        "running", "running", "running", "starting", "stopping", "stopped",
    ];
    for i in 0..hosts {
        let uuid = format!("{i:08x}-0000-4000-8000-000000000000");
        let mut h = host_t.clone();
        h["uuid"] = uuid.clone().into();
        h["name"] = format!("gen-{i}").into();
        h["host_id"] = (100 + i).into();
        h["agent_ip"] = format!("172.20.{}.{}", i / 250, i % 250 + 1).into();
        hs.as_array_mut().unwrap().push(h);
        for j in 0..per_host {
            let ip = loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let a = 0x0a2a_0000 | (x as u32 & 0xffff);
                if a & 0xff != 0 && a & 0xff != 0xff && used.insert(a) {
                    break std::net::Ipv4Addr::from(a);
                }
            };
            let mut c = cont_t.clone();
            c["uuid"] = format!("{i:08x}-{j:04x}-4000-8000-c0ffee000000").into();
            c["name"] = format!("gen-{i}-{j}").into();
            c["host_uuid"] = uuid.clone().into();
            c["primary_ip"] = ip.to_string().into();
            c["ips"] = serde_json::json!([ip.to_string()]);
            c["links"] = Value::Null;
            c["hostname"] = Value::Null;
            c["state"] = states[(x % states.len() as u64) as usize].into();
            cs.as_array_mut().unwrap().push(c);
        }
    }
    let (hb, cb) = (
        serde_json::to_string(&hs).unwrap(),
        serde_json::to_string(&cs).unwrap(),
    );
    let sizes = (hb.len(), cb.len());
    server.set(
        "/hosts",
        Reply::Answer {
            status: 200,
            body: hb,
        },
    );
    server.set(
        "/containers",
        Reply::Answer {
            status: 200,
            body: cb,
        },
    );
    sizes
}

#[test]
fn a_6000_host_environment_is_decoded_as_it_arrives_and_the_limit_is_a_setting() {
    let server = FakeMetadata::start();
    let (hosts_len, containers_len) = rancher_environment(&server, 6_000, 10);
    assert!(
        containers_len > 64 << 20,
        "the answer ({containers_len} bytes) is above the old fixed 64 MiB limit"
    );
    let t = Instant::now();
    let snap = server.source().load().unwrap();
    eprintln!(
        "6,000 hosts x 10 containers: /hosts {:.1} MB, /containers {:.1} MB, loaded in {:.2} s",
        hosts_len as f64 / 1e6,
        containers_len as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(snap.cluster.hosts.len(), 6_003);
    // Random /32s: a generated host's live containers barely aggregate.
    let h = snap
        .cluster
        .host("00000007-0000-4000-8000-000000000000")
        .unwrap();
    assert!(h.subnets.len() >= 5, "{:?}", h.subnets);
    assert!(h
        .subnets
        .iter()
        .all(|s| s.to_string().starts_with("10.42.")));
    // Planning the whole mesh for the self host works.
    let p = ipsec_mesh::plan::plan(
        &snap.cluster,
        HOST1,
        &ipsec_mesh::plan::PlanOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(p.peers.len(), 6_002);

    // Below the answer's size: a clear error naming the setting, no partial state.
    let mut src = server.source();
    src.set_body_limit(16 << 20);
    let e = src.load().unwrap_err().to_string();
    assert!(
        e.contains("/containers") && e.contains("larger than 16 MiB (--metadata-max-mb)"),
        "{e}"
    );
}
