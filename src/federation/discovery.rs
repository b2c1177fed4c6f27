//! Server discovery: from a server name to where and how to connect, as the spec says
//! (<https://spec.matrix.org/latest/server-server-api/#resolving-server-names>):
//!
//! 1. an IP literal: that address, with the given port or 8448;
//! 2. an explicit port: that host and port (no well-known, no SRV);
//! 3. `GET https://<hostname>/.well-known/matrix/server`: `m.server` delegates to another name,
//!    which is itself an IP literal, has an explicit port, or is looked up through SRV
//!    (`_matrix-fed._tcp` then the deprecated `_matrix._tcp`), else port 8448; the certificate
//!    and `Host` are the delegated name's;
//! 4. without a (valid) well-known: SRV on the server name, else its port 8448.
//!
//! Well-known results are cached as their `Cache-Control`/`Expires` say, 24 hours by default,
//! between 5 minutes and 48 hours; failures an hour.
//!
//! The result is a [`Destination`]: the URL authority (host for TLS SNI and the certificate,
//! `Host` header) and, when it differs, where to connect (an SRV target or port 8448), which
//! the HTTP client's resolver ([`OverrideResolver`]) applies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;
use ruma::{OwnedServerName, ServerName};

pub const DEFAULT_PORT: u16 = 8448;
pub const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
pub const WELL_KNOWN_MIN_TTL: Duration = Duration::from_secs(5 * 60);
pub const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
pub const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(3600);
/// A well-known document larger than this is refused.
pub const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;

/// Where a request to a server goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The URL's authority: `host`, `host:port`, `1.2.3.4:8448`, `[::1]:8448`. Its host is the TLS
    /// server name and the certificate's, and it is the `Host` header.
    pub authority: String,
    /// Where to connect when it is not the authority itself (authority without a port): an SRV
    /// target, or the host on port 8448.
    pub connect: Option<(String, u16)>,
    /// The `Host` header when it is not the authority: an IP literal without a port is
    /// contacted on port 8448, but its `Host` is the bare literal, as the spec says.
    pub host_header: Option<String>,
}

impl Destination {
    fn direct(authority: String) -> Self {
        Self { authority, connect: None, host_header: None }
    }

    /// The URL host (without port).
    pub fn host(&self) -> &str {
        if self.connect.is_some() {
            return &self.authority;
        }
        match self.authority.rfind(':') {
            Some(i) if !self.authority[i..].contains(']') => &self.authority[..i],
            _ => &self.authority,
        }
    }
}

/// What a name resolves to without any network lookup, or the hostname that needs one.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Done(Destination),
    /// A hostname without a port: well-known (for a server name) or SRV (for a delegated name).
    Lookup(String),
}

/// Steps 1 and 2 of the spec (also for a delegated name, steps 3.1 and 3.2).
pub fn first_step(name: &ServerName) -> Step {
    if name.is_ip_literal() {
        let mut d = Destination::direct(format!("{}:{}", name.host(), name.port().unwrap_or(DEFAULT_PORT)));
        if name.port().is_none() {
            d.host_header = Some(name.host().to_owned());
        }
        return Step::Done(d);
    }
    if name.port().is_some() {
        return Step::Done(Destination::direct(name.as_str().to_owned()));
    }
    Step::Lookup(name.host().to_ascii_lowercase())
}

