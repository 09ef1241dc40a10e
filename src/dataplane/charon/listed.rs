//! How charon lists a conn back (`list-conns`), normalised so that it compares equal to
//! what was loaded. charon spells some values differently from how they are loaded:
//! `version = 2` lists as `IKEv2`, `unique = replace` as `UNIQUE_REPLACE`, the actions
//! `restart` as `start` and `clear` as `none`, identities without their type prefix, traffic
//! selectors in canonical form. [`ListedConn::parse`] reads a listing, [`ListedConn::of`]
//! predicts one from a config, [`ListedConn::differences`] names what differs. Pure; tested
//! against real charon output (`vici-fixtures/`).

use ipnet::IpNet;

use super::types::{ConnConfig, SaAction, Unique};
use super::wire::Message;

/// An identity as charon lists it: without the `fqdn:` / `dns:` type prefix.
pub fn listed_identity(id: &str) -> &str {
    for p in ["fqdn:", "dns:"] {
        if id.len() > p.len() && id[..p.len()].eq_ignore_ascii_case(p) {
            return &id[p.len()..];
        }
    }
    id
}

/// A conn as `list-conns` shows it, normalised so that it compares equal to what
/// [`ListedConn::of`] predicts from a config (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListedConn {
    pub name: String,
    pub local_addrs: Vec<String>,
    pub remote_addrs: Vec<String>,
    pub version: String,
    pub rekey_time: u64,
    pub reauth_time: u64,
    pub unique: String,
    /// 0 when charon omits it (DPD off).
    pub dpd_delay: u64,
    /// `dpd_timeout`: the digest carrier; 0 when absent.
    pub digest: u64,
    pub local_ids: Vec<String>,
    pub remote_ids: Vec<String>,
    pub children: Vec<ListedChild>,
}

/// A child of a [`ListedConn`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListedChild {
    pub name: String,
    pub mode: String,
    pub rekey_time: u64,
    pub dpd_action: String,
    pub close_action: String,
    /// Canonical and sorted.
    pub local_ts: Vec<String>,
    pub remote_ts: Vec<String>,
}

fn num(m: &Message, k: &str) -> u64 {
    m.str(k).and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

/// A traffic selector in canonical form (host bits cleared, prefix kept); anything that
/// is not a plain prefix (ranges, `dynamic`, protocol/port suffixes) is kept as is.
pub fn normalise_ts(ts: &str) -> String {
    match ts.parse::<IpNet>() {
        Ok(n) => n.trunc().to_string(),
        Err(_) => match ts.parse::<std::net::IpAddr>() {
            Ok(a) => IpNet::from(a).to_string(),
            Err(_) => ts.to_string(),
        },
    }
}

/// Traffic selectors normalised, sorted, without duplicates.
pub(super) fn sorted_ts<S: AsRef<str>>(v: &[S]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|s| normalise_ts(s.as_ref())).collect();
    out.sort();
    out.dedup();
    out
}

/// `dpd_action` / `close_action` as charon lists it.
pub fn listed_action(a: SaAction) -> &'static str {
    match a {
        SaAction::None | SaAction::Clear => "none",
        SaAction::Trap => "trap",
        SaAction::Restart => "start",
    }
}

