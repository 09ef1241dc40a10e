//! Typed VICI requests, responses and events for the commands the charon driver uses.
//!
//! Requests turn into [`Message`]s (keys in a fixed order: the fixture client
//! `vici-fixtures/vici_client.py` sends the same bytes); responses and events are parsed
//! from [`Message`]s, with errors naming the field. Durations are whole seconds, as charon
//! reports them in `list-conns`.
//!
//! charon reports some values differently from how they are loaded (seen in the
//! fixtures): `version = 2` lists as `IKEv2`, `unique = replace` as `UNIQUE_REPLACE`,
//! `dpd_action = restart` as `start`. Compare loaded and listed conns with that in mind.

use std::fmt;

use thiserror::Error;
use zeroize::Zeroizing;

use super::wire::{Message, Value};

/// A typed response or event did not have the expected shape.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("VICI {context}: field `{field}` {reason}")]
pub struct ParseError {
    pub context: String,
    pub field: String,
    pub reason: String,
}

fn perr(context: &str, field: &str, reason: impl Into<String>) -> ParseError {
    ParseError {
        context: context.to_string(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn req_str(m: &Message, ctx: &str, field: &str) -> Result<String, ParseError> {
    match m.get(field) {
        Some(Value::Bytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| perr(ctx, field, "is not UTF-8"))
        }
        Some(_) => Err(perr(ctx, field, "is not a key/value")),
        None => Err(perr(ctx, field, "is missing")),
    }
}

fn opt_str(m: &Message, field: &str) -> Option<String> {
    m.str(field).map(str::to_string)
}

fn opt_num<T: std::str::FromStr>(
    m: &Message,
    ctx: &str,
    field: &str,
) -> Result<Option<T>, ParseError> {
    match m.str(field) {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| perr(ctx, field, format!("is not a number: {s:?}"))),
    }
}

fn req_num<T: std::str::FromStr>(m: &Message, ctx: &str, field: &str) -> Result<T, ParseError> {
    opt_num(m, ctx, field)?.ok_or_else(|| perr(ctx, field, "is missing"))
}

fn yes(m: &Message, field: &str) -> bool {
    m.str(field) == Some("yes")
}

fn list(m: &Message, field: &str) -> Vec<String> {
    m.list(field).unwrap_or_default()
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A VICI command with a typed request and response.
pub trait Command {
    /// The command name on the wire.
    const NAME: &'static str;
    type Output;
    fn to_message(&self) -> Message;
    /// What the request is about, for errors and logs (names only, never secrets).
    fn context(&self) -> String {
        String::new()
    }
    /// How long charon itself may take before answering (commands with a `timeout`).
    fn answer_within(&self) -> Option<std::time::Duration> {
        None
    }
    /// Parses a response whose `success` was already checked.
    fn parse(response: &Message) -> Result<Self::Output, ParseError>;
}

fn within(timeout_ms: Option<i64>) -> Option<std::time::Duration> {
    timeout_ms
        .filter(|t| *t > 0)
        .map(|t| std::time::Duration::from_millis(t as u64))
}

/// Implements [`Command`] for a request type, in the shape every command shares: the wire
/// name and the answer type, then what differs, each given as `|c| expr` with `c` the
/// command (or, for `answer`, the response):
/// - `request`: the request message; omitted for commands without arguments (an empty
///   message);
/// - `context`, `within`: [`Command::context`], [`Command::answer_within`]; omitted: none;
/// - `answer`: parses the response; omitted for commands whose answer carries nothing but
///   `success` (`Output = ()`).
macro_rules! command {
    (
        $ty:ty, $name:literal -> $out:ty
        $(, request |$rq:ident| $request:expr)?
        $(, context |$cx:ident| $context:expr)?
        $(, within |$wi:ident| $within:expr)?
        $(, answer |$an:ident| $answer:expr)?
        $(,)?
    ) => {
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Output = $out;
            fn to_message(&self) -> Message {
                command!(@request self $(, $rq, $request)?)
            }
            $(fn context(&self) -> String {
                let $cx = self;
                $context
            })?
            $(fn answer_within(&self) -> Option<std::time::Duration> {
                let $wi = self;
                $within
            })?
            fn parse(response: &Message) -> Result<$out, ParseError> {
                command!(@answer response $(, $an, $answer)?)
            }
        }
    };
    (@request $c:ident) => {{
        let _ = $c;
        Message::new()
    }};
    (@request $c:ident, $rq:ident, $request:expr) => {{
        let $rq = $c;
        $request
    }};
    (@answer $m:ident) => {{
        let _ = $m;
        Ok(())
    }};
    (@answer $m:ident, $an:ident, $answer:expr) => {{
        let $an = $m;
        $answer
    }};
}

/// A command that streams its results as events (`list-conns` -> `list-conn`, ...): the
/// client registers the event, sends the command, collects the events that arrive before
/// the response, and unregisters.
pub trait StreamCommand {
    const NAME: &'static str;
    const EVENT: &'static str;
    type Item;
    fn to_message(&self) -> Message;
    fn context(&self) -> String {
        String::new()
    }
    /// Items of one event.
    fn parse_event(event: &Message) -> Result<Vec<Self::Item>, ParseError>;
}

// ---------------------------------------------------------------------------------------
// version / stats

/// `version`: daemon name and version.
#[derive(Debug, Clone, Copy, Default)]
pub struct Version;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub daemon: String,
    pub version: String,
    pub sysname: String,
    pub release: String,
    pub machine: String,
}

