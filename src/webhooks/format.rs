//! Turns webhook payloads into Matrix messages: Prometheus Alertmanager's webhook JSON
//! (`version: "4"`), Grafana alerting's (Alertmanager's shape plus `orgId`, `title`, `state`,
//! `message`, per-alert `valueString`, `dashboardURL`, `panelURL`, `silenceURL`), Grafana's
//! legacy alerting (`ruleName`, `state`, `evalMatches`, `ruleUrl`), and a plain
//! `{"text", "html"}`. Every string from the payload is escaped in the HTML; only `http(s)` links
//! become links. A payload that fits none of them is refused with the reason.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Map, Value, json};

/// Longest string kept from a payload field (the rest is cut with `…`).
const MAX_FIELD: usize = 1000;
/// Longest plain `text`/`html` accepted.
const MAX_TEXT: usize = 32 * 1024;

/// The message to post.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub body: String,
    pub html: Option<String>,
    /// `@room` (a firing alert of a chosen severity).
    pub mention_room: bool,
}

impl Message {
    /// The `m.room.message` content: `m.text` when it mentions the room (so that the default
    /// push rules notify), `m.notice` otherwise (bots' usual type).
    pub fn content(&self) -> Value {
        let mut c = json!({
            "msgtype": if self.mention_room { "m.text" } else { "m.notice" },
            "body": self.body,
        });
        if let Some(h) = &self.html {
            c["format"] = json!("org.matrix.custom.html");
            c["formatted_body"] = json!(h);
        }
        c["m.mentions"] = if self.mention_room { json!({ "room": true }) } else { json!({}) };
        c
    }
}

pub use crate::http::web::escape;

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_FIELD { s.to_owned() } else { s.chars().take(MAX_FIELD).collect::<String>() + "…" }
}

fn is_link(u: &str) -> bool {
    (u.starts_with("https://") || u.starts_with("http://")) && url::Url::parse(u).is_ok()
}

fn link(url: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", escape(url), escape(text))
}

/// Reads a `{string: string}` object (labels, annotations); other values are refused.
fn string_map(v: Option<&Value>, what: &str) -> Result<BTreeMap<String, String>, String> {
    match v {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((cut(k), cut(s))),
                _ => Err(format!("{what}.{k} must be a string")),
            })
            .collect(),
        Some(_) => Err(format!("{what} must be an object")),
    }
}

fn opt_str<'a>(o: &'a Map<String, Value>, key: &str, what: &str) -> Result<Option<&'a str>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{what}{key} must be a string")),
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// Formats a payload. `mention` lists the severities (`labels.severity`) whose firing alerts
/// mention the room; `max_alerts` bounds the alerts listed.
pub fn format(payload: &Value, mention: &[String], max_alerts: usize) -> Result<Message, String> {
    let o = payload.as_object().ok_or("the payload must be a JSON object")?;
    if o.contains_key("alerts") {
        return alertmanager(o, mention, max_alerts);
    }
    if o.contains_key("ruleName") || o.contains_key("evalMatches") {
        return grafana_legacy(o, mention);
    }
    if o.contains_key("text") || o.contains_key("html") {
        return plain(o);
    }
    Err("unrecognised payload: expected Alertmanager or Grafana alerts (`alerts`), \
         Grafana legacy alerting (`ruleName`), or {\"text\", \"html\"}"
        .into())
}

fn plain(o: &Map<String, Value>) -> Result<Message, String> {
    let text = opt_str(o, "text", "")?.ok_or("`text` is required (plain text; `html` is optional)")?;
    let html = opt_str(o, "html", "")?;
    if text.trim().is_empty() {
        return Err("`text` must not be empty".into());
    }
    if text.len() > MAX_TEXT || html.is_some_and(|h| h.len() > MAX_TEXT) {
        return Err(format!("`text` and `html` must be at most {MAX_TEXT} bytes"));
    }
    Ok(Message { body: text.to_owned(), html: html.map(str::to_owned), mention_room: false })
}

