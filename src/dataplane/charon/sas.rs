//! The SAs of one conn as `list-sas` shows them, summarised for the driver: up, connecting,
//! duplicates to close, traffic counters. Pure.

use super::types::{ChildSa, IkeSa};

/// The SAs of one conn, as far as the driver cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnSas {
    /// An IKE_SA carries an installed (or rekeying) child of this conn.
    pub up: bool,
    /// An IKE_SA of this conn is being set up, or its child is.
    pub connecting: bool,
    /// Unique ids of every IKE_SA of this conn.
    pub ike_ids: Vec<u64>,
    /// IKE_SAs that duplicate the one kept (each with an installed child): terminate them
    /// (the initiator side does; see [`conn_sas`]).
    pub duplicates: Vec<u64>,
    pub bytes_in: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub packets_out: u64,
}

fn child_up(c: &ChildSa) -> bool {
    matches!(
        c.state.as_str(),
        "INSTALLED" | "UPDATING" | "REKEYING" | "REKEYED"
    )
}

fn child_connecting(c: &ChildSa) -> bool {
    matches!(c.state.as_str(), "CREATED" | "INSTALLING" | "RETRYING")
}

/// Summarises `list-sas` for conn `name`. Duplicates: when several ESTABLISHED IKE_SAs
/// carry an installed child, the one kept is the newest this side initiated (else the
/// newest); the others are listed in `duplicates`.
pub fn conn_sas(name: &str, sas: &[IkeSa]) -> ConnSas {
    let mut s = ConnSas::default();
    let mut carrying: Vec<&IkeSa> = Vec::new();
    for ike in sas.iter().filter(|i| i.name == name) {
        s.ike_ids.push(ike.uniqueid);
        let mine: Vec<&ChildSa> = ike.child_sas.iter().filter(|c| c.name == name).collect();
        let up = mine.iter().any(|c| child_up(c));
        for c in mine.iter().filter(|c| child_up(c)) {
            s.bytes_in += c.bytes_in;
            s.packets_in += c.packets_in;
            s.bytes_out += c.bytes_out;
            s.packets_out += c.packets_out;
        }
        match ike.state.as_str() {
            "CONNECTING" | "CREATED" => s.connecting = true,
            "ESTABLISHED" | "REKEYING" | "REKEYED" | "PASSIVE" => {
                if up {
                    s.up = true;
                    if ike.state == "ESTABLISHED" {
                        carrying.push(ike);
                    }
                } else if mine.iter().any(|c| child_connecting(c)) {
                    s.connecting = true;
                }
            }
            _ => {}
        }
    }
    if carrying.len() > 1 {
        let keep = carrying
            .iter()
            .max_by_key(|i| (i.initiator, i.uniqueid))
            .map(|i| i.uniqueid);
        s.duplicates = carrying
            .iter()
            .map(|i| i.uniqueid)
            .filter(|id| Some(*id) != keep)
            .collect();
        s.duplicates.sort();
    }
    if s.up {
        s.connecting = false;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::charon::test_fixtures::fixture_events;

    fn ike(name: &str, id: u64, state: &str, initiator: bool, child: Option<&str>) -> IkeSa {
        IkeSa {
            name: name.into(),
            uniqueid: id,
            state: state.into(),
            initiator,
            child_sas: child
                .map(|st| ChildSa {
                    key: format!("{name}-{id}"),
                    name: name.into(),
                    uniqueid: id,
                    reqid: 1,
                    state: st.into(),
                    mode: "TUNNEL".into(),
                    protocol: "ESP".into(),
                    encap: true,
                    bytes_in: 10,
                    packets_in: 1,
                    bytes_out: 20,
                    packets_out: 2,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn sa_states_and_duplicates() {
        let n = "ipsec-mesh-host-b";
        assert_eq!(conn_sas(n, &[]), ConnSas::default());
        let s = conn_sas(n, &[ike(n, 1, "CONNECTING", true, None)]);
        assert!(s.connecting && !s.up);
        // IKE up without its child (kernel without ESP): missing, not connecting
        let s = conn_sas(n, &[ike(n, 1, "ESTABLISHED", true, None)]);
        assert!(!s.connecting && !s.up);
        let s = conn_sas(
            n,
            &[
                ike(n, 1, "ESTABLISHED", false, Some("INSTALLED")),
                ike(n, 2, "ESTABLISHED", true, Some("INSTALLED")),
                ike(n, 3, "ESTABLISHED", false, Some("INSTALLED")),
                ike(
                    "ipsec-mesh-host-c",
                    4,
                    "ESTABLISHED",
                    true,
                    Some("INSTALLED"),
                ),
            ],
        );
        assert!(s.up && !s.connecting);
        assert_eq!(s.ike_ids, vec![1, 2, 3]);
        assert_eq!(
            s.duplicates,
            vec![1, 3],
            "keeps the one this side initiated"
        );
        assert_eq!((s.packets_in, s.bytes_out), (3, 60));
    }

    // --- against real charon output (vici-fixtures/, charon-systemd 5.9.8)

    #[test]
    fn listed_fixture_sas_are_up() {
        use crate::dataplane::charon::types::{ListSas, StreamCommand};
        let sas: Vec<IkeSa> = fixture_events("10-list-sas", "list-sa")
            .iter()
            .flat_map(|m| ListSas::parse_event(m).unwrap())
            .collect();
        let s = conn_sas("ipsec-mesh-host-b", &sas);
        assert!(s.up && !s.connecting && s.duplicates.is_empty(), "{s:?}");
        assert_eq!((s.packets_in, s.packets_out), (1, 1));
        assert_eq!(conn_sas("ipsec-mesh-host-c", &sas), ConnSas::default());
    }
}
