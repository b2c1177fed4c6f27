//! The readable side of an export: self-contained HTML pages (no script, no remote resource, a
//! Content-Security-Policy that forbids both), in French for the town's archivists. Every
//! user-controlled string (names, bodies, topics, file names, IDs) goes through [`escape`];
//! message bodies are always the plain `body`, never the sender's `formatted_body`.

use std::collections::HashMap;
use std::fmt::Write;

use serde_json::Value;

use super::{paris_time, utc_iso};

pub use crate::http::web::escape;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#222}\
h1{font-size:1.5em}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}dd{margin:0}\
.note{border-left:4px solid #c60;background:#fff5e6;padding:.5em 1em}ol{list-style:none;padding:0}\
li{padding:.3em 0;border-bottom:1px solid #eee}time{color:#666;font-size:.85em;margin-right:.5em}\
.who{font-weight:bold}.uid{color:#666;font-weight:normal;font-size:.85em}.what{white-space:pre-wrap}\
.state .what,.redacted .what,.encrypted .what{color:#666;font-style:italic}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}code{font-size:.9em}";

/// The start of a page, up to `<body>`.
pub fn page_start(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"fr\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(title)
    )
}

pub const PAGE_END: &str = "</body>\n</html>\n";

pub const TIMEZONE_NOTE: &str =
    "Heure de Paris (Europe/Paris) : UTC+1 en hiver, UTC+2 en été ; le décalage est indiqué à chaque date.";

/// What the header of a room's page says.
pub struct RoomHeader<'a> {
    pub label: &'a str,
    pub room_id: &'a str,
    pub alias: Option<&'a str>,
    pub topic: Option<&'a str>,
    pub user_id: &'a str,
    pub exported_at: i64,
    /// The user's membership when the export was made.
    pub membership: &'a str,
    /// When the user left (or was removed from) the room: the page stops there.
    pub departed_ts: Option<i64>,
    pub forgotten: bool,
    pub encrypted: bool,
}

pub fn room_header(h: &RoomHeader<'_>) -> String {
    let mut s = page_start(&format!("{} — export de {}", h.label, h.user_id));
    let _ = write!(s, "<header>\n<h1><bdi>{}</bdi></h1>\n<dl>\n", escape(h.label));
    let _ = writeln!(s, "<dt>Identifiant du salon</dt><dd><code>{}</code></dd>", escape(h.room_id));
    if let Some(a) = h.alias {
        let _ = writeln!(s, "<dt>Adresse</dt><dd><code>{}</code></dd>", escape(a));
    }
    if let Some(t) = h.topic {
        let _ = writeln!(s, "<dt>Sujet</dt><dd class=\"what\"><bdi>{}</bdi></dd>", escape(t));
    }
    let _ = writeln!(s, "<dt>Export pour</dt><dd><code>{}</code></dd>", escape(h.user_id));
    let _ = writeln!(s, "<dt>Date de l'export</dt><dd>{}</dd>", paris_time(h.exported_at));
    let membership = match (h.membership, h.departed_ts) {
        ("join", _) => "membre du salon".to_owned(),
        ("invite", _) => "invité (n'a pas rejoint le salon)".to_owned(),
        ("knock", _) => "a demandé à rejoindre le salon".to_owned(),
        ("ban", Some(t)) => format!("banni du salon le {} : la page s'arrête à cette date", paris_time(t)),
        (_, Some(t)) => {
            format!("a quitté le salon (ou en a été retiré) le {} : la page s'arrête à cette date", paris_time(t))
        }
        (m, None) => escape(m),
    };
    let _ = writeln!(
        s,
        "<dt>Appartenance</dt><dd>{membership}{}</dd>",
        if h.forgotten { " ; salon « oublié » par l'utilisateur" } else { "" }
    );
    let _ = write!(s, "<dt>Fuseau horaire</dt><dd>{TIMEZONE_NOTE}</dd>\n</dl>\n");
    s.push_str(
        "<p class=\"note\">Cette page montre les événements du salon que cet utilisateur pouvait voir, selon les règles de \
         visibilité de l'historique du salon (les mêmes que celles de son application). Le fichier \
         <code>messages.json</code> voisin contient les mêmes événements, complets, au format Matrix.</p>\n",
    );
    if h.encrypted {
        s.push_str(
            "<p class=\"note\"><strong>Salon chiffré de bout en bout.</strong> Le serveur ne détient pas les clés : \
             les messages chiffrés sont exportés tels qu'ils sont stockés (illisibles) dans <code>messages.json</code> \
             et signalés ci-dessous sans leur contenu. Seules les applications des participants peuvent les déchiffrer.</p>\n",
        );
    }
    s.push_str("</header>\n<ol>\n");
    s
}

pub fn room_footer(events: u64, encrypted: u64) -> String {
    let mut s = String::from("</ol>\n<footer>\n");
    let _ = write!(s, "<p>{events} événement(s) exporté(s)");
    if encrypted > 0 {
        let _ = write!(s, ", dont {encrypted} chiffré(s), illisible(s) par le serveur");
    }
    s.push_str(".</p>\n</footer>\n");
    s.push_str(PAGE_END);
    s
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// What a line needs to know about the room at its event.
pub struct LineContext<'a> {
    /// The display name of a user at that point of the room.
    pub name_of: &'a dyn Fn(&str) -> String,
    /// For a member event: the target's membership before it.
    pub prev_membership: Option<&'a str>,
    /// `mxc://` URIs of files in the archive → their paths from the page.
    pub media: &'a HashMap<String, String>,
}

/// One event as a line of the page.
pub fn event_line(ev: &Value, cx: &LineContext<'_>) -> String {
    let sender = str_of(ev, "sender").unwrap_or("");
    let ts = ev["origin_server_ts"].as_i64().unwrap_or(0);
    let (class, what) = describe(ev, cx);
    // A user's own member event shows the name it sets (a join, a new display name).
    let own_name = (str_of(ev, "type") == Some("m.room.member") && str_of(ev, "state_key") == Some(sender))
        .then(|| str_of(&ev["content"], "displayname"))
        .flatten()
        .filter(|n| !n.trim().is_empty());
    let name = own_name.map_or_else(|| (cx.name_of)(sender), str::to_owned);
    format!(
        "<li class=\"{class}\" title=\"{}\"><time datetime=\"{}\">{}</time> <span class=\"who\"><bdi>{}</bdi> \
         <span class=\"uid\">{}</span></span> <span class=\"what\">{what}</span></li>\n",
        escape(str_of(ev, "event_id").unwrap_or("")),
        utc_iso(ts),
        paris_time(ts),
        escape(&name),
        escape(sender),
    )
}

fn quoted(s: &str) -> String {
    format!("« <bdi>{}</bdi> »", escape(s))
}

fn media_link(content: &Value, media: &HashMap<String, String>) -> String {
    let url = str_of(content, "url").or_else(|| content.get("file").and_then(|f| str_of(f, "url")));
    match url {
        Some(u) => match media.get(u) {
            Some(path) => format!(" (<a href=\"{}\">fichier dans l'archive</a>)", escape(path)),
            None => format!(" (<code>{}</code>)", escape(u)),
        },
        None => String::new(),
    }
}

/// The class of the line and its HTML text.
fn describe(ev: &Value, cx: &LineContext<'_>) -> (&'static str, String) {
    let media = cx.media;
    let content = &ev["content"];
    let kind = str_of(ev, "type").unwrap_or("");
    if ev["unsigned"].get("redacted_because").is_some() {
        return ("redacted", format!("[contenu supprimé ({})]", escape(kind)));
    }
    let body = str_of(content, "body").unwrap_or("");
    match kind {
        "m.room.message" => {
            let relates = &content["m.relates_to"];
            if str_of(relates, "rel_type") == Some("m.replace") {
                let new = content["m.new_content"]["body"].as_str().unwrap_or(body);
                return ("msg", format!("(message modifié) {}", escape(new)));
            }
            let thread = if str_of(relates, "rel_type") == Some("m.thread") { "(dans un fil) " } else { "" };
            let text = match str_of(content, "msgtype").unwrap_or("") {
                "m.emote" => format!("* {}", escape(body)),
                "m.image" => format!("[image : {}]{}", escape(body), media_link(content, media)),
                "m.file" => format!("[fichier : {}]{}", escape(body), media_link(content, media)),
                "m.audio" => format!("[audio : {}]{}", escape(body), media_link(content, media)),
                "m.video" => format!("[vidéo : {}]{}", escape(body), media_link(content, media)),
                "m.location" => format!("[position : {}]", escape(body)),
                _ => escape(body),
            };
            ("msg", format!("{thread}{text}"))
        }
        "m.sticker" => ("msg", format!("[autocollant : {}]{}", escape(body), media_link(content, media))),
        "m.reaction" => {
            let key = content["m.relates_to"]["key"].as_str().unwrap_or("");
            ("msg", format!("a réagi {} à un message", quoted(key)))
        }
        "m.room.encrypted" => (
            "encrypted",
            "[message chiffré : le serveur ne peut pas le déchiffrer ; il figure tel quel dans messages.json]".into(),
        ),
        "m.room.redaction" => ("state", "a supprimé un message".into()),
        "m.room.member" => ("state", membership(ev, cx)),
        "m.room.create" => ("state", "a créé le salon".into()),
        "m.room.name" => ("state", format!("a nommé le salon {}", quoted(str_of(content, "name").unwrap_or("")))),
        "m.room.topic" => ("state", format!("a changé le sujet : {}", quoted(str_of(content, "topic").unwrap_or("")))),
        "m.room.avatar" => ("state", "a changé l'image du salon".into()),
        "m.room.encryption" => ("state", "a activé le chiffrement de bout en bout".into()),
        "m.room.canonical_alias" => {
            ("state", format!("a changé l'adresse du salon : {}", quoted(str_of(content, "alias").unwrap_or("aucune"))))
        }
        "m.room.history_visibility" => (
            "state",
            format!(
                "a réglé la visibilité de l'historique : {}",
                escape(str_of(content, "history_visibility").unwrap_or("?"))
            ),
        ),
        "m.room.join_rules" => (
            "state",
            format!("a réglé les conditions d'accès : {}", escape(str_of(content, "join_rule").unwrap_or("?"))),
        ),
        "m.room.power_levels" => ("state", "a modifié les droits des participants".into()),
        "m.room.pinned_events" => ("state", "a modifié les messages épinglés".into()),
        "m.room.tombstone" => ("state", "a remplacé ce salon par un nouveau salon".into()),
        k if k.starts_with("m.call.") => ("state", format!("[appel : {}]", escape(k))),
        k => ("state", format!("[événement {}]", escape(k))),
    }
}

fn membership(ev: &Value, cx: &LineContext<'_>) -> String {
    let name_of = cx.name_of;
    let content = &ev["content"];
    let sender = str_of(ev, "sender").unwrap_or("");
    let target = str_of(ev, "state_key").unwrap_or("");
    let target_name = || {
        let name = str_of(content, "displayname").map(str::to_owned).unwrap_or_else(|| name_of(target));
        format!("<bdi>{}</bdi> (<code>{}</code>)", escape(&name), escape(target))
    };
    let reason = str_of(content, "reason").map(|r| format!(" ; motif : {}", quoted(r))).unwrap_or_default();
    let own = sender == target;
    match str_of(content, "membership").unwrap_or("") {
        "join" => match (cx.prev_membership, str_of(content, "displayname")) {
            (Some("join"), Some(n)) => format!("a pris le nom {}", quoted(n)),
            (Some("join"), None) => "a modifié son profil".into(),
            _ => "a rejoint le salon".into(),
        },
        "invite" => format!("a invité {}{reason}", target_name()),
        "leave" if own => format!("a quitté le salon{reason}"),
        "leave" => format!("a retiré {} du salon{reason}", target_name()),
        "ban" => format!("a banni {}{reason}", target_name()),
        "knock" => format!("a demandé à rejoindre le salon{reason}"),
        m => format!("appartenance de {} : {}", target_name(), escape(m)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn everything_user_controlled_is_escaped() {
        let evil = "<script>alert('x')</script>\"&";
        let ev = json!({
            "type": "m.room.message", "event_id": evil, "sender": evil, "origin_server_ts": 0,
            "content": { "msgtype": "m.image", "body": evil, "url": evil },
        });
        let media = HashMap::new();
        let name_of = |_: &str| evil.to_owned();
        let cx = LineContext { name_of: &name_of, prev_membership: None, media: &media };
        let line = event_line(&ev, &cx);
        assert!(!line.contains("<script>") && !line.contains("'x'") && !line.contains(evil), "{line}");
        assert!(line.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"), "{line}");
        let h = room_header(&RoomHeader {
            label: evil,
            room_id: evil,
            alias: Some(evil),
            topic: Some(evil),
            user_id: evil,
            exported_at: 0,
            membership: evil,
            departed_ts: None,
            forgotten: false,
            encrypted: true,
        });
        assert!(!h.contains("<script>"), "{h}");
        for kind in ["m.room.member", "m.room.name", "m.room.topic", "m.reaction", "x.custom<b>"] {
            let ev = json!({
                "type": kind, "sender": "@a:x", "state_key": evil, "origin_server_ts": 0,
                "content": { "membership": "invite", "displayname": evil, "name": evil, "topic": evil,
                             "reason": evil, "m.relates_to": { "key": evil } },
            });
            let line = event_line(&ev, &cx);
            assert!(!line.contains("<script>") && !line.contains("<b>"), "{kind}: {line}");
        }
    }

    #[test]
    fn media_in_the_archive_are_linked() {
        let ev = json!({
            "type": "m.room.message", "event_id": "$e", "sender": "@a:x", "origin_server_ts": 0,
            "content": { "msgtype": "m.image", "body": "plan.png", "url": "mxc://x/abc" },
        });
        let media = HashMap::from([("mxc://x/abc".to_owned(), "../../media/abc-plan.png".to_owned())]);
        let name_of = |_: &str| "Alice".to_owned();
        let line = event_line(&ev, &LineContext { name_of: &name_of, prev_membership: None, media: &media });
        assert!(line.contains("href=\"../../media/abc-plan.png\"") && line.contains("Alice"), "{line}");
    }
}
