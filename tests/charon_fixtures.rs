//! Every VICI fixture in vici-fixtures/sessions (real charon 5.9.8 byte streams, captured
//! by vici-fixtures/capture.sh) through the codec, then each session replayed through the
//! real client against a fake charon that checks the client's bytes are exactly those
//! of the recorded session and answers with exactly the recorded bytes.

use std::path::PathBuf;
use std::time::Duration;

use ipsec_mesh::dataplane::charon::wire::{decode_stream, encode_packet};
use ipsec_mesh::dataplane::charon::{
    AuthConfig, ChildConfig, Client, ConnConfig, GetConns, GetShared, Initiate, ListConns, ListSas,
    LoadConn, LoadShared, Packet, Rekey, SaAction, SaEvent, SharedKeyType, StartAction, Stats,
    Terminate, Unique, UnloadConn, UnloadShared, Version, ViciError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn sessions_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vici-fixtures/sessions")
}

fn read(session: &str, dir: &str) -> Vec<u8> {
    let p = sessions_dir().join(format!("{session}.{dir}.bin"));
    std::fs::read(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (regenerate with vici-fixtures/capture.sh)",
            p.display()
        )
    })
}

fn packets(session: &str, dir: &str) -> Vec<Packet> {
    decode_stream(&read(session, dir)).unwrap_or_else(|e| panic!("{session}.{dir}: {e}"))
}

fn all_sessions() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sessions_dir())
        .expect("vici-fixtures/sessions")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".c2s.bin")
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

// What vici-fixtures/vici_client.py sends (same keys, same order).
const PSK: &str = "fixture-psk-not-secret-0123456789";
const NAME: &str = "ipsec-mesh-host-b";

fn fixture_conn(proposal: &str) -> ConnConfig {
    let mut c = ConnConfig::ikev2(NAME, AuthConfig::psk("host-a"), AuthConfig::psk("host-b"));
    c.local_addrs = vec!["192.168.77.1".into()];
    c.remote_addrs = vec!["192.168.77.2".into()];
    c.proposals = vec![proposal.into()];
    c.encap = false;
    c.mobike = false;
    c.unique = Some(Unique::Replace);
    c.dpd_delay = Some(30);
    c.rekey_time = Some(14400);
    let mut ch = ChildConfig::tunnel(
        NAME,
        vec!["10.42.1.0/24".into()],
        vec!["10.42.2.0/24".into()],
    );
    ch.esp_proposals = vec!["aes256gcm16".into()];
    ch.rekey_time = Some(3600);
    ch.start_action = StartAction::None;
    ch.dpd_action = SaAction::Restart;
    ch.close_action = SaAction::None;
    c.children = vec![ch];
    c
}

fn fixture_shared() -> LoadShared {
    LoadShared {
        id: "ipsec-mesh-psk".into(),
        kind: SharedKeyType::Ike,
        data: PSK.as_bytes().to_vec().into(),
        owners: vec!["host-a".into(), "host-b".into()],
    }
}

fn is_answer(p: &Packet) -> bool {
    matches!(
        p,
        Packet::CmdResponse(_) | Packet::CmdUnknown | Packet::EventConfirm | Packet::EventUnknown
    )
}

fn is_list_event(p: &Packet) -> bool {
    matches!(p, Packet::Event { name, .. } if name.starts_with("list-"))
}

// ---------------------------------------------------------------------------------------
// codec over every file

