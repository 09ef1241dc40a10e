//! I/O: `iptables-save` to read, `iptables-restore --noflush -w` to write, one atomic restore
//! per table, nothing written when the kernel already matches.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use tracing::{debug, info};

use super::render::{desired, diff_table, render_restore, TableState};
use super::save::parse_save;
use super::{Family, FirewallError, FirewallReport, FirewallSpec, Table};

/// The iptables tools of one family (`iptables-save`/`iptables-restore` by default; e.g.
/// `iptables-legacy-save`/`iptables-legacy-restore` to force the legacy backend).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iptables {
    pub family: Family,
    pub save: String,
    pub restore: String,
}

impl Iptables {
    pub fn new(family: Family) -> Iptables {
        Iptables {
            family,
            save: family.save_binary().to_string(),
            restore: family.restore_binary().to_string(),
        }
    }

    /// Whether the save tool can be started at all.
    pub fn available(&self) -> bool {
        !matches!(
            self.save_raw(Table::Filter),
            Err(FirewallError::MissingBinary { .. })
        )
    }

    /// `<save> -t <table>` output.
    pub fn save_raw(&self, table: Table) -> Result<String, FirewallError> {
        let command = format!("{} -t {table}", self.save);
        let out = Command::new(&self.save)
            .args(["-t", table.as_str()])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_error(&self.save, &command, e))?;
        if !out.status.success() {
            return Err(FirewallError::Save {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Our part of `table` as the kernel has it now.
    pub fn current(&self, table: Table) -> Result<TableState, FirewallError> {
        Ok(parse_save(&self.save_raw(table)?, table))
    }

    /// Feed `input` to `<restore> --noflush -w` (one transaction).
    pub fn restore(&self, table: Table, input: &str) -> Result<(), FirewallError> {
        let command = format!("{} --noflush -w", self.restore);
        let mut child = Command::new(&self.restore)
            .args(["--noflush", "-w"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error(&self.restore, &command, e))?;
        let write = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes());
        let out = child.wait_with_output().map_err(|e| FirewallError::Spawn {
            command: command.clone(),
            source: e,
        })?;
        if out.status.success() {
            if let Err(e) = write {
                return Err(FirewallError::Spawn { command, source: e });
            }
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(FirewallError::Restore {
            command,
            table,
            reason: explain_restore_error(&stderr, input),
        })
    }

    /// Make `table` match `want`; returns the writes done (none when it already matches).
    pub fn reconcile_table(
        &self,
        table: Table,
        want: &TableState,
    ) -> Result<Vec<super::Change>, FirewallError> {
        let have = self.current(table)?;
        let changes = diff_table(&have, want);
        if changes.is_empty() {
            debug!(family = %self.family, %table, "firewall table up to date");
            return Ok(changes);
        }
        let input = render_restore(table, &changes);
        debug!(family = %self.family, %table, input = %input, "iptables-restore");
        self.restore(table, &input)?;
        for c in &changes {
            info!(family = %self.family, %table, "firewall: {c}");
        }
        Ok(changes)
    }
}

fn spawn_error(binary: &str, command: &str, e: io::Error) -> FirewallError {
    if e.kind() == io::ErrorKind::NotFound {
        FirewallError::MissingBinary {
            command: binary.to_string(),
        }
    } else {
        FirewallError::Spawn {
            command: command.to_string(),
            source: e,
        }
    }
}

/// The tool's stderr in one line, plus the input line it names
/// (`line 3 failed` / `Error occurred at line: 3`) quoted.
pub fn explain_restore_error(stderr: &str, input: &str) -> String {
    let msg: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .collect();
    let mut reason = msg.join(": ");
    if reason.is_empty() {
        reason = "no error message".into();
    }
    if let Some(n) = failed_line(stderr) {
        if let Some(text) = input.lines().nth(n.saturating_sub(1)) {
            reason += &format!(" (input line {n}: `{text}`)");
        }
    }
    reason
}

fn failed_line(stderr: &str) -> Option<usize> {
    for pat in ["line ", "at line: "] {
        for (i, _) in stderr.match_indices(pat) {
            let digits: String = stderr[i + pat.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// Reconcile the firewall for `spec` with the default tools of each family: its
/// [`FirewallSpec::parts`] (iptables for the IPv4 overlay, ip6tables for the IPv6 one), and
/// nothing of ours in a family the overlay does not have (any more: a change of overlay
/// family, or dual-stack back to one family, leaves no chain of the old one). That family's
/// tools missing: nothing of ours can be there; failing (e.g. IPv6 disabled in the kernel):
/// a warning, not an error, since the overlay's own families are in place.
pub fn apply(spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
    spec.validate()?;
    let parts = spec.parts();
    let mut report = FirewallReport::default();
    for family in [Family::V4, Family::V6] {
        match parts.iter().find(|p| p.family() == family) {
            Some(part) => report.absorb(apply_with(&Iptables::new(family), part)?),
            None => match cleanup_with(&Iptables::new(family)) {
                Ok(r) => report.absorb(r),
                Err(FirewallError::MissingBinary { .. }) => {}
                Err(e) => report.warnings.push(format!(
                    "firewall: removing leftover {family} chains of ours failed: {e}"
                )),
            },
        }
    }
    Ok(report)
}

/// [`apply`] with explicit tools (their family must be the spec's).
pub fn apply_with(ipt: &Iptables, spec: &FirewallSpec) -> Result<FirewallReport, FirewallError> {
    spec.validate()?;
    if ipt.family != spec.family() {
        return Err(FirewallError::InvalidSpec(format!(
            "the overlay {} is {} but the tools are {}",
            spec.overlay,
            spec.family(),
            ipt.family
        )));
    }
    let want = desired(spec);
    let mut report = FirewallReport::default();
    for table in Table::APPLY_ORDER {
        let changes = ipt.reconcile_table(table, &want[&table])?;
        super::absorb_table(&mut report, ipt.family, table, &changes);
    }
    Ok(report)
}

/// Remove every chain and jump we own, IPv4 and IPv6, with the default tools; a family
/// whose tools are not installed is skipped. Idempotent; keeps going past failures.
pub fn cleanup() -> Result<FirewallReport, FirewallError> {
    let mut report = FirewallReport::default();
    let mut errors = Vec::new();
    for family in [Family::V4, Family::V6] {
        match cleanup_with(&Iptables::new(family)) {
            Ok(r) => report.absorb(r),
            Err(FirewallError::MissingBinary { command }) => {
                debug!(%command, "not installed: nothing of ours can exist there");
            }
            Err(FirewallError::Cleanup(es)) => errors.extend(es),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(FirewallError::Cleanup(errors))
    }
}

/// Cleanup of one family's tables (mangle first, then the guard).
pub fn cleanup_with(ipt: &Iptables) -> Result<FirewallReport, FirewallError> {
    let mut report = FirewallReport::default();
    let mut errors = Vec::new();
    for table in Table::CLEANUP_ORDER {
        match ipt.reconcile_table(table, &TableState::default()) {
            Ok(changes) => super::absorb_table(&mut report, ipt.family, table, &changes),
            Err(e @ FirewallError::MissingBinary { .. }) => return Err(e),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(report)
    } else {
        Err(FirewallError::Cleanup(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_errors_quote_the_failing_line() {
        let input = "*mangle\n-A FOO -j ACCEPT\nCOMMIT\n";
        let e = explain_restore_error(
            "iptables-restore: line 2 failed: No chain/target/match by that name.\n",
            input,
        );
        assert_eq!(
            e,
            "iptables-restore: line 2 failed: No chain/target/match by that name. \
             (input line 2: `-A FOO -j ACCEPT`)"
        );
        let e = explain_restore_error(
            "iptables-restore v1.8.9 (nf_tables): Chain 'X' does not exist\n\
             Error occurred at line: 2\n\
             Try `iptables-restore -h' or 'iptables-restore --help' for more information.\n",
            input,
        );
        assert!(e.starts_with("iptables-restore v1.8.9 (nf_tables): Chain 'X' does not exist: Error occurred at line: 2"), "{e}");
        assert!(e.ends_with("(input line 2: `-A FOO -j ACCEPT`)"), "{e}");
        assert_eq!(explain_restore_error("", input), "no error message");
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let ipt = Iptables {
            family: Family::V4,
            save: "/nonexistent/iptables-save".into(),
            restore: "/nonexistent/iptables-restore".into(),
        };
        let e = ipt.save_raw(Table::Filter).unwrap_err();
        assert!(matches!(e, FirewallError::MissingBinary { .. }));
        assert!(
            e.to_string().contains("install the iptables package"),
            "{e}"
        );
        assert!(!ipt.available());
        assert!(matches!(
            cleanup_with(&ipt),
            Err(FirewallError::MissingBinary { .. })
        ));
        let e = ipt.restore(Table::Filter, "*filter\nCOMMIT\n").unwrap_err();
        assert!(matches!(e, FirewallError::MissingBinary { .. }));
    }
}
