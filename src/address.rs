//! Server addresses as people type them (`--server`, `DELTASYNC_SERVER`): `HOST[:PORT]`, the port
//! 7700 when left out, checked in one place so every command reads them alike.

use std::net::Ipv6Addr;

/// The port `deltasync serve` listens on by default, and the one a `--server HOST` means.
pub const DEFAULT_PORT: u16 = 7700;

/// Checks a server address and gives it back as `HOST:PORT` (`[V6]:PORT` for IPv6). A URL
/// (`http://…`), an empty host, a bad port or stray characters are refused with the expected form.
pub fn parse(s: &str) -> Result<String, String> {
    let bad = |why: &str| {
        format!(
            "`{s}` is not a server address ({why}); give HOST[:PORT], e.g. `192.168.1.5:7700`, \
             `backup.example.org` (port {DEFAULT_PORT} by default) or `[::1]:7700`"
        )
    };
    let t = s.trim();
    if t.contains("://") {
        return Err(bad("deltasync speaks its own protocol over TLS, not a URL: leave out the scheme"));
    }
    if t.contains('/') || t.contains('@') || t.chars().any(char::is_whitespace) {
        return Err(bad("unexpected `/`, `@` or space"));
    }
    let (host, port) = if let Some(rest) = t.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return Err(bad("`[` without `]`")) };
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address inside `[...]`"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("only `:PORT` may follow `]`"))?),
        };
        (format!("[{v6}]"), port)
    } else if t.parse::<Ipv6Addr>().is_ok() {
        // A bare IPv6 address: every colon is part of it.
        (format!("[{t}]"), None)
    } else {
        match t.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(bad("too many `:`; write an IPv6 address as `[ADDR]:PORT`"));
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (t.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !host.starts_with('[') {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if host.len() > 253 || !host.trim_end_matches('.').split('.').all(label_ok) {
            return Err(bad("the host is not a name or an IP address"));
        }
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        },
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn addresses_get_the_default_port_and_keep_a_given_one() {
        for (given, want) in [
            ("127.0.0.1", "127.0.0.1:7700"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("backup.example.org", "backup.example.org:7700"),
            ("backup.example.org.", "backup.example.org.:7700"),
            ("nas:7701", "nas:7701"),
            ("my_host", "my_host:7700"),
            ("[::1]", "[::1]:7700"),
            ("[::1]:7701", "[::1]:7701"),
            ("::1", "[::1]:7700"),
            ("fe80::1", "[fe80::1]:7700"),
            (" 10.0.0.2:7700 ", "10.0.0.2:7700"),
        ] {
            assert_eq!(parse(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn urls_and_malformed_addresses_are_refused_with_the_expected_form() {
        for bad in [
            "http://127.0.0.1:7700",
            "https://backup.example.org",
            "a:b:c",
            "127.0.0.1:99999",
            "127.0.0.1:0",
            "127.0.0.1:",
            "127.0.0.1:port",
            ":7700",
            "",
            "host/path",
            "user@host",
            "[::1",
            "[nope]:7700",
            "[::1]7700",
            "-host",
            "a..b",
            "two words",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("HOST[:PORT]") && e.contains("192.168.1.5:7700"), "{bad}: {e}");
        }
        assert!(parse("http://x").unwrap_err().contains("leave out the scheme"));
    }
}
