//! Server-side request forgery protection for outgoing HTTP requests to client-chosen URLs (push
//! gateways, URL previews): CIDR ranges that are never contacted, and a DNS resolver that drops
//! forbidden addresses, so the addresses checked are the very addresses connected to (DNS
//! rebinding cannot slip past). IP-literal URLs never reach the resolver: check them with
//! [`IpPolicy::allows_url`] before sending and on every redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// A CIDR range, e.g. `10.0.0.0/8` or `fc00::/7` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    addr: IpAddr,
    prefix: u8,
}

impl IpRange {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("`{s}` is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{s}`: bad prefix"))?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Which addresses may be contacted: anything outside the blacklist, plus the whitelist.
#[derive(Debug, Clone)]
pub struct IpPolicy {
    blacklist: Vec<IpRange>,
    whitelist: Vec<IpRange>,
}

impl IpPolicy {
    pub fn from_lists(blacklist: &[String], whitelist: &[String]) -> Result<Self, String> {
        let parse = |l: &[String]| l.iter().map(|s| IpRange::parse(s)).collect::<Result<Vec<_>, _>>();
        Ok(Self { blacklist: parse(blacklist)?, whitelist: parse(whitelist)? })
    }

    /// Whether `ip` may be contacted. IPv4-mapped IPv6 addresses are judged as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.whitelist.iter().any(|r| r.contains(ip)) || !self.blacklist.iter().any(|r| r.contains(ip))
    }

    /// Whether the URL's host may be contacted as far as can be told without DNS: an IP literal
    /// is judged here, a domain later by [`GuardedResolver`]. `None` for a URL without a host.
    pub fn allows_url(&self, url: &url::Url) -> Option<bool> {
        match url.host()? {
            url::Host::Ipv4(ip) => Some(self.allows(IpAddr::V4(ip))),
            url::Host::Ipv6(ip) => Some(self.allows(IpAddr::V6(ip))),
            url::Host::Domain(_) => Some(true),
        }
    }
}

/// The error of a resolution whose every address is forbidden, or of a redirect to a forbidden
/// target.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves only to forbidden addresses", self.0)
    }
}

impl std::error::Error for Refused {}

/// A DNS resolver that keeps only the addresses the policy allows.
pub struct GuardedResolver(pub Arc<IpPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved.into_iter().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether a request failed because its target (or a redirect's) is forbidden.
pub fn is_refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<Refused>() {
            return true;
        }
        source = s.source();
    }
    false
}