command!(Version, "version" -> VersionInfo, answer |m| VersionInfo::parse(m));

impl VersionInfo {
    fn parse(m: &Message) -> Result<VersionInfo, ParseError> {
        let c = "version";
        Ok(VersionInfo {
            daemon: req_str(m, c, "daemon")?,
            version: req_str(m, c, "version")?,
            sysname: opt_str(m, "sysname").unwrap_or_default(),
            release: opt_str(m, "release").unwrap_or_default(),
            machine: opt_str(m, "machine").unwrap_or_default(),
        })
    }
}

/// `stats`: daemon counters (the parts the sidecar reports).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsInfo {
    /// As charon words it, e.g. `0 seconds`, `2 days`.
    pub uptime: String,
    /// Start time as charon prints it.
    pub since: String,
    pub ike_sas_total: u64,
    pub ike_sas_half_open: u64,
    pub plugins: Vec<String>,
}

command!(Stats, "stats" -> StatsInfo, answer |m| StatsInfo::parse(m));

impl StatsInfo {
    fn parse(m: &Message) -> Result<StatsInfo, ParseError> {
        let c = "stats";
        let uptime = m
            .section("uptime")
            .ok_or_else(|| perr(c, "uptime", "is missing"))?;
        let ikesas = m
            .section("ikesas")
            .ok_or_else(|| perr(c, "ikesas", "is missing"))?;
        Ok(StatsInfo {
            uptime: req_str(uptime, c, "running")
                .map_err(|_| perr(c, "uptime.running", "is missing"))?,
            since: opt_str(uptime, "since").unwrap_or_default(),
            ike_sas_total: req_num(ikesas, c, "total")
                .map_err(|_| perr(c, "ikesas.total", "is missing"))?,
            ike_sas_half_open: opt_num(ikesas, c, "half-open")?.unwrap_or(0),
            plugins: list(m, "plugins"),
        })
    }
}

// ---------------------------------------------------------------------------------------
// shared secrets

/// Type of a shared secret (`load-shared` `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedKeyType {
    Ike,
    Eap,
    Xauth,
    Ntlm,
    Ppk,
}

impl SharedKeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ike => "IKE",
            Self::Eap => "EAP",
            Self::Xauth => "XAUTH",
            Self::Ntlm => "NTLM",
            Self::Ppk => "PPK",
        }
    }
}

/// `load-shared`: a shared secret with a unique `id` (so it can be replaced and unloaded)
/// owned by the identities in `owners`. Loading the same `id` again replaces the secret.
/// `data` is zeroed on drop and never printed.
#[derive(Clone)]
pub struct LoadShared {
    pub id: String,
    pub kind: SharedKeyType,
    pub data: Zeroizing<Vec<u8>>,
    pub owners: Vec<String>,
}

impl fmt::Debug for LoadShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadShared")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("data", &"<redacted>")
            .field("owners", &self.owners)
            .finish()
    }
}