impl ListedConn {
    /// What `list-conns` shows for a conn loaded from `c` with `digest` in `dpd_timeout`.
    pub fn of(c: &ConnConfig, digest: u32) -> ListedConn {
        ListedConn {
            name: c.name.clone(),
            local_addrs: c.local_addrs.clone(),
            remote_addrs: c.remote_addrs.clone(),
            version: match c.version {
                1 => "IKEv1",
                2 => "IKEv2",
                _ => "IKEv1/2",
            }
            .into(),
            rekey_time: c.rekey_time.unwrap_or(0).into(),
            reauth_time: c.reauth_time.unwrap_or(0).into(),
            unique: match c.unique.unwrap_or(Unique::No) {
                Unique::No => "UNIQUE_NO",
                Unique::Never => "UNIQUE_NEVER",
                Unique::Keep => "UNIQUE_KEEP",
                Unique::Replace => "UNIQUE_REPLACE",
            }
            .into(),
            dpd_delay: c.dpd_delay.unwrap_or(0).into(),
            digest: digest.into(),
            local_ids: c
                .local
                .id
                .iter()
                .map(|i| listed_identity(i).to_string())
                .collect(),
            remote_ids: c
                .remote
                .id
                .iter()
                .map(|i| listed_identity(i).to_string())
                .collect(),
            children: c
                .children
                .iter()
                .map(|ch| ListedChild {
                    name: ch.name.clone(),
                    mode: ch.mode.as_str().to_ascii_uppercase(),
                    rekey_time: ch.rekey_time.unwrap_or(0).into(),
                    dpd_action: listed_action(ch.dpd_action).into(),
                    close_action: listed_action(ch.close_action).into(),
                    local_ts: sorted_ts(&ch.local_ts),
                    remote_ts: sorted_ts(&ch.remote_ts),
                })
                .collect(),
        }
    }