struct Alert {
    status: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    starts_at: Option<String>,
    links: Vec<(&'static str, String)>,
    value: Option<String>,
}

fn alertmanager(o: &Map<String, Value>, mention: &[String], max_alerts: usize) -> Result<Message, String> {
    let list = o.get("alerts").and_then(Value::as_array).ok_or("`alerts` must be an array")?;
    if list.is_empty() {
        return Err("`alerts` is empty: nothing to post".into());
    }
    let grafana = o.contains_key("orgId") || list.iter().any(|a| a.get("valueString").is_some());
    let mut alerts = Vec::with_capacity(list.len().min(max_alerts));
    let mut firing = 0usize;
    let mut mention_room = false;
    for (i, a) in list.iter().enumerate() {
        let what = format!("alerts[{i}].");
        let a = a.as_object().ok_or_else(|| format!("alerts[{i}] must be an object"))?;
        let status = opt_str(a, "status", &what)?.unwrap_or("firing");
        if !matches!(status, "firing" | "resolved") {
            return Err(format!("{what}status must be `firing` or `resolved`"));
        }
        let labels = string_map(a.get("labels"), &format!("{what}labels"))?;
        let annotations = string_map(a.get("annotations"), &format!("{what}annotations"))?;
        if status == "firing" {
            firing += 1;
            if labels.get("severity").is_some_and(|s| mention.iter().any(|m| m.eq_ignore_ascii_case(s))) {
                mention_room = true;
            }
        }
        if alerts.len() >= max_alerts {
            continue;
        }
        let mut links = Vec::new();
        for (key, name) in [
            ("generatorURL", "source"),
            ("dashboardURL", "dashboard"),
            ("panelURL", "panel"),
            ("silenceURL", "silence"),
        ] {
            if let Some(u) = opt_str(a, key, &what)?
                && is_link(u)
            {
                links.push((name, cut(u)));
            }
        }
        if let Some(u) = annotations.get("runbook_url").filter(|u| is_link(u)) {
            links.push(("runbook", u.clone()));
        }
        alerts.push(Alert {
            status: status.to_owned(),
            labels,
            annotations,
            starts_at: opt_str(a, "startsAt", &what)?.map(cut),
            links,
            value: if grafana { opt_str(a, "valueString", &what)?.filter(|v| !v.is_empty()).map(cut) } else { None },
        });
    }
    let total = list.len();
    let resolved = total - firing;
    let common = string_map(o.get("commonLabels"), "commonLabels")?;
    let group = string_map(o.get("groupLabels"), "groupLabels")?;
    let external = opt_str(o, "externalURL", "")?.filter(|u| is_link(u));
    let source = if grafana { "Grafana" } else { "Alertmanager" };
    let (icon, state) = if firing > 0 { ("🔥", "FIRING") } else { ("✅", "RESOLVED") };
    let counts = match (firing, resolved) {
        (f, 0) => format!("{f}"),
        (0, r) => format!("{r}"),
        (f, r) => format!("{f} firing, {r} resolved"),
    };
    // The title: the group's labels (alertname first), else the common alertname.
    let name = group.get("alertname").or_else(|| common.get("alertname")).cloned().unwrap_or_else(|| {
        if grafana { opt_str(o, "title", "").ok().flatten().map(cut).unwrap_or_default() } else { String::new() }
    });
    let group_rest: BTreeMap<String, String> =
        group.iter().filter(|(k, _)| *k != "alertname").map(|(k, v)| (k.clone(), v.clone())).collect();

    let mut body = String::new();
    let mut html = String::new();
    if mention_room {
        body.push_str("@room ");
        html.push_str("@room ");
    }
    let _ = write!(body, "{icon} [{state}:{counts}] {name}");
    let _ = write!(html, "<p><strong>{icon} [{state}:{}] {}</strong>", escape(&counts), escape(&name));
    if !group_rest.is_empty() {
        let _ = write!(body, " ({})", labels_text(&group_rest));
        let _ = write!(html, " (<code>{}</code>)", escape(&labels_text(&group_rest)));
    }
    let _ = write!(body, " — {source}");
    let _ = write!(html, " — {source}</p>");
    if !common.is_empty() {
        let _ = write!(body, "\nLabels: {}", labels_text(&common));
        let _ = write!(html, "<p>Labels: <code>{}</code></p>", escape(&labels_text(&common)));
    }
    html.push_str("<ul>");
    for a in &alerts {
        let title = a.labels.get("alertname").filter(|n| **n != name).cloned().unwrap_or_default();
        let summary =
            a.annotations.get("summary").or_else(|| a.annotations.get("description")).cloned().unwrap_or_default();
        let own: BTreeMap<String, String> =
            a.labels.iter().filter(|(k, v)| common.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mark = if a.status == "firing" { "🔥" } else { "✅" };
        let mut line = format!("\n{mark} {}", a.status);
        let mut item = format!("<li>{mark} <strong>{}</strong>", escape(&a.status));
        if !title.is_empty() {
            let _ = write!(line, " {title}");
            let _ = write!(item, " {}", escape(&title));
        }
        if !summary.is_empty() {
            let _ = write!(line, ": {summary}");
            let _ = write!(item, ": {}", escape(&summary));
        }
        if !own.is_empty() {
            let _ = write!(line, " ({})", labels_text(&own));
            let _ = write!(item, " (<code>{}</code>)", escape(&labels_text(&own)));
        }
        if let Some(v) = &a.value {
            let _ = write!(line, "\n  value: {v}");
            let _ = write!(item, "<br>value: <code>{}</code>", escape(v));
        }
        if let Some(t) = a.starts_at.as_deref().filter(|t| !t.starts_with("0001-")) {
            let _ = write!(line, "\n  since {t}");
            let _ = write!(item, "<br>since {}", escape(t));
        }
        if !a.links.is_empty() {
            line.push_str("\n  ");
            line.push_str(&a.links.iter().map(|(n, u)| format!("{n}: {u}")).collect::<Vec<_>>().join(" · "));
            item.push_str("<br>");
            item.push_str(&a.links.iter().map(|(n, u)| link(u, n)).collect::<Vec<_>>().join(" · "));
        }
        item.push_str("</li>");
        body.push_str(&line);
        html.push_str(&item);
    }
    html.push_str("</ul>");
    if total > alerts.len() {
        let more = total - alerts.len();
        let _ = write!(body, "\n… and {more} more");
        let _ = write!(html, "<p>… and {more} more</p>");
    }
    if let Some(u) = external {
        let _ = write!(body, "\n{source}: {u}");
        let _ = write!(html, "<p>{}</p>", link(u, source));
    }
    Ok(Message { body, html: Some(html), mention_room })
}

fn grafana_legacy(o: &Map<String, Value>, mention: &[String]) -> Result<Message, String> {
    let state = opt_str(o, "state", "")?.ok_or("`state` is required")?;
    let title = opt_str(o, "title", "")?.or(opt_str(o, "ruleName", "")?).unwrap_or("Grafana alert");
    let message = opt_str(o, "message", "")?.map(cut);
    let url = opt_str(o, "ruleUrl", "")?.filter(|u| is_link(u));
    let tags = string_map(o.get("tags"), "tags")?;
    let (icon, word) = match state {
        "alerting" => ("🔥", "FIRING"),
        "ok" => ("✅", "RESOLVED"),
        "no_data" => ("⚠️", "NO DATA"),
        "paused" | "pending" => ("⏸", "PENDING"),
        _ => return Err("`state` must be alerting, ok, no_data, paused or pending".into()),
    };
    let mention_room =
        state == "alerting" && tags.get("severity").is_some_and(|s| mention.iter().any(|m| m.eq_ignore_ascii_case(s)));
    let prefix = if mention_room { "@room " } else { "" };
    let title = cut(title);
    let mut body = format!("{prefix}{icon} [{word}] {title} — Grafana");
    let mut html = format!("{prefix}<p><strong>{icon} [{word}] {}</strong> — Grafana</p>", escape(&title));
    if let Some(m) = &message {
        let _ = write!(body, "\n{m}");
        let _ = write!(html, "<p>{}</p>", escape(m));
    }
    if let Some(matches) = o.get("evalMatches").and_then(Value::as_array) {
        html.push_str("<ul>");
        for m in matches.iter().take(50) {
            let metric = m["metric"].as_str().map(cut).unwrap_or_default();
            let value = match &m["value"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => cut(s),
                _ => String::new(),
            };
            let _ = write!(body, "\n• {metric} = {value}");
            let _ = write!(html, "<li><code>{}</code> = {}</li>", escape(&metric), escape(&value));
        }
        html.push_str("</ul>");
    }
    if let Some(u) = url {
        let _ = write!(body, "\nrule: {u}");
        let _ = write!(html, "<p>{}</p>", link(u, "rule"));
    }
    Ok(Message { body, html: Some(html), mention_room })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alertmanager's webhook payload as documented (prometheus.io, "webhook_config").
    const ALERTMANAGER: &str = include_str!("../../tests/data/webhooks/alertmanager.json");
    /// Grafana alerting's webhook payload as documented (grafana.com, "Configure webhook
    /// notifications", the example body).
    const GRAFANA: &str = include_str!("../../tests/data/webhooks/grafana.json");

    fn crit() -> Vec<String> {
        vec!["critical".into()]
    }

    #[test]
    fn alertmanager_firing_and_resolved() {
        let m = format(&serde_json::from_str(ALERTMANAGER).unwrap(), &crit(), 50).unwrap();
        assert!(m.mention_room, "a firing critical alert mentions the room");
        let first = m.body.lines().next().unwrap();
        assert_eq!(first, "@room 🔥 [FIRING:1 firing, 1 resolved] InstanceDown (job=node) — Alertmanager");
        assert!(
            m.body.contains("🔥 firing: Instance db1:9100 down (instance=db1:9100, severity=critical)"),
            "{}",
            m.body
        );
        assert!(
            m.body.contains("✅ resolved: Instance web2:9100 down (instance=web2:9100, severity=warning)"),
            "{}",
            m.body
        );
        assert!(m.body.contains("since 2024-05-02T08:10:00Z"), "{}", m.body);
        assert!(
            m.body.contains("source: http://prometheus.ville.example:9090/graph?g0.expr=up+%3D%3D+0"),
            "{}",
            m.body
        );
        assert!(m.body.ends_with("Alertmanager: http://alertmanager.ville.example:9093"), "{}", m.body);
        let html = m.html.as_deref().unwrap();
        assert!(html.starts_with("@room <p><strong>🔥 [FIRING:1 firing, 1 resolved] InstanceDown</strong>"), "{html}");
        assert!(
            html.contains("<a href=\"http://prometheus.ville.example:9090/graph?g0.expr=up+%3D%3D+0\">source</a>"),
            "{html}"
        );
        assert!(html.contains("<code>job=node</code>"), "{html}");
        let c = m.content();
        assert_eq!(c["msgtype"], "m.text");
        assert_eq!(c["m.mentions"]["room"], true);
        assert_eq!(c["format"], "org.matrix.custom.html");

        // Without critical among the severities: a notice, no mention.
        let m = format(&serde_json::from_str(ALERTMANAGER).unwrap(), &[], 50).unwrap();
        assert!(!m.mention_room && !m.body.contains("@room"));
        assert_eq!(m.content()["msgtype"], "m.notice");
        // All resolved.
        let mut v: Value = serde_json::from_str(ALERTMANAGER).unwrap();
        v["alerts"][0]["status"] = json!("resolved");
        v["status"] = json!("resolved");
        let m = format(&v, &crit(), 50).unwrap();
        assert!(m.body.starts_with("✅ [RESOLVED:2] InstanceDown"), "{}", m.body);
        assert!(!m.mention_room, "resolved alerts mention nobody");
        // Truncation.
        let m = format(&serde_json::from_str(ALERTMANAGER).unwrap(), &crit(), 1).unwrap();
        assert!(m.body.contains("… and 1 more") && !m.body.contains("web2"), "{}", m.body);
    }

    #[test]
    fn grafana_payload() {
        let m = format(&serde_json::from_str(GRAFANA).unwrap(), &crit(), 50).unwrap();
        assert!(!m.mention_room);
        let first = m.body.lines().next().unwrap();
        assert_eq!(first, "🔥 [FIRING:1 firing, 1 resolved] [FIRING:1]  (blue) — Grafana");
        assert!(m.body.contains("🔥 firing High memory usage: This alert was triggered for zone us-1 (alertname=High memory usage, zone=us-1)"), "{}", m.body);
        assert!(m.body.contains("value: [ var='B' labels={__name__=go_memstats_alloc_bytes"), "{}", m.body);
        assert!(m.body.contains("silence: https://play.grafana.org/alerting/silence/new"), "{}", m.body);
        assert!(m.body.contains("runbook: https://myrunbook.com/runbook/1234"), "{}", m.body);
        assert!(m.body.contains("Labels: team=blue"), "{}", m.body);
        let html = m.html.unwrap();
        assert!(html.contains("value: <code>[ var=&#39;B&#39; labels={__name__=go_memstats_alloc_bytes"), "{html}");
        assert!(!html.contains("0001-01-01"), "zero timestamps are left out");
    }

    #[test]
    fn plain_text_and_escaping() {
        let m = format(&json!({"text": "Backup done", "html": "<b>Backup</b> done"}), &[], 50).unwrap();
        assert_eq!(
            m,
            Message { body: "Backup done".into(), html: Some("<b>Backup</b> done".into()), mention_room: false }
        );
        let m = format(&json!({"text": "only text"}), &[], 50).unwrap();
        assert!(m.html.is_none() && m.content().get("formatted_body").is_none());

        let evil = json!({"alerts": [{"status": "firing", "labels": {"alertname": "<script>alert(1)</script>", "x": "\"q\" & 'a'"},
            "annotations": {"summary": "<img src=x onerror=alert(1)>"}, "generatorURL": "javascript:alert(1)"}]});
        let m = format(&evil, &[], 50).unwrap();
        let html = m.html.unwrap();
        assert!(!html.contains("<script>") && !html.contains("<img") && !html.contains("javascript:"), "{html}");
        assert!(html.contains("&lt;script&gt;") && html.contains("&quot;q&quot; &amp; &#39;a&#39;"), "{html}");
    }

    #[test]
    fn bad_payloads_say_why() {
        let cases = [
            (json!([1, 2]), "JSON object"),
            (json!({"foo": 1}), "unrecognised payload"),
            (json!({"alerts": {}}), "`alerts` must be an array"),
            (json!({"alerts": []}), "empty"),
            (json!({"alerts": [{"status": "burning"}]}), "alerts[0].status"),
            (json!({"alerts": [{"labels": {"a": 1}}]}), "alerts[0].labels.a must be a string"),
            (json!({"text": 5}), "text must be a string"),
            (json!({"html": "<b>x</b>"}), "`text` is required"),
            (json!({"text": "  "}), "empty"),
            (json!({"ruleName": "x", "state": "weird"}), "`state` must be"),
        ];
        for (payload, reason) in cases {
            let err = format(&payload, &[], 50).unwrap_err();
            assert!(err.contains(reason), "{payload}: {err}");
        }
    }

    #[test]
    fn grafana_legacy_payload() {
        let v = json!({"title": "[Alerting] Panel Title alert", "ruleId": 1, "ruleName": "Panel Title alert",
            "ruleUrl": "http://localhost:3000/d/hZ7BuVbWz/test-dashboard?fullscreen&edit&tab=alert&panelId=2&orgId=1",
            "state": "alerting", "message": "Notification Message", "tags": {"severity": "critical"},
            "evalMatches": [{"value": 1, "metric": "Count", "tags": {}}]});
        let m = format(&v, &crit(), 50).unwrap();
        assert!(m.mention_room);
        assert!(
            m.body.starts_with(
                "@room 🔥 [FIRING] [Alerting] Panel Title alert — Grafana\nNotification Message\n• Count = 1"
            ),
            "{}",
            m.body
        );
    }
}