/// The delegated server name of a well-known document, if it is valid.
pub fn parse_well_known(body: &[u8]) -> Option<OwnedServerName> {
    if body.len() > WELL_KNOWN_MAX_BYTES {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let s = v.get("m.server")?.as_str()?;
    ServerName::parse(s).ok()
}

/// How long a well-known response may be cached: `Cache-Control: max-age` (or `no-store`,
/// `no-cache`: the minimum), else `Expires`, else 24 hours; always within 5 minutes..48 hours.
pub fn well_known_ttl(headers: &HeaderMap, now: SystemTime) -> Duration {
    let ttl = cache_control_ttl(headers).or_else(|| expires_ttl(headers, now)).unwrap_or(WELL_KNOWN_DEFAULT_TTL);
    ttl.clamp(WELL_KNOWN_MIN_TTL, WELL_KNOWN_MAX_TTL)
}

fn cache_control_ttl(headers: &HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers.get_all(axum::http::header::CACHE_CONTROL) {
        for directive in value.to_str().ok()?.split(',') {
            let d = directive.trim().to_ascii_lowercase();
            if d == "no-store" || d == "no-cache" {
                return Some(Duration::ZERO);
            }
            if let Some(secs) = d.strip_prefix("max-age=") {
                found = Some(Duration::from_secs(secs.trim_matches('"').parse::<u64>().ok()?));
            }
        }
    }
    found
}

fn expires_ttl(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(axum::http::header::EXPIRES)?.to_str().ok()?;
    let at = httpdate(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form HTTP/1.1 senders use.
fn httpdate(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else { return None };
    let day: u64 = day.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == month)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days since the epoch (civil calendar, Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(days * 86_400 + h * 3600 + m * 60 + sec))
}

/// Picks the SRV record to use: the lowest priority, then the highest weight (records are
/// `(priority, weight, port, target)`); a target of `.` means "no service".
pub fn pick_srv(mut records: Vec<(u16, u16, u16, String)>) -> Option<(String, u16)> {
    records.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let (_, _, port, target) = records.into_iter().next()?;
    let target = target.trim_end_matches('.').to_ascii_lowercase();
    (!target.is_empty() && port != 0).then_some((target, port))
}

/// Server name → destination, with the well-known cache; also the connect overrides the HTTP
/// client's resolver reads.
pub struct Discovery {
    cache: moka::sync::Cache<String, (Destination, Instant)>,
    overrides: Arc<moka::sync::Cache<String, (String, u16)>>,
    dns: tokio::sync::OnceCell<Option<hickory_resolver::TokioResolver>>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            cache: moka::sync::Cache::new(10_000),
            overrides: Arc::new(
                moka::sync::Cache::builder().max_capacity(10_000).time_to_live(WELL_KNOWN_MAX_TTL).build(),
            ),
            dns: tokio::sync::OnceCell::new(),
        }
    }
}

impl Discovery {
    /// The resolver to install in the HTTP client that sends federation requests.
    pub fn resolver(&self) -> OverrideResolver {
        OverrideResolver { overrides: self.overrides.clone() }
    }

    /// Resolves `name`, using `well_known` (a no-redirect-loop, size-capped HTTPS client) for step 3.
    pub async fn resolve(&self, well_known: &reqwest::Client, name: &ServerName) -> Destination {
        let hostname = match first_step(name) {
            Step::Done(d) => return d,
            Step::Lookup(h) => h,
        };
        if let Some((d, until)) = self.cache.get(&hostname)
            && until > Instant::now()
        {
            self.remember(&d);
            return d;
        }
        let (dest, ttl) = match fetch_well_known(well_known, &hostname).await {
            Ok((delegated, ttl)) => {
                let dest = match first_step(&delegated) {
                    Step::Done(d) => d,
                    Step::Lookup(h) => self.srv_or_default(h).await,
                };
                (dest, ttl)
            }
            Err(e) => {
                tracing::debug!(server = %name, error = %e, "no usable well-known");
                (self.srv_or_default(hostname.clone()).await, WELL_KNOWN_ERROR_TTL)
            }
        };
        self.cache.insert(hostname, (dest.clone(), Instant::now() + ttl));
        self.remember(&dest);
        dest
    }

    fn remember(&self, d: &Destination) {
        if let Some(target) = &d.connect {
            self.overrides.insert(d.authority.clone(), target.clone());
        }
    }

