//! Application services (the spec's Application Service API): registrations read from
//! Synapse-format YAML files, namespaces, `as_token` authentication, and what an appservice is
//! interested in. Delivery of transactions is `sender.rs`; requests Parvis makes to an
//! appservice (user and alias queries, third-party lookups, pings) are `client.rs`.

pub mod auth;
pub mod client;
pub mod sender;
pub mod websocket;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{TokenHash, hash_token};

pub const NS_USERS: &str = "users";
pub const NS_ALIASES: &str = "aliases";
pub const NS_ROOMS: &str = "rooms";

/// Longest regex source accepted, and the compiled size limit (the `regex` crate matches in
/// linear time; this bounds memory).
const MAX_REGEX_LEN: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One entry of a namespace list.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub exclusive: bool,
    /// Anchored at the start, as Synapse's `re.match` is (not at the end).
    pub regex: Regex,
    pub source: String,
}

/// A registered application service.
#[derive(Debug)]
pub struct Registration {
    pub id: String,
    /// `None`: the appservice receives nothing (explicit `url: null`).
    pub url: Option<String>,
    pub as_token: String,
    pub hs_token: String,
    /// The full user ID of `sender_localpart`.
    pub sender: String,
    pub users: Vec<Namespace>,
    pub aliases: Vec<Namespace>,
    pub rooms: Vec<Namespace>,
    pub rate_limited: bool,
    /// `receive_ephemeral` (stable MSC2409 key in the transaction).
    pub receive_ephemeral: bool,
    /// `de.sorunome.msc2409.push_ephemeral` (unstable key in the transaction).
    pub unstable_ephemeral: bool,
    /// `org.matrix.msc3202`: device lists and key counts in transactions.
    pub msc3202: bool,
    pub protocols: Vec<String>,
    /// `parvis.websocket: true`: transactions go over the appservice's own WebSocket connection
    /// to Parvis (mautrix's `fi.mau.as_sync`, `websocket.rs`) instead of HTTP pushes to `url`.
    pub websocket: bool,
    /// The file it came from (for messages).
    pub file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    exclusive: bool,
    regex: String,
}

#[derive(Deserialize, Default)]
struct RawNamespaces {
    #[serde(default)]
    users: Vec<RawNamespace>,
    #[serde(default)]
    aliases: Vec<RawNamespace>,
    #[serde(default)]
    rooms: Vec<RawNamespace>,
}

#[derive(Deserialize)]
struct RawRegistration {
    id: String,
    url: Option<String>,
    as_token: String,
    hs_token: String,
    sender_localpart: String,
    namespaces: RawNamespaces,
    rate_limited: Option<bool>,
    #[serde(default)]
    receive_ephemeral: bool,
    #[serde(rename = "de.sorunome.msc2409.push_ephemeral", default)]
    push_ephemeral: bool,
    #[serde(rename = "org.matrix.msc3202", default)]
    msc3202: bool,
    #[serde(default)]
    protocols: Option<Vec<String>>,
    #[serde(rename = "parvis.websocket", default)]
    websocket: bool,
}

