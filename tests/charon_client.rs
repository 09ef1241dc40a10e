//! VICI client behaviour against fake charons on Unix sockets (no root needed): connect
//! retry/backoff, charon dying, charon not answering, callers giving up.

use std::time::{Duration, Instant};

use ipsec_mesh::dataplane::charon::wire::{decode_packet, encode_packet};
use ipsec_mesh::dataplane::charon::{Client, ConnectOptions, Message, Packet, Version, ViciError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

fn version_answer(v: &str) -> Vec<u8> {
    let m = Message::new()
        .with_str("daemon", "charon-systemd")
        .with_str("version", v)
        .with_str("sysname", "Linux")
        .with_str("release", "x")
        .with_str("machine", "x86_64");
    encode_packet(&Packet::CmdResponse(m)).unwrap()
}

async fn read_packet(s: &mut UnixStream) -> Option<Packet> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.ok()?;
    Some(decode_packet(&body).unwrap())
}

fn opts(max_wait_ms: u64) -> ConnectOptions {
    ConnectOptions {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(80),
        max_wait: Some(Duration::from_millis(max_wait_ms)),
        request_timeout: Duration::from_secs(5),
    }
}

/// Serves `version` forever on `listener` (one connection).
async fn serve_versions(listener: UnixListener) {
    let (mut s, _) = listener.accept().await.unwrap();
    while let Some(p) = read_packet(&mut s).await {
        assert_eq!(p.name(), Some("version"));
        s.write_all(&version_answer("5.9.8")).await.unwrap();
    }
}

#[tokio::test]
async fn connect_waits_for_a_socket_that_appears_later() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("charon.vici");
    let p2 = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        serve_versions(UnixListener::bind(&p2).unwrap()).await;
    });
    let t = Instant::now();
    let c = Client::connect(&path, &opts(5_000)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(c.daemon().unwrap().version, "5.9.8");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn connect_retries_a_refusing_stale_socket_then_gives_up_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("charon.vici");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // stale socket file: refuses
    let t = Instant::now();
    let e = Client::connect(&path, &opts(300))
        .await
        .err()
        .expect("must give up");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    let msg = e.to_string();
    assert!(
        matches!(e, ViciError::Connect { attempts, .. } if attempts >= 3),
        "{msg}"
    );
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("refused"),
        "{msg}"
    );

    // charon restarts: removes the stale file and listens again -> connect succeeds
    let p2 = path.clone();
    let server = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::remove_file(&p2).unwrap();
        serve_versions(UnixListener::bind(&p2).unwrap()).await;
    });
    let c = Client::connect(&path, &opts(5_000)).await.unwrap();
    c.call(&Version).await.unwrap();
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn charon_dying_fails_the_request_ends_streams_and_does_not_spin() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let c = Client::from_stream(a, "test", Duration::from_secs(5));
    let server = tokio::spawn(async move {
        // confirm the subscription, then die while a request is in flight
        assert!(matches!(
            read_packet(&mut b).await,
            Some(Packet::EventRegister(_))
        ));
        b.write_all(&encode_packet(&Packet::EventConfirm).unwrap())
            .await
            .unwrap();
        assert!(read_packet(&mut b).await.is_some());
        drop(b);
    });
    let mut events = c.subscribe(&["ike-updown"]).await.unwrap();
    let t = Instant::now();
    let e = c.call(&Version).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(e.is_connection_lost(), "{e}");
    assert!(e.to_string().contains("EOF"), "{e}");
    assert!(
        events.next().await.is_none(),
        "event stream ends with the connection"
    );
    let e2 = c.call(&Version).await.unwrap_err();
    assert!(matches!(e2, ViciError::Disconnected { .. }), "{e2}");
    assert!(c.closed().is_some());
    server.await.unwrap();
    // nothing keeps running: the reader ended (rsvici's listener spins on EOF)
    let cpu0 = cpu_ticks();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cpu_ticks() - cpu0 < 10, "client burns CPU after EOF");
}

/// CPU time of this thread: the test runtime is single-threaded, the client's tasks run here.
fn cpu_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn no_answer_times_out_and_closes_the_connection() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let c = Client::from_stream(a, "test", Duration::from_secs(5));
    let server = tokio::spawn(async move {
        let _req = read_packet(&mut b).await;
        // never answer; wait for the client to shut its side
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest).await;
    });
    let e = c
        .call_timeout(&Version, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(e, ViciError::Timeout { .. }), "{e}");
    assert!(e.is_connection_lost());
    let e2 = c.call(&Version).await.unwrap_err();
    assert!(matches!(e2, ViciError::Disconnected { .. }), "{e2}");
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_caller_giving_up_does_not_desynchronise_answers() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let c = Client::from_stream(a, "test", Duration::from_secs(5));
    let server = tokio::spawn(async move {
        read_packet(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        b.write_all(&version_answer("first")).await.unwrap();
        read_packet(&mut b).await.unwrap();
        b.write_all(&version_answer("second")).await.unwrap();
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest).await;
    });
    // the first caller gives up before charon answers
    assert!(
        tokio::time::timeout(Duration::from_millis(20), c.call(&Version))
            .await
            .is_err()
    );
    // the next caller gets its own answer, not the late one
    assert_eq!(c.call(&Version).await.unwrap().version, "second");
    drop(c);
    server.await.unwrap();
}

#[tokio::test]
async fn concurrent_callers_are_serialised() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let c = std::sync::Arc::new(Client::from_stream(a, "test", Duration::from_secs(5)));
    let server = tokio::spawn(async move {
        let mut n = 0;
        while let Some(p) = read_packet(&mut b).await {
            n += 1;
            // answer with the request's own name so each caller can check it got its answer
            let m = Message::new().with_str("echo", p.message().unwrap().str("tag").unwrap());
            b.write_all(&encode_packet(&Packet::CmdResponse(m)).unwrap())
                .await
                .unwrap();
        }
        n
    });
    let mut tasks = Vec::new();
    for i in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let m = c
                .request("echo", Message::new().with_str("tag", i.to_string()))
                .await
                .unwrap();
            assert_eq!(m.str("echo"), Some(i.to_string().as_str()));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(c);
    assert_eq!(server.await.unwrap(), 20);
}
