//! From a provider's claims to a Matrix account: Jinja templates (the syntax of Synapse's
//! mapping provider: `{{ user.preferred_username }}`, filters `lower`, `localpart_from_email`),
//! attribute requirements and the e-mail domain allow-list.
//!
//! Claims come from the provider, and the provider relays what users typed into their directory
//! entry: templates run with a fuel limit, and every rendered value is bounded.

use std::collections::BTreeSet;

use minijinja::Environment;
use serde_json::Value;

use super::config::{AttributeRequirement, SsoProviderConfig};

/// Template instructions one rendering may execute: far above what a mapping needs, far below
/// what would stall a request.
const FUEL: u64 = 50_000;
/// Longest rendered value kept (a localpart is bounded again by the user ID rules).
const MAX_RENDERED: usize = 1024;

const LOCALPART: &str = "localpart";
const DISPLAY_NAME: &str = "display_name";
const EMAIL: &str = "email";

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(16);
    env.add_filter("localpart_from_email", |s: String| s.split_once('@').map_or(s.clone(), |(l, _)| l.to_owned()));
    env
}

/// Compiles a template, for configuration checks.
pub fn check_template(source: &str) -> Result<(), String> {
    let mut env = environment();
    env.add_template_owned("t".to_owned(), source.to_owned()).map_err(|e| e.to_string())
}

/// A provider's compiled templates.
pub struct Mapper {
    env: Environment<'static>,
    has_display_name: bool,
    has_email: bool,
}

impl Mapper {
    pub fn new(p: &SsoProviderConfig) -> Result<Self, String> {
        let mut env = environment();
        env.add_template_owned(LOCALPART.to_owned(), p.localpart_template.clone()).map_err(|e| e.to_string())?;
        if let Some(t) = &p.display_name_template {
            env.add_template_owned(DISPLAY_NAME.to_owned(), t.clone()).map_err(|e| e.to_string())?;
        }
        if let Some(t) = &p.email_template {
            env.add_template_owned(EMAIL.to_owned(), t.clone()).map_err(|e| e.to_string())?;
        }
        Ok(Self { env, has_display_name: p.display_name_template.is_some(), has_email: p.email_template.is_some() })
    }

    /// The claim names the templates read (`user.X`), so that a missing one can be fetched from
    /// the userinfo endpoint.
    pub fn referenced_claims(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for name in [LOCALPART, DISPLAY_NAME, EMAIL] {
            if let Ok(t) = self.env.get_template(name) {
                for v in t.undeclared_variables(true) {
                    if let Some(claim) = v.strip_prefix("user.") {
                        out.insert(claim.split('.').next().unwrap_or(claim).to_owned());
                    }
                }
            }
        }
        if !self.has_email {
            out.insert("email".into());
        }
        out
    }

    fn render(&self, name: &str, claims: &Value) -> Result<Option<String>, String> {
        let t = self.env.get_template(name).map_err(|e| e.to_string())?;
        let out = t.render(minijinja::context! { user => claims }).map_err(|e| e.to_string())?;
        let out = out.trim();
        if out.len() > MAX_RENDERED {
            return Err(format!("the {name} template produced more than {MAX_RENDERED} bytes"));
        }
        Ok((!out.is_empty()).then(|| out.to_owned()))
    }

    /// What the claims say about the account.
    pub fn map(&self, claims: &Value) -> Result<MappedUser, String> {
        let raw = self.render(LOCALPART, claims)?.ok_or("the localpart template produced nothing")?;
        let display_name = if self.has_display_name { self.render(DISPLAY_NAME, claims)? } else { None };
        let email = if self.has_email {
            self.render(EMAIL, claims)?
        } else {
            claims.get("email").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
        };
        let email = email.map(|e| e.to_lowercase());
        if let Some(e) = &email
            && (e.len() > 320 || !e.contains('@'))
        {
            return Err(format!("`{e}` is not an e-mail address"));
        }
        Ok(MappedUser { localpart: map_localpart(&raw), display_name, email })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedUser {
    pub localpart: String,
    pub display_name: Option<String>,
    pub email: Option<String>,
}

/// Turns any string into a valid localpart the way Synapse does (`map_username_to_mxid_localpart`):
/// lower case, then every character outside `a-z 0-9 . _ = - /` as `=xx` (its UTF-8 bytes in hex).
pub fn map_localpart(s: &str) -> String {
    let lower = s.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    for b in lower.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02x}"));
        }
    }
    out
}

