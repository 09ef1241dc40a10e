//! Test helpers: the server side of the sessions in `vici-fixtures/` (captured from
//! charon-systemd 5.9.8 by `vici-fixtures/capture.sh`).

use super::wire::{decode_stream, Message, Packet};

/// Every packet charon sent in `session`.
pub fn fixture_packets(session: &str) -> Vec<Packet> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("vici-fixtures/sessions")
        .join(format!("{session}.s2c.bin"));
    decode_stream(&std::fs::read(&p).unwrap()).unwrap()
}

/// The messages of the `event` events charon sent in `session`.
pub fn fixture_events(session: &str, event: &str) -> Vec<Message> {
    fixture_packets(session)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Event { name, message } if name == event => Some(message),
            _ => None,
        })
        .collect()
}
