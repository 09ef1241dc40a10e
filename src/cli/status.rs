//! `ipsec-mesh status`: ask a running sidecar and print its status.

use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::Args;

use ipsec_mesh::daemon::server::{self, Listen};
use ipsec_mesh::render;

use super::Format;

#[derive(Args, Debug)]
pub struct StatusCmd {
    /// Where the sidecar listens (host:port or unix:/path).
    #[arg(long, default_value = server::DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: String,

    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn run(cmd: StatusCmd) -> Result<ExitCode> {
    let body = server::get(&Listen::parse(&cmd.listen), "/status").map_err(|e| anyhow!(e))?;
    if cmd.format == Format::Json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let host = v["host"].as_str().unwrap_or("?");
    let driver = match v["firewall"].as_str() {
        Some(f) => format!("{}  firewall {f}", v["driver"].as_str().unwrap_or("?")),
        None => v["driver"].as_str().unwrap_or("?").to_string(),
    };
    let md = &v["metadata"];
    println!(
        "host {host}  driver {driver}  metadata {} (version {})  reconciles {} ({} with errors)",
        md["source"].as_str().unwrap_or("?"),
        md["version"].as_str().unwrap_or("-"),
        v["reconciles"]["count"],
        v["reconciles"]["errors"],
    );
    if let Some(e) = md["last_error"].as_str() {
        println!("metadata error (last good state kept): {e}");
    }
    for s in md["skipped"].as_array().into_iter().flatten() {
        println!(
            "metadata record left out: {}: {}",
            s["key"].as_str().unwrap_or("?"),
            s["error"].as_str().unwrap_or("?")
        );
    }
    let k = &v["keying"];
    if let Some(every) = k["rekey_every_s"].as_u64() {
        let next = k["next_rekey_at"].as_u64().unwrap_or(0);
        let now = ipsec_mesh::daemon::status::unix_now();
        let limit = match (k["rekey_bytes"].as_u64(), k["rekey_packets"].as_u64()) {
            (None, None) => "no usage limit".to_string(),
            (b, p) => format!(
                "usage limit {}{}{}",
                b.map(|b| format!("{b} bytes")).unwrap_or_default(),
                if b.is_some() && p.is_some() {
                    " or "
                } else {
                    ""
                },
                p.map(|p| format!("{p} packets")).unwrap_or_default()
            ),
        };
        let ahead: Vec<&str> = k["ahead"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.as_str())
            .collect();
        println!(
            "keys: generation {}, rekey every {every} s, next rekey at {next} (in {} s), {limit}; ahead: {}; rekeys: {} by age, {} by usage",
            k["generation"],
            next.saturating_sub(now),
            if ahead.is_empty() { "-".to_string() } else { ahead.join(",") },
            k["rekeys_age"],
            k["rekeys_usage"],
        );
    }
    for e in v["mesh_errors"].as_array().into_iter().flatten() {
        println!("error: {}", e.as_str().unwrap_or_default());
    }
    let rows: Vec<Vec<String>> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
            let n = |k: &str| p[k].as_u64().unwrap_or(0);
            vec![
                s("host"),
                s("endpoint"),
                s("state"),
                format!("{:#010x}", n("spi_out")),
                format!("{:#010x}", n("spi_in")),
                format!("{}/{}", n("packets_out"), n("packets_in")),
                format!("{}/{}", n("bytes_out"), n("bytes_in")),
                p["last_error"].as_str().unwrap_or("-").to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        render::table(
            &[
                "PEER",
                "ENDPOINT",
                "STATE",
                "SPI_OUT",
                "SPI_IN",
                "PKTS OUT/IN",
                "BYTES OUT/IN",
                "LAST ERROR"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
