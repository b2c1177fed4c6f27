//! Server access control lists (`m.room.server_acl`,
//! <https://spec.matrix.org/latest/client-server-api/#server-access-control-lists-acls-for-rooms>):
//! a server the room's ACL denies may not send it events or ask anything about it.

use serde_json::Value;

use crate::error::{ApiResult, Error};
use crate::rooms::{self, Room};
use crate::state::AppState;

/// Most entries of `allow` and `deny` looked at (the rest is ignored).
const MAX_ENTRIES: usize = 1000;

/// Whether `content` (an `m.room.server_acl` content) lets `server` (its name, with or without
/// a port) take part.
pub fn allows(content: &Value, server: &str) -> bool {
    let host = host_of(server);
    let is_ip = host.starts_with('[') || host.parse::<std::net::Ipv4Addr>().is_ok();
    if is_ip && content.get("allow_ip_literals").and_then(Value::as_bool) == Some(false) {
        return false;
    }
    let list = |key: &str| -> Vec<&str> {
        content
            .get(key)
            .and_then(Value::as_array)
            .map_or_else(Vec::new, |a| a.iter().take(MAX_ENTRIES).filter_map(Value::as_str).collect())
    };
    if list("deny").iter().any(|p| crate::glob::matches(p, host, true)) {
        return false;
    }
    list("allow").iter().any(|p| crate::glob::matches(p, host, true))
}

/// The host of a server name: without its port (IPv6 literals keep their brackets).
fn host_of(server: &str) -> &str {
    if server.starts_with('[') {
        return server.find(']').map_or(server, |i| &server[..=i]);
    }
    server.rsplit_once(':').map_or(server, |(h, _)| h)
}

/// 403 `M_FORBIDDEN` if the room's ACL denies `server`.
pub async fn check(state: &AppState, room: &Room, server: &ruma::ServerName) -> ApiResult<()> {
    match rooms::current_content(state, room, "m.room.server_acl", "").await? {
        Some(content) if !allows(&content, server.as_str()) => {
            Err(Error::forbidden(format!("Server {server} is denied by the room's server ACL")))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn acl_rules() {
        let acl = json!({ "allow": ["*"], "deny": ["evil.example", "*.bad.example"], "allow_ip_literals": false });
        assert!(allows(&acl, "good.example"));
        assert!(allows(&acl, "good.example:8448"));
        assert!(!allows(&acl, "evil.example:8448"));
        assert!(!allows(&acl, "x.bad.example"));
        assert!(!allows(&acl, "127.0.0.1:8448"));
        assert!(!allows(&acl, "[::1]:8448"));
        // No `allow`: nobody.
        assert!(!allows(&json!({}), "good.example"));
        assert!(allows(&json!({ "allow": ["127.0.0.?"] }), "127.0.0.1:1234"));
    }
}