    /// Steps 3.3–3.5 / 4–5: SRV `_matrix-fed._tcp`, then `_matrix._tcp`, then port 8448.
    async fn srv_or_default(&self, host: String) -> Destination {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Some(target) = self.srv(&format!("{service}.{host}.")).await {
                return Destination { authority: host, connect: Some(target), host_header: None };
            }
        }
        Destination { connect: Some((host.clone(), DEFAULT_PORT)), authority: host, host_header: None }
    }

    async fn srv(&self, query: &str) -> Option<(String, u16)> {
        let dns = self
            .dns
            .get_or_init(|| async {
                match hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "no DNS resolver for SRV lookups");
                        None
                    }
                }
            })
            .await
            .as_ref()?;
        let lookup = tokio::time::timeout(Duration::from_secs(10), dns.srv_lookup(query)).await.ok()?.ok()?;
        let records = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                hickory_resolver::proto::rr::RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_utf8())),
                _ => None,
            })
            .collect();
        pick_srv(records)
    }
}

async fn fetch_well_known(client: &reqwest::Client, host: &str) -> Result<(OwnedServerName, Duration), String> {
    let url = format!("https://{host}/.well-known/matrix/server");
    let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let ttl = well_known_ttl(resp.headers(), SystemTime::now());
    let body = super::client::read_capped(resp, WELL_KNOWN_MAX_BYTES).await.map_err(|e| e.to_string())?;
    let delegated = parse_well_known(&body).ok_or("invalid well-known document")?;
    Ok((delegated, ttl))
}

/// The HTTP client's DNS resolver: a host with a connect override (an SRV target or port 8448)
/// resolves to the target's addresses on the target's port; any other name resolves normally
/// (its port then comes from the URL). The resolver sees only the host name, so a host both
/// delegated without a port (`example.org`, SRV) and named with an explicit port
/// (`example.org:8448`) by another server name resolves to the SRV target's addresses for both
/// (the explicit port still wins); federation never needs that combination in practice.
#[derive(Clone)]
pub struct OverrideResolver {
    overrides: Arc<moka::sync::Cache<String, (String, u16)>>,
}

