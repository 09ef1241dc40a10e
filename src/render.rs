//! Human-readable rendering of plans.

use std::fmt::Write;

use crate::plan::Plan;

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&width).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let _ = write!(s, "{c:<w$}");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn join<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        "-".to_string()
    } else {
        v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }
}

/// The plan as a summary line and a table of peers.
pub fn plan_table(p: &Plan) -> String {
    let mut out = format!(
        "host {} ({})  backend {}  transform {}{}  mtu {} (underlay {})  subnets {}\n",
        p.host,
        p.endpoint,
        p.backend,
        p.transform,
        if p.udp_encap { "+udp-encap" } else { "" },
        p.mtu,
        p.underlay_mtu,
        join(&p.subnets),
    );
    if p.peers.is_empty() {
        out.push_str("no peers\n");
        return out;
    }
    let with_keys = p.peers.iter().any(|x| x.key_out_id.is_some());
    let mut header = vec!["PEER", "ENDPOINT", "SUBNETS", "REQID", "SPI_OUT", "SPI_IN"];
    if with_keys {
        header.extend(["KEY_OUT_ID", "KEY_IN_ID"]);
    }
    let rows: Vec<Vec<String>> = p
        .peers
        .iter()
        .map(|x| {
            let mut r = vec![
                x.host.to_string(),
                x.endpoint.to_string(),
                join(&x.subnets),
                format!("{:#010x}", x.reqid),
                format!("{:#010x}", x.spi_out),
                format!("{:#010x}", x.spi_in),
            ];
            if with_keys {
                r.push(x.key_out_id.clone().unwrap_or_default());
                r.push(x.key_in_id.clone().unwrap_or_default());
            }
            r
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_columns() {
        let t = super::table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
