//! charon driver, foundation: talks to strongSwan's charon over its VICI socket.
//!
//! - [`wire`]: the VICI wire codec, pure (frames, packets, messages).
//! - [`types`]: typed requests/responses/events (`version`, `load-shared`, `load-conn`,
//!   `list-conns`, `list-sas`, `initiate`, `terminate`, SA events, ...).
//! - [`client`]: async client on a Unix socket: connect with retry/backoff, `success`
//!   checked on every answer, event subscriptions, streamed `list-*` commands.
//! - [`desired`]: pure: the conns and shared key a plan asks for, and the diff.
//! - [`listed`]: pure: `list-conns` output normalised to compare with what was loaded.
//! - [`sas`]: pure: `list-sas` summarised per conn (up, connecting, duplicates, counters).
//! - [`failure`]: pure: charon's failures (`errmsg`, `control-log`) in words.
//! - [`batch`]: pipelined requests on dedicated connections (bulk `load-conn`, parallel
//!   `initiate` with their `control-log` lines).
//! - [`driver`]: `reconcile` (a sequence of named phases), `cleanup`, `counters`.
//! - [`report`]: what a reconcile or cleanup did ([`CharonReport`], [`PeerState`]).
//! - [`mesh`]: [`CharonMesh`], the synchronous driver interface, and the sidecar's event
//!   watcher thread.
//! - [`revive`]: watches `ike-updown`/`child-updown` and re-initiates lost children with
//!   per-peer exponential backoff.
//!
//! Not `rsvici`: see [`client`] for why (no `success` check, a listener that keeps polling
//! a dead socket, cancellation-unsafe reads). The codec is validated against real captures in
//! `vici-fixtures/` (tests/charon_fixtures.rs).

pub mod batch;
pub mod client;
pub mod desired;
pub mod driver;
pub mod esp;
pub mod failure;
pub mod listed;
pub mod mesh;
pub mod report;
pub mod revive;
pub mod sas;
#[cfg(test)]
mod test_fixtures;
pub mod types;
pub mod wire;

pub use client::{Client, ConnectOptions, EventStream, ListStream, ViciError};
pub use desired::{Backoff, CharonConfig, Role};
pub use driver::{cleanup, reconcile, reconcile_config};
pub use mesh::CharonMesh;
pub use report::{CharonReport, PeerState};
pub use types::{
    AuthConfig, ChildConfig, ChildInfo, ChildMode, ChildSa, Command, ConnConfig, ConnInfo, Event,
    GetConns, GetShared, IkeSa, Initiate, ListConns, ListSas, LoadConn, LoadShared, ParseError,
    Rekey, SaAction, SaEvent, SharedKeyType, StartAction, Stats, StatsInfo, StreamCommand,
    Terminate, Terminated, Unique, UnloadConn, UnloadShared, Version, VersionInfo,
};
pub use wire::{Message, Packet, PacketType, Value, WireError};