    /// Parses one conn section of a `list-conn` event.
    pub fn parse(name: &str, m: &Message) -> ListedConn {
        let ids = |prefix: &str| -> Vec<String> {
            let mut rounds: Vec<(u32, String)> = m
                .sections()
                .filter_map(|(k, s)| {
                    let n = k.strip_prefix(prefix)?.parse::<u32>().ok()?;
                    Some((n, s.str("id").unwrap_or("%any").to_string()))
                })
                .collect();
            rounds.sort();
            rounds.into_iter().map(|(_, id)| id).collect()
        };
        let children = m
            .section("children")
            .map(|ch| {
                ch.sections()
                    .map(|(cn, c)| ListedChild {
                        name: cn.to_string(),
                        mode: c.str("mode").unwrap_or_default().to_string(),
                        rekey_time: num(c, "rekey_time"),
                        dpd_action: c.str("dpd_action").unwrap_or_default().to_string(),
                        close_action: c.str("close_action").unwrap_or_default().to_string(),
                        local_ts: sorted_ts(&c.list("local-ts").unwrap_or_default()),
                        remote_ts: sorted_ts(&c.list("remote-ts").unwrap_or_default()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ListedConn {
            name: name.to_string(),
            local_addrs: m.list("local_addrs").unwrap_or_default(),
            remote_addrs: m.list("remote_addrs").unwrap_or_default(),
            version: m.str("version").unwrap_or_default().to_string(),
            rekey_time: num(m, "rekey_time"),
            reauth_time: num(m, "reauth_time"),
            unique: m.str("unique").unwrap_or_default().to_string(),
            dpd_delay: num(m, "dpd_delay"),
            digest: num(m, "dpd_timeout"),
            local_ids: ids("local-"),
            remote_ids: ids("remote-"),
            children,
        }
    }

    /// Every conn of one `list-conn` event message.
    pub fn parse_event(m: &Message) -> Vec<ListedConn> {
        m.sections()
            .map(|(name, s)| ListedConn::parse(name, s))
            .collect()
    }

    /// Names of the fields that differ from `want` (empty = same), for change lines.
    pub fn differences(&self, want: &ListedConn) -> Vec<String> {
        let mut d = Vec::new();
        macro_rules! cmp {
            ($($f:ident),*) => {$(
                if self.$f != want.$f {
                    d.push(format!("{}: {:?} -> {:?}", stringify!($f), self.$f, want.$f));
                }
            )*};
        }
        cmp!(
            local_addrs,
            remote_addrs,
            version,
            rekey_time,
            reauth_time,
            unique,
            dpd_delay,
            local_ids,
            remote_ids
        );
        if self.children.len() != want.children.len() {
            d.push(format!(
                "children: {:?} -> {:?}",
                self.children.iter().map(|c| &c.name).collect::<Vec<_>>(),
                want.children.iter().map(|c| &c.name).collect::<Vec<_>>()
            ));
        } else {
            for (h, w) in self.children.iter().zip(&want.children) {
                macro_rules! ccmp {
                    ($($f:ident),*) => {$(
                        if h.$f != w.$f {
                            d.push(format!("child {}: {:?} -> {:?}", stringify!($f), h.$f, w.$f));
                        }
                    )*};
                }
                ccmp!(
                    name,
                    mode,
                    rekey_time,
                    dpd_action,
                    close_action,
                    local_ts,
                    remote_ts
                );
            }
        }
        if d.is_empty() && self.digest != want.digest {
            d.push("settings list-conns does not show (proposals, encap, policies, ...)".into());
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::charon::test_fixtures::fixture_events;
    use crate::dataplane::charon::types::{AuthConfig, ChildConfig};

    #[test]
    fn normalisation() {
        assert_eq!(normalise_ts("10.42.1.7/24"), "10.42.1.0/24");
        assert_eq!(normalise_ts("10.42.1.7"), "10.42.1.7/32");
        assert_eq!(normalise_ts("fd00::1/64"), "fd00::/64");
        assert_eq!(normalise_ts("dynamic"), "dynamic");
        assert_eq!(listed_identity("fqdn:host-a"), "host-a");
        assert_eq!(listed_identity("FQDN:host-a"), "host-a");
        assert_eq!(listed_identity("host-a"), "host-a");
        assert_eq!(listed_action(SaAction::Restart), "start");
        assert_eq!(listed_action(SaAction::Clear), "none");
    }

    // --- against real charon output (vici-fixtures/, charon-systemd 5.9.8)

    /// The conn vici-fixtures/capture.sh loaded in 06-load-conn (without a digest).
    fn fixture_conn() -> ConnConfig {
        let n = "ipsec-mesh-host-b";
        let mut c = ConnConfig::ikev2(n, AuthConfig::psk("host-a"), AuthConfig::psk("host-b"));
        c.local_addrs = vec!["192.168.77.1".into()];
        c.remote_addrs = vec!["192.168.77.2".into()];
        c.proposals = vec!["aes256gcm16-prfsha256-ecp256".into()];
        c.mobike = false;
        c.unique = Some(Unique::Replace);
        c.dpd_delay = Some(30);
        c.rekey_time = Some(14400);
        let mut ch =
            ChildConfig::tunnel(n, vec!["10.42.1.0/24".into()], vec!["10.42.2.0/24".into()]);
        ch.esp_proposals = vec!["aes256gcm16".into()];
        ch.rekey_time = Some(3600);
        ch.dpd_action = SaAction::Restart;
        c.children = vec![ch];
        c
    }

    #[test]
    fn listed_fixture_conn_normalises_to_what_was_loaded() {
        let ev = fixture_events("08-list-conns", "list-conn");
        assert_eq!(ev.len(), 1);
        let listed = ListedConn::parse_event(&ev[0]);
        assert_eq!(listed.len(), 1);
        let l = &listed[0];
        // charon's spelling differs from what was loaded...
        assert_eq!(
            (l.version.as_str(), l.unique.as_str()),
            ("IKEv2", "UNIQUE_REPLACE")
        );
        assert_eq!(l.children[0].dpd_action, "start");
        // ...and normalisation makes them compare equal
        let want = ListedConn::of(&fixture_conn(), 0);
        assert_eq!(l.differences(&want), Vec::<String>::new());
        assert_eq!(l, &want);
        // a real difference is named
        let mut other = fixture_conn();
        other.children[0].remote_ts = vec!["10.42.3.0/24".into()];
        other.dpd_delay = Some(10);
        let d = l.differences(&ListedConn::of(&other, 0));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("dpd_delay: 30 -> 10"), "{d:?}");
        assert!(d[1].starts_with("child remote_ts"), "{d:?}");
        // only the hidden settings differ: the digest says so
        let d = l.differences(&ListedConn::of(&fixture_conn(), (1 << 30) | 7));
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("does not show"));
    }
}
