//! The kernel's XFRM error counters, `/proc/net/xfrm_stat` (`XfrmInNoStates`,
//! `XfrmOutNoStates`, ...).
//!
//! `/proc/net` is the network namespace of the process's main thread: a thread that entered
//! another namespace would have to read `/proc/thread-self/net/xfrm_stat`.

/// Where the counters are read.
pub const PATH: &str = "/proc/net/xfrm_stat";

/// The counters as (name, value) pairs, in the kernel's order (empty when absent).
pub fn read() -> Vec<(String, u64)> {
    std::fs::read_to_string(PATH)
        .map(|s| parse(&s))
        .unwrap_or_default()
}

/// Parses the text of [`PATH`]: one `name value` pair a line; other lines are skipped.
pub fn parse(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        let v = parse("XfrmInError             \t0\nXfrmOutNoStates         \t4\n");
        assert_eq!(
            v,
            vec![("XfrmInError".into(), 0), ("XfrmOutNoStates".into(), 4)]
        );
    }
}