#[test]
fn every_fixture_decodes_and_reencodes_byte_for_byte() {
    let sessions = all_sessions();
    assert!(
        sessions.len() >= 21,
        "expected the full capture, found {sessions:?}"
    );
    for s in &sessions {
        for dir in ["c2s", "s2c"] {
            let raw = read(s, dir);
            let pkts = packets(s, dir);
            assert!(!pkts.is_empty(), "{s}.{dir}: no packets");
            let again: Vec<u8> = pkts
                .iter()
                .flat_map(|p| encode_packet(p).unwrap())
                .collect();
            assert_eq!(
                again, raw,
                "{s}.{dir}: re-encoding differs from the capture"
            );
            for p in &pkts {
                let client_side = matches!(
                    p,
                    Packet::CmdRequest { .. }
                        | Packet::EventRegister(_)
                        | Packet::EventUnregister(_)
                );
                assert_eq!(
                    client_side,
                    dir == "c2s",
                    "{s}.{dir}: {:?} in the wrong direction",
                    p.packet_type()
                );
            }
        }
        // one answer per request
        let requests = packets(s, "c2s").len();
        let answers = packets(s, "s2c").iter().filter(|p| is_answer(p)).count();
        assert_eq!(requests, answers, "{s}: requests vs answers");
    }
}

#[test]
fn fixtures_cover_the_cases_the_driver_must_handle() {
    let mut seen = std::collections::BTreeSet::new();
    let mut response_before_event = false;
    for s in all_sessions() {
        let s2c = packets(&s, "s2c");
        for (i, p) in s2c.iter().enumerate() {
            match p {
                Packet::CmdUnknown => drop(seen.insert("CMD_UNKNOWN".to_string())),
                Packet::EventUnknown => drop(seen.insert("EVENT_UNKNOWN".to_string())),
                Packet::CmdResponse(m) if m.str("success") == Some("no") => {
                    assert!(
                        m.str("errmsg").is_some_and(|e| !e.is_empty()),
                        "{s}: success=no without errmsg"
                    );
                    seen.insert("success=no".into());
                }
                Packet::Event { name, .. } => drop(seen.insert(name.clone())),
                _ => {}
            }
            // `rekey` is answered before the rekey it queued reports its event
            if let (Packet::CmdResponse(_), Some(Packet::Event { name, .. })) = (p, s2c.get(i + 1))
            {
                if name.ends_with("-rekey") {
                    response_before_event = true;
                }
            }
        }
    }
    for want in [
        "CMD_UNKNOWN",
        "EVENT_UNKNOWN",
        "success=no",
        "ike-updown",
        "child-updown",
        "ike-rekey",
        "child-rekey",
        "list-conn",
        "list-sa",
        "control-log",
    ] {
        assert!(seen.contains(want), "no fixture has {want}; have {seen:?}");
    }
    assert!(
        response_before_event,
        "no fixture shows a response arriving before its related event"
    );
}

#[test]
fn typed_requests_match_what_charon_accepted_byte_for_byte() {
    use ipsec_mesh::dataplane::charon::Command;
    let cases: Vec<(&str, &str, ipsec_mesh::dataplane::charon::Message)> = vec![
        ("01-version", "version", Version.to_message()),
        (
            "04-load-shared",
            "load-shared",
            fixture_shared().to_message(),
        ),
        (
            "06-load-conn",
            "load-conn",
            LoadConn(fixture_conn("aes256gcm16-prfsha256-ecp256")).to_message(),
        ),
        (
            "09-initiate",
            "initiate",
            Initiate::child(NAME, 10000).to_message(),
        ),
        (
            "11-terminate",
            "terminate",
            Terminate {
                ike: Some(NAME.into()),
                timeout_ms: Some(10000),
                ..Default::default()
            }
            .to_message(),
        ),
        (
            "18-unload-conn",
            "unload-conn",
            UnloadConn { name: NAME.into() }.to_message(),
        ),
        (
            "19-unload-shared",
            "unload-shared",
            UnloadShared {
                id: "ipsec-mesh-psk".into(),
            }
            .to_message(),
        ),
    ];
    for (session, command, message) in cases {
        let ours = encode_packet(&Packet::CmdRequest {
            command: command.into(),
            message,
        })
        .unwrap();
        assert_eq!(
            ours,
            read(session, "c2s"),
            "{session}: our {command} differs from the recorded one"
        );
    }
}

// ---------------------------------------------------------------------------------------
// replay through the client