command!(
    LoadShared, "load-shared" -> (),
    request |c| {
        let mut m = Message::new();
        m.push_str("type", c.kind.as_str())
            .push_secret("data", &c.data)
            .push_str("id", &c.id)
            .push_list("owners", &c.owners);
        m
    },
    context |c| format!("id={} owners={}", c.id, c.owners.join(",")),
);

/// `unload-shared`: removes the shared secret with this `id`.
#[derive(Debug, Clone)]
pub struct UnloadShared {
    pub id: String,
}

command!(
    UnloadShared, "unload-shared" -> (),
    request |c| Message::new().with_str("id", &c.id),
    context |c| format!("id={}", c.id),
);

/// `get-shared`: ids of the shared secrets loaded over VICI.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetShared;

command!(GetShared, "get-shared" -> Vec<String>, answer |m| Ok(list(m, "keys")));

// ---------------------------------------------------------------------------------------
// connections

/// `unique` policy of a conn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unique {
    No,
    Never,
    Keep,
    Replace,
}

impl Unique {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Never => "never",
            Self::Keep => "keep",
            Self::Replace => "replace",
        }
    }
}

/// IPsec mode of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildMode {
    Tunnel,
    Transport,
}

impl ChildMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tunnel => "tunnel",
            Self::Transport => "transport",
        }
    }
}

/// `start_action` of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAction {
    None,
    Trap,
    Start,
    TrapStart,
}

impl StartAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Trap => "trap",
            Self::Start => "start",
            Self::TrapStart => "trap|start",
        }
    }
}

/// `dpd_action` / `close_action` of a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaAction {
    None,
    Clear,
    Trap,
    Restart,
}

impl SaAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Clear => "clear",
            Self::Trap => "trap",
            Self::Restart => "restart",
        }
    }
}

/// One authentication round (`local`/`remote` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// `psk`, `pubkey`, ...
    pub auth: String,
    /// IKE identity; charon defaults to the address when absent.
    pub id: Option<String>,
}

impl AuthConfig {
    pub fn psk(id: impl Into<String>) -> Self {
        Self {
            auth: "psk".into(),
            id: Some(id.into()),
        }
    }

    fn to_message(&self) -> Message {
        let mut m = Message::new().with_str("auth", &self.auth);
        m.push_some("id", self.id.as_ref());
        m
    }
}

/// A CHILD_SA config of a conn (`children.<name>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildConfig {
    /// Must be unique across all loaded conns: `initiate child=<name>` takes the first conn
    /// that has a child of that name.
    pub name: String,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
    pub mode: ChildMode,
    pub esp_proposals: Vec<String>,
    /// Seconds; `Some(0)` = this side never rekeys the CHILD_SA.
    pub rekey_time: Option<u32>,
    pub life_time: Option<u32>,
    pub rand_time: Option<u32>,
    pub start_action: StartAction,
    pub dpd_action: SaAction,
    pub close_action: SaAction,
    /// `false`: charon installs no IPsec policies (ipsec-mesh installs them itself).
    pub policies: bool,
    pub reqid: Option<u32>,
    /// `mark_in` / `mark_out` as (value, mask).
    pub mark_in: Option<(u32, u32)>,
    pub mark_out: Option<(u32, u32)>,
    pub updown: Option<String>,
}

impl ChildConfig {
    /// A tunnel-mode child with charon's defaults for everything else.
    pub fn tunnel(name: impl Into<String>, local_ts: Vec<String>, remote_ts: Vec<String>) -> Self {
        Self {
            name: name.into(),
            local_ts,
            remote_ts,
            mode: ChildMode::Tunnel,
            esp_proposals: Vec::new(),
            rekey_time: None,
            life_time: None,
            rand_time: None,
            start_action: StartAction::None,
            dpd_action: SaAction::None,
            close_action: SaAction::None,
            policies: true,
            reqid: None,
            mark_in: None,
            mark_out: None,
            updown: None,
        }
    }