fn compile(source: &str) -> Result<Regex, String> {
    if source.len() > MAX_REGEX_LEN {
        return Err(format!("regex longer than {MAX_REGEX_LEN} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{source})"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex `{source}`: {e}"))
}

impl Registration {
    /// Parses and checks one registration file's text (`file` names it in messages).
    pub fn parse(text: &str, file: &str, server_name: &str) -> Result<Self, String> {
        let yaml: Value = serde_norway::from_str(text).map_err(|e| format!("{file}: not valid YAML: {e}"))?;
        let obj = yaml.as_object().ok_or_else(|| format!("{file}: must be a YAML mapping"))?;
        // Synapse: `url` must be a string or an explicit null, never missing (a missing URL
        // silently turning off delivery is a mistake worth refusing).
        if !obj.contains_key("url") {
            return Err(format!("{file}: `url` is required (a URL, or null for no delivery)"));
        }
        let raw: RawRegistration = serde_path_to_error::deserialize(yaml.clone())
            .map_err(|e| format!("{file}: `{}`: {}", e.path(), e.inner()))?;
        let ns = |list: Vec<RawNamespace>, kind: &str| -> Result<Vec<Namespace>, String> {
            list.into_iter()
                .map(|n| {
                    Ok(Namespace {
                        exclusive: n.exclusive,
                        regex: compile(&n.regex).map_err(|e| format!("{file}: namespaces.{kind}: {e}"))?,
                        source: n.regex,
                    })
                })
                .collect()
        };
        for (key, v) in [("id", &raw.id), ("as_token", &raw.as_token), ("hs_token", &raw.hs_token)] {
            if v.is_empty() || v.len() > 1024 {
                return Err(format!("{file}: `{key}` must be 1 to 1024 bytes"));
            }
        }
        if raw.as_token == raw.hs_token {
            return Err(format!("{file}: as_token and hs_token must differ"));
        }
        crate::users::validate_new_localpart(&raw.sender_localpart, server_name)
            .or_else(|e| {
                // Existing bridges use localparts the historical grammar allows (upper case is
                // not among them): accept what a user ID may contain.
                if raw.sender_localpart.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b':') {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|_| format!("{file}: `sender_localpart` `{}` is not a valid localpart", raw.sender_localpart))?;
        if let Some(url) = &raw.url {
            let u = url::Url::parse(url).map_err(|e| format!("{file}: `url`: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("{file}: `url` must be http or https"));
            }
        }
        Ok(Self {
            sender: format!("@{}:{server_name}", raw.sender_localpart),
            users: ns(raw.namespaces.users, NS_USERS)?,
            aliases: ns(raw.namespaces.aliases, NS_ALIASES)?,
            rooms: ns(raw.namespaces.rooms, NS_ROOMS)?,
            id: raw.id,
            url: raw.url.map(|u| u.trim_end_matches('/').to_owned()),
            as_token: raw.as_token,
            hs_token: raw.hs_token,
            rate_limited: raw.rate_limited.unwrap_or(true),
            receive_ephemeral: raw.receive_ephemeral,
            unstable_ephemeral: raw.push_ephemeral,
            msc3202: raw.msc3202,
            protocols: raw.protocols.unwrap_or_default(),
            websocket: raw.websocket,
            file: file.to_owned(),
        })
    }

    fn matches<'a>(list: &'a [Namespace], value: &str) -> Option<&'a Namespace> {
        list.iter().find(|n| n.regex.is_match(value))
    }

    /// In the user namespace, or the appservice's own sender.
    pub fn is_interested_in_user(&self, user_id: &str) -> bool {
        user_id == self.sender || Self::matches(&self.users, user_id).is_some()
    }

    /// Whether this appservice may act as `user_id` (its sender or a user of its namespace).
    pub fn can_control(&self, user_id: &str) -> bool {
        self.is_interested_in_user(user_id)
    }

    pub fn is_exclusive_user(&self, user_id: &str) -> bool {
        user_id == self.sender || Self::matches(&self.users, user_id).is_some_and(|n| n.exclusive)
    }

    pub fn is_alias_in_namespace(&self, alias: &str) -> bool {
        Self::matches(&self.aliases, alias).is_some()
    }

    pub fn is_exclusive_alias(&self, alias: &str) -> bool {
        Self::matches(&self.aliases, alias).is_some_and(|n| n.exclusive)
    }

    pub fn is_room_in_namespace(&self, room_id: &str) -> bool {
        Self::matches(&self.rooms, room_id).is_some()
    }

    pub fn wants_ephemeral(&self) -> bool {
        self.receive_ephemeral || self.unstable_ephemeral
    }

    /// Whether transactions are built for it at all: it has a URL to push to, or it connects
    /// over the WebSocket transport.
    pub fn delivers(&self) -> bool {
        self.url.is_some() || self.websocket
    }
}

/// Every registered appservice, with lookups by token and ID.
#[derive(Default, Debug)]
pub struct AppServices {
    list: Vec<Arc<Registration>>,
    by_token: HashMap<TokenHash, Arc<Registration>>,
    by_id: HashMap<String, Arc<Registration>>,
}

impl AppServices {
    /// Reads and checks the configured registration files.
    pub fn load(files: &[impl AsRef<Path>], server_name: &str) -> Result<Self, String> {
        let mut regs = Vec::new();
        for f in files {
            let path = f.as_ref();
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {name}: {e}"))?;
            regs.push(Registration::parse(&text, &name, server_name)?);
        }
        Self::from_registrations(regs)
    }

    /// Checks a set of registrations against each other.
    pub fn from_registrations(regs: Vec<Registration>) -> Result<Self, String> {
        let mut out = Self::default();
        let mut tokens: HashMap<&str, &str> = HashMap::new();
        for r in &regs {
            for t in [&r.as_token, &r.hs_token] {
                if let Some(other) = tokens.insert(t, &r.file) {
                    return Err(format!("{}: a token of appservice `{}` is also used by {other}", r.file, r.id));
                }
            }
        }
        for (i, a) in regs.iter().enumerate() {
            for b in &regs[i + 1..] {
                if a.id == b.id {
                    return Err(format!("{}: appservice ID `{}` is also the ID in {}", b.file, b.id, a.file));
                }
                if a.sender == b.sender {
                    return Err(format!("{}: sender_localpart of `{}` is also `{}`'s", b.file, b.id, a.id));
                }
                overlap(a, b)?;
                overlap(b, a)?;
            }
        }
        for r in regs {
            let r = Arc::new(r);
            out.by_token.insert(hash_token(&r.as_token), r.clone());
            out.by_id.insert(r.id.clone(), r.clone());
            out.list.push(r);
        }
        Ok(out)
    }

    pub fn all(&self) -> &[Arc<Registration>] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The appservice whose `as_token` this is. Lookup by SHA-256 of the token (no byte-wise
    /// comparison of the secret, as for access tokens).
    pub fn by_token(&self, token: &str) -> Option<&Arc<Registration>> {
        if self.list.is_empty() {
            return None;
        }
        self.by_token.get(&hash_token(token))
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Registration>> {
        self.by_id.get(id)
    }

    /// The appservice (other than `except`) holding `user_id` in an exclusive namespace.
    pub fn exclusive_user_owner(&self, user_id: &str) -> Option<&Arc<Registration>> {
        self.list.iter().find(|r| r.is_exclusive_user(user_id))
    }

    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<&Arc<Registration>> {
        self.list.iter().find(|r| r.is_exclusive_alias(alias))
    }
}

/// Refuses an alias of an appservice's exclusive alias namespace to anyone but that appservice
/// (its `as_token`, or a user it controls): 400 `M_EXCLUSIVE`.
pub fn check_alias_allowed(
    state: &crate::state::AppState,
    alias: &str,
    appservice: Option<&str>,
    user_id: &str,
) -> crate::error::ApiResult<()> {
    if let Some(owner) = state.appservices.exclusive_alias_owner(alias)
        && appservice != Some(owner.id.as_str())
        && !owner.can_control(user_id)
    {
        return Err(crate::error::Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_EXCLUSIVE",
            "This room alias is reserved by an application service",
        ));
    }
    Ok(())
}

/// Whether a local user exists, asking the appservices whose namespace holds them when not yet
/// (`GET /_matrix/app/v1/users/{userId}`: the appservice may create it then).
pub async fn user_exists(state: &crate::state::AppState, user_id: &str) -> sqlx::Result<bool> {
    if crate::storage::users::exists(&state.db, user_id).await? {
        return Ok(true);
    }
    if state.appservices.all().iter().any(|r| r.is_interested_in_user(user_id))
        && client::query_user(state, user_id).await
    {
        return crate::storage::users::exists(&state.db, user_id).await;
    }
    Ok(false)
}

/// Creates the sender user of every appservice that has none yet (Synapse does the same), so
/// that the appservice can act as it at once.
pub async fn ensure_senders(state: &crate::state::AppState) -> anyhow::Result<()> {
    for reg in state.appservices.all() {
        // Its position from now (an appservice registered today does not receive the server's
        // history), recorded at start-up rather than when its delivery task first runs: that
        // task waits for its lease, and events sent meanwhile are the appservice's.
        if reg.delivers() {
            crate::storage::appservice::position(&state.db, &reg.id, *state.event_stream.borrow()).await?;
        }
        if crate::storage::users::exists(&state.db, &reg.sender).await? {
            continue;
        }
        let localpart = reg.sender.trim_start_matches('@').split(':').next().unwrap_or_default().to_owned();
        let mut tx = state.db.begin().await?;
        crate::storage::users::insert(
            &mut tx,
            &crate::storage::users::NewUser {
                user_id: &reg.sender,
                localpart: &localpart,
                password_hash: None,
                is_admin: false,
                user_type: None,
                displayname: Some(&localpart),
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(appservice = %reg.id, user_id = %reg.sender, "appservice sender created");
    }
    Ok(())
}

/// Exclusive namespaces of two appservices that visibly claim the same IDs: the same regex, a
/// literal regex (or the sender) of one matched by an exclusive regex of the other. General regex
/// intersection is not decided (see README).
fn overlap(a: &Registration, b: &Registration) -> Result<(), String> {
    for (kind, la, lb) in
        [(NS_USERS, &a.users, &b.users), (NS_ALIASES, &a.aliases, &b.aliases), (NS_ROOMS, &a.rooms, &b.rooms)]
    {
        for na in la.iter().filter(|n| n.exclusive) {
            for nb in lb.iter() {
                let literal = literal_of(&nb.source);
                if na.source == nb.source || literal.as_deref().is_some_and(|l| na.regex.is_match(l)) {
                    return Err(format!(
                        "{}: exclusive {kind} namespace `{}` of `{}` overlaps `{}` of `{}` ({})",
                        a.file, na.source, a.id, nb.source, b.id, b.file
                    ));
                }
            }
        }
    }
    if a.users.iter().any(|n| n.exclusive && n.regex.is_match(&b.sender)) {
        return Err(format!(
            "{}: exclusive users namespace of `{}` contains `{}`'s sender {}",
            a.file, a.id, b.id, b.sender
        ));
    }
    Ok(())
}

/// The string a regex matches if it is a plain literal (escapes allowed, optional `^`/`$`).
fn literal_of(source: &str) -> Option<String> {
    let s = source.strip_prefix('^').unwrap_or(source);
    let s = s.strip_suffix('$').unwrap_or(s);
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let n = chars.next()?;
                if n.is_ascii_alphanumeric() {
                    return None;
                }
                out.push(n);
            }
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str, extra: &str) -> String {
        format!(
            "id: {id}\nurl: http://127.0.0.1:9000\nas_token: as_{id}\nhs_token: hs_{id}\nsender_localpart: {id}bot\n{extra}"
        )
    }

    #[test]
    fn parses_synapse_registration() {
        let text = reg(
            "irc",
            "namespaces:\n  users:\n    - exclusive: true\n      regex: '@irc_.*:ville\\.fr'\n  aliases:\n    - exclusive: false\n      regex: '#irc_.*'\nrate_limited: false\nreceive_ephemeral: true\norg.matrix.msc3202: true\nprotocols: [irc]\n",
        );
        let r = Registration::parse(&text, "irc.yaml", "ville.fr").unwrap();
        assert_eq!(r.sender, "@ircbot:ville.fr");
        assert!(r.is_exclusive_user("@irc_alice:ville.fr"));
        assert!(r.is_exclusive_user("@ircbot:ville.fr"));
        assert!(!r.is_interested_in_user("@alice:ville.fr"));
        assert!(!r.is_interested_in_user("@x@irc_alice:ville.fr"), "anchored at the start");
        assert!(r.is_alias_in_namespace("#irc_chan:ville.fr") && !r.is_exclusive_alias("#irc_chan:ville.fr"));
        assert!(!r.rate_limited && r.receive_ephemeral && r.msc3202);
        assert_eq!(r.protocols, ["irc"]);
    }

    #[test]
    fn refuses_bad_files() {
        let no_url = "id: a\nas_token: x\nhs_token: y\nsender_localpart: a\nnamespaces: {}\n";
        assert!(Registration::parse(no_url, "a.yaml", "s").unwrap_err().contains("`url` is required"));
        let null_url = "id: a\nurl: null\nas_token: x\nhs_token: y\nsender_localpart: a\nnamespaces: {}\n";
        assert!(Registration::parse(null_url, "a.yaml", "s").unwrap().url.is_none());
        let bad = reg("a", "namespaces:\n  users:\n    - exclusive: true\n      regex: '@a_(.*'\n");
        assert!(Registration::parse(&bad, "a.yaml", "s").unwrap_err().contains("invalid regex"), "bad regex");
        let missing = reg("a", "namespaces:\n  users:\n    - regex: '@a_.*'\n");
        assert!(Registration::parse(&missing, "a.yaml", "s").unwrap_err().contains("exclusive"));
        assert!(Registration::parse("id: [", "a.yaml", "s").unwrap_err().contains("YAML"));
    }

    #[test]
    fn websocket_flag() {
        let base = "id: a\nurl: null\nas_token: x\nhs_token: y\nsender_localpart: a\nnamespaces: {}\n";
        let r = Registration::parse(base, "a.yaml", "s").unwrap();
        assert!(!r.websocket && !r.delivers(), "url: null alone receives nothing");
        let r = Registration::parse(&format!("{base}parvis.websocket: true\n"), "a.yaml", "s").unwrap();
        assert!(r.websocket && r.delivers() && r.url.is_none());
        let bad = format!("{base}parvis.websocket: sometimes\n");
        assert!(Registration::parse(&bad, "a.yaml", "s").unwrap_err().contains("parvis.websocket"));
    }

    #[test]
    fn refuses_conflicts() {
        let ns = "namespaces:\n  users:\n    - exclusive: true\n      regex: '@irc_.*'\n";
        let a = Registration::parse(&reg("a", ns), "a.yaml", "s").unwrap();
        let b = Registration::parse(&reg("b", ns), "b.yaml", "s").unwrap();
        assert!(AppServices::from_registrations(vec![a, b]).unwrap_err().contains("overlaps"));

        let a = Registration::parse(&reg("a", ns), "a.yaml", "s").unwrap();
        let lit = "namespaces:\n  users:\n    - exclusive: false\n      regex: '@irc_bob:s'\n";
        let b = Registration::parse(&reg("b", lit), "b.yaml", "s").unwrap();
        assert!(AppServices::from_registrations(vec![a, b]).unwrap_err().contains("overlaps"));

        let a = Registration::parse(&reg("a", "namespaces: {}"), "a.yaml", "s").unwrap();
        let mut b = Registration::parse(&reg("b", "namespaces: {}"), "b.yaml", "s").unwrap();
        b.as_token = a.as_token.clone();
        assert!(AppServices::from_registrations(vec![a, b]).unwrap_err().contains("token"));

        let a = Registration::parse(&reg("a", "namespaces: {}"), "a.yaml", "s").unwrap();
        let b = Registration::parse(
            &reg("a", "namespaces: {}").replace("as_a", "as_z").replace("hs_a", "hs_z").replace("abot", "zbot"),
            "b.yaml",
            "s",
        )
        .unwrap();
        assert!(AppServices::from_registrations(vec![a, b]).unwrap_err().contains("ID"));

        let a = Registration::parse(&reg("a", ns), "a.yaml", "s").unwrap();
        let other = "namespaces:\n  users:\n    - exclusive: true\n      regex: '@slack_.*'\n";
        let b = Registration::parse(&reg("b", other), "b.yaml", "s").unwrap();
        let all = AppServices::from_registrations(vec![a, b]).unwrap();
        assert_eq!(all.by_token("as_b").unwrap().id, "b");
        assert!(all.by_token("as_c").is_none());
        assert_eq!(all.exclusive_user_owner("@irc_x:s").unwrap().id, "a");
    }
}
