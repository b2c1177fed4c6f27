//! Server names inside Matrix IDs. A user ID, room alias, (old) room or event ID, or media ID is
//! `<sigil><localpart>:<server name>`; the server name is everything after the *first* colon
//! (localparts have none), and is any form the spec allows: `host`, `host:port`, an IPv4 literal
//! or a bracketed IPv6 literal, each with or without a port. Parsing is ruma's `ServerName`.

use ruma::ServerName;

/// The server name of a sigilled ID (`@user:server`, `#alias:server`, `!room:server`,
/// `$event:server`), `None` if the ID has no valid server name.
pub fn server_of(id: &str) -> Option<&ServerName> {
    let rest = id.strip_prefix(['@', '#', '!', '$'])?;
    let (local, server) = rest.split_once(':')?;
    if local.is_empty() {
        return None;
    }
    <&ServerName>::try_from(server).ok()
}

/// The localpart of a sigilled ID whose server name is `server_name`; `None` otherwise.
pub fn local_part<'a>(id: &'a str, server_name: &str) -> Option<&'a str> {
    let rest = id.strip_prefix(['@', '#', '!', '$'])?;
    let (local, server) = rest.split_once(':')?;
    (!local.is_empty() && server == server_name && ServerName::parse(server).is_ok()).then_some(local)
}

/// The server name of a media ID's authority (`mxc://<server>/<id>` gives `<server>`).
pub fn parse(server: &str) -> Option<&ServerName> {
    <&ServerName>::try_from(server).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_server_name() {
        for (id, server) in [
            ("@a:ville.fr", "ville.fr"),
            ("@a:ville.fr:8448", "ville.fr:8448"),
            ("@a:1.2.3.4", "1.2.3.4"),
            ("@a:1.2.3.4:8448", "1.2.3.4:8448"),
            ("@a:[::1]", "[::1]"),
            ("@a:[::1]:8448", "[::1]:8448"),
            ("@a:[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("#salon:[::1]:8448", "[::1]:8448"),
            ("!abc:127.0.0.1:9000", "127.0.0.1:9000"),
            ("$ev:localhost", "localhost"),
        ] {
            assert_eq!(server_of(id).map(|s| s.as_str()), Some(server), "{id}");
        }
        let s = server_of("@a:[::1]:8448").unwrap();
        assert!(s.is_ip_literal());
        assert_eq!(s.port(), Some(8448));
        assert_eq!(s.host(), "[::1]");
    }

    #[test]
    fn invalid_server_names() {
        for id in [
            "a:ville.fr",
            "@:ville.fr",
            "@a",
            "@a:",
            "@a:ville.fr:",
            "@a:ville.fr:99999",
            "@a:[::1",
            "@a:::1",
            "@a:ville fr",
            "@a:ville.fr/x",
        ] {
            assert!(server_of(id).is_none(), "{id}");
        }
    }

    #[test]
    fn local_parts() {
        assert_eq!(local_part("@a:[::1]:8448", "[::1]:8448"), Some("a"));
        assert_eq!(local_part("#salon:1.2.3.4:8448", "1.2.3.4:8448"), Some("salon"));
        assert_eq!(local_part("@a:1.2.3.4:8448", "1.2.3.4"), None);
        assert_eq!(local_part("@a:1.2.3.4", "1.2.3.4:8448"), None);
        assert_eq!(local_part("@:1.2.3.4", "1.2.3.4"), None);
    }
}