/// A fake charon: checks each packet the client sends against the recording and
/// answers with the recorded packets up to the answer, plus the events that follow it.
async fn fake_charon(mut sock: UnixStream, session: String) {
    let want = packets(&session, "c2s");
    let s2c = packets(&session, "s2c");
    let mut cursor = 0;
    for (i, expected) in want.iter().enumerate() {
        let mut len = [0u8; 4];
        if sock.read_exact(&mut len).await.is_err() {
            panic!(
                "{session}: client closed after {i} of {} requests",
                want.len()
            );
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut body).await.unwrap();
        let got = ipsec_mesh::dataplane::charon::wire::decode_packet(&body).unwrap();
        assert_eq!(
            &got, expected,
            "{session}: request {i} differs from the recording"
        );
        assert_eq!(
            [&len[..], &body[..]].concat(),
            encode_packet(expected).unwrap(),
            "{session}: request {i} bytes differ"
        );
        let mut out = Vec::new();
        while cursor < s2c.len() {
            let p = &s2c[cursor];
            cursor += 1;
            out.extend(encode_packet(p).unwrap());
            if is_answer(p) {
                break;
            }
        }
        // asynchronous events that followed the answer go out now (a monitoring client
        // waits for them before its next request); `list-*` events belong to the next
        // command, charon sends them only while that command runs
        while cursor < s2c.len() && !is_answer(&s2c[cursor]) && !is_list_event(&s2c[cursor]) {
            out.extend(encode_packet(&s2c[cursor]).unwrap());
            cursor += 1;
        }
        sock.write_all(&out).await.unwrap();
    }
    // hold the connection until the client is done
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{session}: client sent more than recorded");
}

async fn replay(session: &str) -> (Client, tokio::task::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let server = tokio::spawn(fake_charon(b, session.to_string()));
    (
        Client::from_stream(a, format!("fixture {session}"), Duration::from_secs(5)),
        server,
    )
}

async fn finish(client: Client, server: tokio::task::JoinHandle<()>) {
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("fake charon finishes")
        .expect("no panic");
}