/// Whether the claims satisfy every requirement.
pub fn requirements_met(reqs: &[AttributeRequirement], claims: &Value) -> bool {
    reqs.iter().all(|r| {
        let wanted: Vec<&str> = match (&r.value, &r.one_of) {
            (Some(v), _) => vec![v.as_str()],
            (None, Some(list)) => list.iter().map(String::as_str).collect(),
            (None, None) => return false,
        };
        match claims.get(&r.attribute) {
            Some(Value::String(s)) => wanted.contains(&s.as_str()),
            Some(Value::Array(items)) => items.iter().any(|i| i.as_str().is_some_and(|s| wanted.contains(&s))),
            Some(Value::Bool(b)) => wanted.contains(&if *b { "true" } else { "false" }),
            Some(Value::Number(n)) => wanted.contains(&n.to_string().as_str()),
            _ => false,
        }
    })
}

/// Whether an e-mail address's domain is allowed (no list: every domain is).
pub fn email_domain_allowed(allowed: &[String], email: Option<&str>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some((_, domain)) = email.and_then(|e| e.rsplit_once('@')) else { return false };
    allowed.iter().any(|d| d.eq_ignore_ascii_case(domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider(localpart: &str, display: Option<&str>, email: Option<&str>) -> SsoProviderConfig {
        SsoProviderConfig {
            localpart_template: localpart.into(),
            display_name_template: display.map(Into::into),
            email_template: email.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn synapse_style_templates() {
        let m = Mapper::new(&provider(
            "{{ user.email | localpart_from_email | lower }}",
            Some("{{ user.given_name }} {{ user.family_name }}"),
            None,
        ))
        .unwrap();
        let u =
            m.map(&json!({"email": "Jean.Dupont@Ville.fr", "given_name": "Jean", "family_name": "Dupont"})).unwrap();
        assert_eq!(u.localpart, "jean.dupont");
        assert_eq!(u.display_name.as_deref(), Some("Jean Dupont"));
        assert_eq!(u.email.as_deref(), Some("jean.dupont@ville.fr"));
        assert!(m.referenced_claims().contains("email"));
        assert!(m.referenced_claims().contains("given_name"));
    }

    #[test]
    fn missing_claim_and_escaping() {
        let m = Mapper::new(&provider("{{ user.preferred_username }}", None, None)).unwrap();
        assert!(m.map(&json!({"sub": "x"})).is_err(), "empty localpart is refused");
        assert_eq!(m.map(&json!({"preferred_username": "Élodie M"})).unwrap().localpart, "=c3=a9lodie=20m");
        assert!(m.map(&json!({"preferred_username": "a", "email": "not-an-address"})).is_err());
    }

    #[test]
    fn runaway_templates_stop() {
        let m = Mapper::new(&provider(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
        ))
        .unwrap();
        assert!(m.map(&json!({})).is_err());
        let m = Mapper::new(&provider("{{ 'x' * 5000 }}", None, None)).unwrap();
        assert!(m.map(&json!({})).is_err(), "over-long output is refused");
        assert!(check_template("{{ user.").is_err());
    }

    #[test]
    fn requirements_and_domains() {
        let reqs = vec![
            AttributeRequirement { attribute: "groups".into(), value: Some("agents".into()), one_of: None },
            AttributeRequirement {
                attribute: "acr".into(),
                value: None,
                one_of: Some(vec!["eidas1".into(), "eidas2".into()]),
            },
        ];
        assert!(requirements_met(&reqs, &json!({"groups": ["x", "agents"], "acr": "eidas1"})));
        assert!(!requirements_met(&reqs, &json!({"groups": "x", "acr": "eidas1"})));
        assert!(!requirements_met(&reqs, &json!({"groups": "agents"})));
        let allowed = vec!["ville.fr".to_owned()];
        assert!(email_domain_allowed(&allowed, Some("a@Ville.FR")));
        assert!(!email_domain_allowed(&allowed, Some("a@ville.fr.evil.com")));
        assert!(!email_domain_allowed(&allowed, None));
        assert!(email_domain_allowed(&[], None));
    }
}