    fn to_message(&self) -> Message {
        let mut m = Message::new();
        m.push_list("local_ts", &self.local_ts);
        m.push_list("remote_ts", &self.remote_ts);
        m.push_str("mode", self.mode.as_str());
        if !self.esp_proposals.is_empty() {
            m.push_list("esp_proposals", &self.esp_proposals);
        }
        let mark = |v: Option<(u32, u32)>| v.map(|(value, mask)| format!("{value:#x}/{mask:#x}"));
        m.push_some("rekey_time", self.rekey_time)
            .push_some("life_time", self.life_time)
            .push_some("rand_time", self.rand_time)
            .push_str("start_action", self.start_action.as_str())
            .push_str("dpd_action", self.dpd_action.as_str())
            .push_str("close_action", self.close_action.as_str());
        if !self.policies {
            m.push_str("policies", "no");
        }
        m.push_some("reqid", self.reqid)
            .push_some("mark_in", mark(self.mark_in))
            .push_some("mark_out", mark(self.mark_out))
            .push_some("updown", self.updown.as_ref());
        m
    }
}

/// An IKE connection config (`load-conn` `<name> { ... }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnConfig {
    pub name: String,
    /// IKE major version: 2 (0 = any, 1 = IKEv1).
    pub version: u8,
    pub local_addrs: Vec<String>,
    pub remote_addrs: Vec<String>,
    pub local_port: Option<u16>,
    pub remote_port: Option<u16>,
    pub proposals: Vec<String>,
    /// Force UDP encapsulation of ESP (NAT-T) even without NAT.
    pub encap: bool,
    pub mobike: bool,
    pub unique: Option<Unique>,
    /// Seconds between liveness checks; `None` = charon default (off).
    pub dpd_delay: Option<u32>,
    pub keyingtries: Option<u32>,
    /// Seconds; `Some(0)` = this side never rekeys the IKE_SA.
    pub rekey_time: Option<u32>,
    pub reauth_time: Option<u32>,
    pub over_time: Option<u32>,
    pub rand_time: Option<u32>,
    pub local: AuthConfig,
    pub remote: AuthConfig,
    pub children: Vec<ChildConfig>,
}

impl ConnConfig {
    /// An IKEv2 conn with charon's defaults, to be filled in.
    pub fn ikev2(name: impl Into<String>, local: AuthConfig, remote: AuthConfig) -> Self {
        Self {
            name: name.into(),
            version: 2,
            local_addrs: Vec::new(),
            remote_addrs: Vec::new(),
            local_port: None,
            remote_port: None,
            proposals: Vec::new(),
            encap: false,
            mobike: true,
            unique: None,
            dpd_delay: None,
            keyingtries: None,
            rekey_time: None,
            reauth_time: None,
            over_time: None,
            rand_time: None,
            local,
            remote,
            children: Vec::new(),
        }
    }

    /// The section body (without the conn name).
    pub fn to_section(&self) -> Message {
        let mut m = Message::new();
        m.push_str("version", self.version.to_string());
        m.push_list("local_addrs", &self.local_addrs);
        m.push_list("remote_addrs", &self.remote_addrs);
        m.push_some("local_port", self.local_port)
            .push_some("remote_port", self.remote_port);
        if !self.proposals.is_empty() {
            m.push_list("proposals", &self.proposals);
        }
        m.push_str("encap", yes_no(self.encap));
        m.push_str("mobike", yes_no(self.mobike));
        m.push_some("unique", self.unique.map(Unique::as_str));
        m.push_some("dpd_delay", self.dpd_delay)
            .push_some("keyingtries", self.keyingtries)
            .push_some("rekey_time", self.rekey_time)
            .push_some("reauth_time", self.reauth_time)
            .push_some("over_time", self.over_time)
            .push_some("rand_time", self.rand_time);
        m.push_section("local", self.local.to_message());
        m.push_section("remote", self.remote.to_message());
        let mut children = Message::new();
        for c in &self.children {
            children.push_section(&c.name, c.to_message());
        }
        m.push_section("children", children);
        m
    }
}

/// `load-conn`: loads or replaces one conn.
#[derive(Debug, Clone)]
pub struct LoadConn(pub ConnConfig);

command!(
    LoadConn, "load-conn" -> (),
    request |c| Message::new().with_section(&c.0.name, c.0.to_section()),
    context |c| format!("conn={}", c.0.name),
);