impl reqwest::dns::Resolve for OverrideResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let target = self.overrides.get(name.as_str());
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let (host, port) = target.unwrap_or((name, 0));
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn step(name: &str) -> Step {
        first_step(ServerName::parse(name).unwrap().as_ref())
    }

    fn done(authority: &str) -> Step {
        Step::Done(Destination { authority: authority.into(), connect: None, host_header: None })
    }

    #[test]
    fn literals_and_explicit_ports_need_no_lookup() {
        let bare = |a: &str, h: &str| {
            Step::Done(Destination { authority: a.into(), connect: None, host_header: Some(h.into()) })
        };
        assert_eq!(step("1.2.3.4"), bare("1.2.3.4:8448", "1.2.3.4"));
        assert_eq!(step("1.2.3.4:9000"), done("1.2.3.4:9000"));
        assert_eq!(step("[::1]"), bare("[::1]:8448", "[::1]"));
        assert_eq!(step("[2001:db8::1]:443"), done("[2001:db8::1]:443"));
        assert_eq!(step("ville.fr:8448"), done("ville.fr:8448"));
        assert_eq!(step("127.0.0.1:40000"), done("127.0.0.1:40000"));
        assert_eq!(step("Ville.FR"), Step::Lookup("ville.fr".into()));
        assert_eq!(step("localhost"), Step::Lookup("localhost".into()));
    }

    #[test]
    fn destination_hosts() {
        let d = |a: &str, c: Option<(&str, u16)>| Destination {
            authority: a.into(),
            connect: c.map(|(h, p)| (h.to_owned(), p)),
            host_header: None,
        };
        assert_eq!(d("ville.fr:8448", None).host(), "ville.fr");
        assert_eq!(d("[::1]:8448", None).host(), "[::1]");
        assert_eq!(d("1.2.3.4:8448", None).host(), "1.2.3.4");
        assert_eq!(d("ville.fr", Some(("matrix.ville.fr", 443))).host(), "ville.fr");
    }

    #[test]
    fn well_known_documents() {
        let p = |s: &str| parse_well_known(s.as_bytes()).map(|n| n.as_str().to_owned());
        assert_eq!(p(r#"{"m.server": "matrix.ville.fr:443"}"#).as_deref(), Some("matrix.ville.fr:443"));
        assert_eq!(p(r#"{"m.server": "matrix.ville.fr"}"#).as_deref(), Some("matrix.ville.fr"));
        assert_eq!(p(r#"{"m.server": "[::1]:8448"}"#).as_deref(), Some("[::1]:8448"));
        assert_eq!(p(r#"{"m.server": "https://matrix.ville.fr"}"#), None);
        assert_eq!(p(r#"{"m.server": "matrix.ville.fr:99999"}"#), None);
        assert_eq!(p(r#"{"m.server": 12}"#), None);
        assert_eq!(p(r#"{"other": "x"}"#), None);
        assert_eq!(p(r#"["m.server"]"#), None);
        assert_eq!(p("not json"), None);
        let huge = format!(r#"{{"m.server": "a.fr", "pad": "{}"}}"#, "x".repeat(WELL_KNOWN_MAX_BYTES));
        assert_eq!(p(&huge), None);
        // A delegated name without a port goes to SRV; with one, directly there.
        let delegated = parse_well_known(br#"{"m.server": "matrix.ville.fr"}"#).unwrap();
        assert_eq!(first_step(&delegated), Step::Lookup("matrix.ville.fr".into()));
        let delegated = parse_well_known(br#"{"m.server": "matrix.ville.fr:443"}"#).unwrap();
        assert_eq!(first_step(&delegated), done("matrix.ville.fr:443"));
    }

    #[test]
    fn well_known_cache_lifetimes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, HeaderValue::from_static(v));
            }
            well_known_ttl(&m, now)
        };
        assert_eq!(h(&[]), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(h(&[("cache-control", "max-age=3600")]), Duration::from_secs(3600));
        assert_eq!(h(&[("cache-control", "public, max-age=7200")]), Duration::from_secs(7200));
        assert_eq!(h(&[("cache-control", "max-age=999999999")]), WELL_KNOWN_MAX_TTL);
        assert_eq!(h(&[("cache-control", "max-age=1")]), WELL_KNOWN_MIN_TTL);
        assert_eq!(h(&[("cache-control", "no-store")]), WELL_KNOWN_MIN_TTL);
        assert_eq!(h(&[("cache-control", "max-age=garbage")]), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(h(&[("expires", "Sun, 06 Nov 1994 10:49:37 GMT")]), Duration::from_secs(7200));
        assert_eq!(h(&[("expires", "Sun, 06 Nov 1994 08:00:00 GMT")]), WELL_KNOWN_MIN_TTL);
        assert_eq!(h(&[("expires", "0")]), WELL_KNOWN_DEFAULT_TTL);
        // Cache-Control wins over Expires.
        assert_eq!(
            h(&[("cache-control", "max-age=600"), ("expires", "Sun, 06 Nov 1994 10:49:37 GMT")]),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            httpdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(httpdate("Thu, 01 Jan 1970 00:00:00 GMT"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(httpdate("Sun, 06 Foo 1994 08:49:37 GMT"), None);
        assert_eq!(httpdate("Sun, 06 Nov 1994 25:49:37 GMT"), None);
        assert_eq!(httpdate(""), None);
    }

    #[test]
    fn srv_selection() {
        assert_eq!(pick_srv(vec![]), None);
        assert_eq!(
            pick_srv(vec![
                (20, 0, 8448, "b.ville.fr.".into()),
                (10, 5, 443, "a.ville.fr.".into()),
                (10, 50, 8443, "c.ville.fr.".into()),
            ]),
            Some(("c.ville.fr".into(), 8443))
        );
        assert_eq!(pick_srv(vec![(0, 0, 8448, ".".into())]), None);
    }
}