#[tokio::test]
async fn replay_commands() {
    let (c, s) = replay("01-version").await;
    let v = c.call(&Version).await.unwrap();
    assert_eq!(
        (v.daemon.as_str(), v.version.as_str()),
        ("charon-systemd", "5.9.8")
    );
    finish(c, s).await;

    let (c, s) = replay("02-stats").await;
    let st = c.call(&Stats).await.unwrap();
    assert!(st.plugins.iter().any(|p| p == "kernel-libipsec"), "{st:?}");
    assert_eq!(st.ike_sas_total, 0);
    finish(c, s).await;

    let (c, s) = replay("03-get-shared-empty").await;
    assert!(c.call(&GetShared).await.unwrap().is_empty());
    finish(c, s).await;

    let (c, s) = replay("04-load-shared").await;
    c.call(&fixture_shared()).await.unwrap();
    finish(c, s).await;

    let (c, s) = replay("05-get-shared").await;
    assert_eq!(c.call(&GetShared).await.unwrap(), vec!["ipsec-mesh-psk"]);
    finish(c, s).await;

    let (c, s) = replay("06-load-conn").await;
    c.call(&LoadConn(fixture_conn("aes256gcm16-prfsha256-ecp256")))
        .await
        .unwrap();
    finish(c, s).await;

    let (c, s) = replay("07-get-conns").await;
    assert_eq!(c.call(&GetConns).await.unwrap(), vec![NAME]);
    finish(c, s).await;

    let (c, s) = replay("08-list-conns").await;
    let conns = c.list(&ListConns::default()).await.unwrap();
    assert_eq!(conns.len(), 1);
    let conn = &conns[0];
    assert_eq!(conn.name, NAME);
    assert_eq!(conn.remote_addrs, vec!["192.168.77.2"]);
    assert_eq!(
        (conn.local_ids.as_slice(), conn.remote_ids.as_slice()),
        (&["host-a".to_string()][..], &["host-b".to_string()][..])
    );
    // charon lists values differently from how they were loaded
    assert_eq!(conn.version, "IKEv2");
    assert_eq!(conn.unique.as_deref(), Some("UNIQUE_REPLACE"));
    assert_eq!(conn.rekey_time, Some(14400));
    let ch = &conn.children[0];
    assert_eq!((ch.name.as_str(), ch.mode.as_str()), (NAME, "TUNNEL"));
    assert_eq!(
        ch.dpd_action.as_deref(),
        Some("start"),
        "restart is listed as `start`"
    );
    assert_eq!(
        (ch.local_ts.as_slice(), ch.remote_ts.as_slice()),
        (
            &["10.42.1.0/24".to_string()][..],
            &["10.42.2.0/24".to_string()][..]
        )
    );
    finish(c, s).await;

    let (c, s) = replay("09-initiate").await;
    c.call(&Initiate::child(NAME, 10000)).await.unwrap();
    finish(c, s).await;

    let (c, s) = replay("10-list-sas").await;
    let sas = c.list(&ListSas::default()).await.unwrap();
    assert_eq!(sas.len(), 1);
    let sa = &sas[0];
    assert_eq!(
        (sa.name.as_str(), sa.state.as_str(), sa.initiator),
        (NAME, "ESTABLISHED", true)
    );
    assert_eq!(sa.remote_id.as_deref(), Some("host-b"));
    assert_eq!(
        sa.local_port,
        Some(4500),
        "libipsec forces UDP encapsulation (NAT-T port)"
    );
    let child = &sa.child_sas[0];
    assert_eq!(
        (
            child.name.as_str(),
            child.state.as_str(),
            child.mode.as_str()
        ),
        (NAME, "INSTALLED", "TUNNEL")
    );
    assert!(child.encap);
    assert!(child.spi_in.is_some() && child.spi_out.is_some());
    assert_eq!(child.remote_ts, vec!["10.42.2.0/24"]);
    finish(c, s).await;

    let (c, s) = replay("11-terminate").await;
    let t = c
        .call(&Terminate {
            ike: Some(NAME.into()),
            timeout_ms: Some(10000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((t.matches, t.terminated), (1, 1));
    finish(c, s).await;

    let (c, s) = replay("18-unload-conn").await;
    c.call(&UnloadConn { name: NAME.into() }).await.unwrap();
    finish(c, s).await;

    let (c, s) = replay("19-unload-shared").await;
    c.call(&UnloadShared {
        id: "ipsec-mesh-psk".into(),
    })
    .await
    .unwrap();
    finish(c, s).await;
}

#[tokio::test]
async fn replay_errors_surface_with_charons_words() {
    let (c, s) = replay("12-error-initiate-unknown-child").await;
    let e = c
        .call(&Initiate::child("no-such-child", 10000))
        .await
        .unwrap_err();
    assert_eq!(
        e.errmsg(),
        Some("CHILD_SA config 'no-such-child' not found")
    );
    assert_eq!(
        e.to_string(),
        "charon refused `initiate` (child=no-such-child): CHILD_SA config 'no-such-child' not found"
    );
    assert!(!e.is_connection_lost());
    finish(c, s).await;

    let (c, s) = replay("13-error-unload-conn-unknown").await;
    let e = c
        .call(&UnloadConn {
            name: "no-such-conn".into(),
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("connection 'no-such-conn' not found"),
        "{e}"
    );
    finish(c, s).await;

    let (c, s) = replay("14-cmd-unknown").await;
    let e = c
        .request("no-such-command", Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ViciError::UnknownCommand { ref command } if command == "no-such-command"),
        "{e}"
    );
    finish(c, s).await;

    let (c, s) = replay("15-event-unknown").await;
    let e = c
        .subscribe(&["no-such-event"])
        .await
        .err()
        .expect("EVENT_UNKNOWN is an error");
    assert!(
        matches!(e, ViciError::UnknownEvent { ref event } if event == "no-such-event"),
        "{e}"
    );
    finish(c, s).await;

    let (c, s) = replay("20-error-load-conn-bad-proposal").await;
    let e = c
        .call(&LoadConn(fixture_conn("bogus-alg-modp9999")))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "charon refused `load-conn` (conn=ipsec-mesh-host-b): invalid value for: proposals, config discarded");
    finish(c, s).await;

    // kernel-netlink on a kernel without ESP: IKE comes up, the CHILD_SA cannot be installed
    let (c, s) = replay("21-error-initiate-no-kernel-esp").await;
    let mut log = c.subscribe(&["control-log"]).await.unwrap();
    let init = Initiate {
        child: Some(NAME.into()),
        timeout_ms: Some(10000),
        loglevel: Some(1),
        ..Default::default()
    };
    let e = c.call(&init).await.unwrap_err();
    assert_eq!(
        e.errmsg(),
        Some("establishing CHILD_SA 'ipsec-mesh-host-b' failed")
    );
    let mut lines = Vec::new();
    while let Some(ev) = log.try_next() {
        lines.push(ev.message.str("msg").unwrap_or_default().to_string());
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("unable to add SAD entry")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("received netlink error")),
        "{lines:#?}"
    );
    c.unsubscribe(&["control-log"]).await.unwrap();
    finish(c, s).await;
}

#[tokio::test]
async fn replay_updown_events() {
    let (c, s) = replay("16-monitor-updown").await;
    let mut events = c.subscribe(&["ike-updown", "child-updown"]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap();
        got.push(SaEvent::parse(&ev).unwrap().expect("an SA event"));
    }
    c.unsubscribe(&["ike-updown", "child-updown"])
        .await
        .unwrap();
    let summary: Vec<(String, bool)> = got
        .iter()
        .map(|e| match e {
            SaEvent::IkeUpdown { up, sa } => (format!("ike {}", sa.name), *up),
            SaEvent::ChildUpdown { up, sa } => (format!("child {}", sa.child_sas[0].name), *up),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (format!("ike {NAME}"), true),
            (format!("child {NAME}"), true),
            (format!("ike {NAME}"), false),
            (format!("child {NAME}"), false),
        ]
    );
    // after unsubscribing both names the stream ends
    assert!(events.next().await.is_none());
    finish(c, s).await;
}

#[tokio::test]
async fn replay_rekey_events_and_response_before_events() {
    let (c, s) = replay("17-rekey-events").await;
    let mut events = c.subscribe(&SaEvent::NAMES).await.unwrap();
    c.call(&Initiate::child(NAME, 10000)).await.unwrap();
    assert_eq!(
        c.call(&Rekey {
            child: Some(NAME.into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        c.call(&Rekey {
            ike: Some(NAME.into()),
            ..Default::default()
        })
        .await
        .unwrap(),
        1
    );
    c.call(&Terminate {
        ike: Some(NAME.into()),
        timeout_ms: Some(10000),
        ..Default::default()
    })
    .await
    .unwrap();
    c.unsubscribe(&SaEvent::NAMES).await.unwrap();
    let mut kinds = Vec::new();
    while let Some(ev) = events.next().await {
        match SaEvent::parse(&ev).unwrap().unwrap() {
            SaEvent::IkeUpdown { up, .. } => kinds.push(format!("ike-updown {up}")),
            SaEvent::ChildUpdown { up, .. } => kinds.push(format!("child-updown {up}")),
            SaEvent::ChildRekey { ike, old, new } => {
                assert_eq!(ike.name, NAME);
                assert_eq!(
                    (old.state.as_str(), new.state.as_str()),
                    ("REKEYED", "INSTALLED")
                );
                assert_ne!(old.spi_in, new.spi_in);
                assert_eq!(old.reqid, new.reqid, "a rekey keeps the reqid");
                kinds.push("child-rekey".into());
            }
            SaEvent::IkeRekey { old, new } => {
                assert_ne!(old.uniqueid, new.uniqueid);
                kinds.push("ike-rekey".into());
            }
        }
    }
    assert_eq!(
        kinds,
        [
            "ike-updown true",
            "child-updown true",
            "child-rekey",
            "ike-rekey",
            "ike-updown false",
            "child-updown false"
        ]
    );
    finish(c, s).await;
}