/// `unload-conn`: unloads a conn (its SAs are closed by charon).
#[derive(Debug, Clone)]
pub struct UnloadConn {
    pub name: String,
}

command!(
    UnloadConn, "unload-conn" -> (),
    request |c| Message::new().with_str("name", &c.name),
    context |c| format!("conn={}", c.name),
);

/// `get-conns`: names of the conns loaded over VICI.
#[derive(Debug, Clone, Copy, Default)]
pub struct GetConns;

command!(GetConns, "get-conns" -> Vec<String>, answer |m| Ok(list(m, "conns")));

/// `list-conns` (streams `list-conn` events): loaded conns as charon reports them.
#[derive(Debug, Clone, Default)]
pub struct ListConns {
    /// Only this conn.
    pub ike: Option<String>,
}

/// A conn as `list-conn` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub name: String,
    pub local_addrs: Vec<String>,
    pub remote_addrs: Vec<String>,
    /// `IKEv2`, `IKEv1`, `IKEv1/2`
    pub version: String,
    pub rekey_time: Option<u32>,
    pub reauth_time: Option<u32>,
    /// `UNIQUE_REPLACE`, ...
    pub unique: Option<String>,
    pub dpd_delay: Option<u32>,
    /// Identities of the local/remote auth rounds (`local-1`, `remote-1`, ...), in order.
    pub local_ids: Vec<String>,
    pub remote_ids: Vec<String>,
    pub children: Vec<ChildInfo>,
}

/// A child config as `list-conn` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    pub name: String,
    /// `TUNNEL`, `TRANSPORT`, ...
    pub mode: String,
    pub rekey_time: Option<u32>,
    pub dpd_action: Option<String>,
    pub close_action: Option<String>,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

impl ConnInfo {
    fn parse(name: &str, m: &Message) -> Result<Self, ParseError> {
        let c = format!("list-conn `{name}`");
        let ids = |prefix: &str| {
            m.sections()
                .filter(|(k, _)| {
                    k.strip_prefix(prefix)
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .filter_map(|(_, s)| opt_str(s, "id"))
                .collect()
        };
        let mut children = Vec::new();
        if let Some(ch) = m.section("children") {
            for (cn, cm) in ch.sections() {
                let cc = format!("{c} child `{cn}`");
                children.push(ChildInfo {
                    name: cn.to_string(),
                    mode: opt_str(cm, "mode").unwrap_or_default(),
                    rekey_time: opt_num(cm, &cc, "rekey_time")?,
                    dpd_action: opt_str(cm, "dpd_action"),
                    close_action: opt_str(cm, "close_action"),
                    local_ts: list(cm, "local-ts"),
                    remote_ts: list(cm, "remote-ts"),
                });
            }
        }
        Ok(ConnInfo {
            name: name.to_string(),
            local_addrs: list(m, "local_addrs"),
            remote_addrs: list(m, "remote_addrs"),
            version: opt_str(m, "version").unwrap_or_default(),
            rekey_time: opt_num(m, &c, "rekey_time")?,
            reauth_time: opt_num(m, &c, "reauth_time")?,
            unique: opt_str(m, "unique"),
            dpd_delay: opt_num(m, &c, "dpd_delay")?,
            local_ids: ids("local-"),
            remote_ids: ids("remote-"),
            children,
        })
    }
}

impl StreamCommand for ListConns {
    const NAME: &'static str = "list-conns";
    const EVENT: &'static str = "list-conn";
    type Item = ConnInfo;
    fn to_message(&self) -> Message {
        let mut m = Message::new();
        m.push_some("ike", self.ike.as_ref());
        m
    }
    fn context(&self) -> String {
        ctx_child_ike(&None, &self.ike)
    }
    fn parse_event(m: &Message) -> Result<Vec<ConnInfo>, ParseError> {
        m.sections()
            .map(|(name, s)| ConnInfo::parse(name, s))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// SAs

/// `list-sas` (streams `list-sa` events): established and connecting IKE_SAs.
#[derive(Debug, Clone, Default)]
pub struct ListSas {
    pub ike: Option<String>,
    pub ike_id: Option<u64>,
    /// Do not wait for SAs that are busy (charon otherwise blocks on them).
    pub noblock: bool,
}

impl StreamCommand for ListSas {
    const NAME: &'static str = "list-sas";
    const EVENT: &'static str = "list-sa";
    type Item = IkeSa;
    fn to_message(&self) -> Message {
        let mut m = Message::new();
        m.push_yes("noblock", self.noblock)
            .push_some("ike", self.ike.as_ref())
            .push_some("ike-id", self.ike_id);
        m
    }
    fn context(&self) -> String {
        ctx_child_ike(&None, &self.ike)
    }
    fn parse_event(m: &Message) -> Result<Vec<IkeSa>, ParseError> {
        m.sections()
            .map(|(name, s)| IkeSa::parse(name, s, "list-sa"))
            .collect()
    }
}

/// An IKE_SA as `list-sa` and the SA events report it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IkeSa {
    /// The conn name.
    pub name: String,
    pub uniqueid: u64,
    /// `ESTABLISHED`, `CONNECTING`, `REKEYING`, `DELETING`, ...
    pub state: String,
    pub local_host: Option<String>,
    pub local_port: Option<u16>,
    pub local_id: Option<String>,
    pub remote_host: Option<String>,
    pub remote_port: Option<u16>,
    pub remote_id: Option<String>,
    pub initiator: bool,
    /// Seconds since established.
    pub established: Option<u64>,
    /// Seconds until this side rekeys (absent if it never does).
    pub rekey_time: Option<u64>,
    pub child_sas: Vec<ChildSa>,
}

/// A CHILD_SA as `list-sa` and the SA events report it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChildSa {
    /// The section name: `<child name>-<unique id>` in list-sa, the child name in
    /// rekey events.
    pub key: String,
    /// The child config name.
    pub name: String,
    pub uniqueid: u64,
    pub reqid: u32,
    /// `INSTALLED`, `REKEYED`, `DELETING`, ...
    pub state: String,
    /// `TUNNEL`, `TRANSPORT`
    pub mode: String,
    /// `ESP`, `AH`
    pub protocol: String,
    /// UDP-encapsulated ESP.
    pub encap: bool,
    /// SPIs as charon prints them (hex).
    pub spi_in: Option<String>,
    pub spi_out: Option<String>,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

impl ChildSa {
    fn parse(key: &str, m: &Message, ctx: &str) -> Result<Self, ParseError> {
        let c = format!("{ctx} child `{key}`");
        Ok(ChildSa {
            key: key.to_string(),
            name: req_str(m, &c, "name")?,
            uniqueid: req_num(m, &c, "uniqueid")?,
            reqid: opt_num(m, &c, "reqid")?.unwrap_or(0),
            state: opt_str(m, "state").unwrap_or_default(),
            mode: opt_str(m, "mode").unwrap_or_default(),
            protocol: opt_str(m, "protocol").unwrap_or_default(),
            encap: yes(m, "encap"),
            spi_in: opt_str(m, "spi-in"),
            spi_out: opt_str(m, "spi-out"),
            bytes_in: opt_num(m, &c, "bytes-in")?.unwrap_or(0),
            packets_in: opt_num(m, &c, "packets-in")?.unwrap_or(0),
            bytes_out: opt_num(m, &c, "bytes-out")?.unwrap_or(0),
            packets_out: opt_num(m, &c, "packets-out")?.unwrap_or(0),
            local_ts: list(m, "local-ts"),
            remote_ts: list(m, "remote-ts"),
        })
    }
}

impl IkeSa {
    fn parse(name: &str, m: &Message, ctx: &str) -> Result<Self, ParseError> {
        let c = format!("{ctx} `{name}`");
        let mut child_sas = Vec::new();
        if let Some(cs) = m.section("child-sas") {
            for (key, cm) in cs.sections() {
                // child-rekey events nest `old` / `new` under the child
                if cm.get("name").is_none()
                    && (cm.section("old").is_some() || cm.section("new").is_some())
                {
                    continue;
                }
                child_sas.push(ChildSa::parse(key, cm, &c)?);
            }
        }
        Ok(IkeSa {
            name: name.to_string(),
            uniqueid: req_num(m, &c, "uniqueid")?,
            state: opt_str(m, "state").unwrap_or_default(),
            local_host: opt_str(m, "local-host"),
            local_port: opt_num(m, &c, "local-port")?,
            local_id: opt_str(m, "local-id"),
            remote_host: opt_str(m, "remote-host"),
            remote_port: opt_num(m, &c, "remote-port")?,
            remote_id: opt_str(m, "remote-id"),
            initiator: yes(m, "initiator"),
            established: opt_num(m, &c, "established")?,
            rekey_time: opt_num(m, &c, "rekey-time")?,
            child_sas,
        })
    }
}

/// `initiate`: brings up a child (and its IKE_SA) or an IKE_SA only. With a `timeout`,
/// charon answers when the SA is up or failed; `success = no` carries the reason.
#[derive(Debug, Clone, Default)]
pub struct Initiate {
    pub child: Option<String>,
    pub ike: Option<String>,
    /// Milliseconds to wait for the result; `None` = charon's default (wait), negative in
    /// charon = do not wait.
    pub timeout_ms: Option<i64>,
    /// Respect charon's half-open / IKE_SA limits.
    pub init_limits: bool,
    /// Level of the `control-log` events sent while initiating (only if registered).
    pub loglevel: Option<i32>,
}

impl Initiate {
    pub fn child(name: impl Into<String>, timeout_ms: i64) -> Self {
        Self {
            child: Some(name.into()),
            timeout_ms: Some(timeout_ms),
            ..Self::default()
        }
    }
}

command!(
    Initiate, "initiate" -> (),
    request |c| {
        let mut m = Message::new();
        m.push_some("child", c.child.as_ref())
            .push_some("ike", c.ike.as_ref())
            .push_some("timeout", c.timeout_ms)
            .push_yes("init-limits", c.init_limits)
            .push_some("loglevel", c.loglevel);
        m
    },
    context |c| ctx_child_ike(&c.child, &c.ike),
    within |c| within(c.timeout_ms),
);

fn ctx_child_ike(child: &Option<String>, ike: &Option<String>) -> String {
    let mut parts = Vec::new();
    if let Some(c) = child {
        parts.push(format!("child={c}"));
    }
    if let Some(i) = ike {
        parts.push(format!("ike={i}"));
    }
    parts.join(" ")
}

/// `terminate`: closes a child or an IKE_SA (by name or unique id).
#[derive(Debug, Clone, Default)]
pub struct Terminate {
    pub child: Option<String>,
    pub ike: Option<String>,
    pub child_id: Option<u64>,
    pub ike_id: Option<u64>,
    /// Delete the IKE_SA without waiting for the peer's answer.
    pub force: bool,
    pub timeout_ms: Option<i64>,
    pub loglevel: Option<i32>,
}

/// Result of `terminate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Terminated {
    pub matches: u32,
    pub terminated: u32,
}

command!(
    Terminate, "terminate" -> Terminated,
    request |c| {
        let mut m = Message::new();
        m.push_some("child", c.child.as_ref())
            .push_some("ike", c.ike.as_ref())
            .push_some("child-id", c.child_id)
            .push_some("ike-id", c.ike_id)
            .push_yes("force", c.force)
            .push_some("timeout", c.timeout_ms)
            .push_some("loglevel", c.loglevel);
        m
    },
    context |c| ctx_child_ike(&c.child, &c.ike),
    within |c| within(c.timeout_ms),
    answer |m| Ok(Terminated {
        matches: opt_num(m, "terminate", "matches")?.unwrap_or(0),
        terminated: opt_num(m, "terminate", "terminated")?.unwrap_or(0),
    }),
);

/// `rekey`: rekeys a child or an IKE_SA (queued: the answer precedes the rekey events).
#[derive(Debug, Clone, Default)]
pub struct Rekey {
    pub child: Option<String>,
    pub ike: Option<String>,
    /// Reauthenticate instead of rekeying (IKE_SA).
    pub reauth: bool,
}

command!(
    Rekey, "rekey" -> u32,
    request |c| {
        let mut m = Message::new();
        m.push_some("child", c.child.as_ref())
            .push_some("ike", c.ike.as_ref())
            .push_yes("reauth", c.reauth);
        m
    },
    context |c| ctx_child_ike(&c.child, &c.ike),
    answer |m| Ok(opt_num(m, "rekey", "matches")?.unwrap_or(0)),
);

// ---------------------------------------------------------------------------------------
// events

/// An event as received (any name), see [`SaEvent::parse`] for the typed SA events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub message: Message,
}

/// The SA lifecycle events the driver watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaEvent {
    /// `ike-updown`: an IKE_SA came up (`up`) or went down.
    IkeUpdown { up: bool, sa: IkeSa },
    /// `child-updown`: a CHILD_SA of `sa` came up or went down (`sa.child_sas`).
    ChildUpdown { up: bool, sa: IkeSa },
    /// `ike-rekey`: an IKE_SA was replaced.
    IkeRekey { old: Box<IkeSa>, new: Box<IkeSa> },
    /// `child-rekey`: a CHILD_SA of `ike` was replaced.
    ChildRekey {
        ike: IkeSa,
        old: Box<ChildSa>,
        new: Box<ChildSa>,
    },
}

impl SaEvent {
    /// Event names to register for [`SaEvent`]s.
    pub const NAMES: [&'static str; 4] = ["ike-updown", "child-updown", "ike-rekey", "child-rekey"];

    /// `Ok(None)` for events that are not SA lifecycle events.
    pub fn parse(ev: &Event) -> Result<Option<Self>, ParseError> {
        let m = &ev.message;
        let n = ev.name.as_str();
        let first = || {
            m.sections()
                .next()
                .ok_or_else(|| perr(n, "<ike-sa section>", "is missing"))
        };
        Ok(Some(match n {
            "ike-updown" | "child-updown" => {
                let (name, s) = first()?;
                let up = yes(m, "up");
                let sa = IkeSa::parse(name, s, n)?;
                if n == "ike-updown" {
                    SaEvent::IkeUpdown { up, sa }
                } else {
                    SaEvent::ChildUpdown { up, sa }
                }
            }
            "ike-rekey" => {
                let (name, s) = first()?;
                let old = s
                    .section("old")
                    .ok_or_else(|| perr(n, "old", "is missing"))?;
                let new = s
                    .section("new")
                    .ok_or_else(|| perr(n, "new", "is missing"))?;
                SaEvent::IkeRekey {
                    old: Box::new(IkeSa::parse(name, old, n)?),
                    new: Box::new(IkeSa::parse(name, new, n)?),
                }
            }
            "child-rekey" => {
                let (name, s) = first()?;
                let ike = IkeSa::parse(name, s, n)?;
                let (ck, cs) = s
                    .section("child-sas")
                    .and_then(|c| c.sections().next())
                    .ok_or_else(|| perr(n, "child-sas", "is missing"))?;
                let old = cs
                    .section("old")
                    .ok_or_else(|| perr(n, "child-sas.old", "is missing"))?;
                let new = cs
                    .section("new")
                    .ok_or_else(|| perr(n, "child-sas.new", "is missing"))?;
                SaEvent::ChildRekey {
                    ike,
                    old: Box::new(ChildSa::parse(ck, old, n)?),
                    new: Box::new(ChildSa::parse(ck, new, n)?),
                }
            }
            _ => return Ok(None),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_shared_never_prints_the_secret() {
        let ls = LoadShared {
            id: "k".into(),
            kind: SharedKeyType::Ike,
            data: Zeroizing::new(b"s3cr3t-value".to_vec()),
            owners: vec!["a".into()],
        };
        let all = format!("{ls:?} {:?} {}", ls.to_message(), ls.context());
        assert!(!all.contains("s3cr3t"), "{all}");
    }

    #[test]
    fn child_options_encode_as_charon_expects() {
        let mut c =
            ChildConfig::tunnel("c", vec!["10.0.1.0/24".into()], vec!["10.0.2.0/24".into()]);
        c.policies = false;
        c.mark_in = Some((0x100, 0xff00));
        c.reqid = Some(4097);
        let m = c.to_message();
        assert_eq!(m.str("policies"), Some("no"));
        assert_eq!(m.str("mark_in"), Some("0x100/0xff00"));
        assert_eq!(m.str("reqid"), Some("4097"));
        assert_eq!(m.str("mode"), Some("tunnel"));
        assert!(m.get("esp_proposals").is_none());
    }
}
