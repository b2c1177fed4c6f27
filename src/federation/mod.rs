//! Federation (issue 13), the foundation the rest builds on: our server keys and the notary
//! (`keys`), `X-Matrix` request signing and verification (`auth`), server discovery
//! (`discovery`), the outgoing HTTP client (`client`), server names in IDs (`names`) and the TLS
//! federation listener (`tls`). Handlers are in `api/federation/`.

pub mod acl;
pub mod auth;
pub mod backfill;
pub mod client;
pub mod discovery;
pub mod e2ee;
pub mod edu;
pub mod inbound;
pub mod keys;
pub mod media;
pub mod membership;
pub mod names;
pub mod pdu;
pub mod sender;
pub mod tls;

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use ruma::{OwnedServerName, ServerName};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::keys::ServerKey;

/// The federation service: who we are, whom we talk to, the outgoing client and the key cache.
pub struct Federation {
    pub enabled: bool,
    pub signer: Signer,
    /// `federation.allowed_servers`; `None` is open federation.
    allowed: Option<HashSet<String>>,
    pub client: client::FederationClient,
    pub keys: keys::KeyCache,
    pub sender: sender::Sender,
}

impl Federation {
    pub fn new(config: &Config, key: &ServerKey) -> anyhow::Result<Self> {
        let server_name = ServerName::parse(&config.server_name).map_err(|e| anyhow::anyhow!("server_name: {e}"))?;
        let allowed = (!config.federation.allowed_servers.is_empty())
            .then(|| config.federation.allowed_servers.iter().cloned().collect());
        Ok(Self {
            enabled: config.federation_enabled(),
            signer: Signer { server_name, key_id: key.key_id.clone(), key: key.signing_key.clone() },
            allowed,
            client: client::FederationClient::new(&config.federation)?,
            keys: keys::KeyCache::default(),
            sender: sender::Sender::default(),
        })
    }

    /// Whether `server` may talk to us and be contacted (`federation.allowed_servers`).
    pub fn is_allowed(&self, server: &ServerName) -> bool {
        server == self.signer.server_name || self.allowed.as_ref().is_none_or(|a| a.contains(server.as_str()))
    }

    /// [`Federation::is_allowed`] for a server name as text (one that does not parse is not).
    pub fn is_allowed_name(&self, server: &str) -> bool {
        ServerName::parse(server).is_ok_and(|s| self.is_allowed(&s))
    }

    pub fn server_name(&self) -> &ServerName {
        &self.signer.server_name
    }
}

/// Our signing identity: server name, key ID and ed25519 key.
pub struct Signer {
    pub server_name: OwnedServerName,
    /// `ed25519:<version>`
    pub key_id: String,
    key: SigningKey,
}

impl Signer {
    pub fn new(server_name: OwnedServerName, key_id: String, key: SigningKey) -> Self {
        Self { server_name, key_id, key }
    }

    /// Unpadded base64 signature of `bytes`.
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        STANDARD_NO_PAD.encode(self.key.sign(bytes).to_bytes())
    }

    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.key.verifying_key().as_bytes())
    }

    /// Adds our signature to `value` (an object): `signatures.<us>.<key_id>`, over the canonical
    /// JSON of the object without `signatures` and `unsigned`. Other servers' signatures stay.
    pub fn sign_json(&self, value: &mut Value) -> Result<(), String> {
        let bytes = signed_bytes(value)?;
        let sig = self.sign_bytes(bytes.as_bytes());
        let obj = value.as_object_mut().ok_or("not a JSON object")?;
        let sigs = obj.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
        let sigs = sigs.as_object_mut().ok_or("`signatures` is not an object")?;
        let ours = sigs.entry(self.server_name.as_str()).or_insert_with(|| Value::Object(Map::new()));
        let ours = ours.as_object_mut().ok_or("`signatures` entry is not an object")?;
        ours.insert(self.key_id.clone(), Value::String(sig));
        Ok(())
    }
}

/// Canonical JSON (the spec's: sorted keys, no whitespace, integers only within ±2^53).
pub fn canonical_json(value: &Value) -> Result<String, String> {
    ruma::CanonicalJsonValue::try_from(value.clone()).map(|v| v.to_string()).map_err(|e| e.to_string())
}

/// What a signature of a JSON object covers: its canonical JSON without `signatures` and
/// `unsigned`.
pub fn signed_bytes(value: &Value) -> Result<String, String> {
    let mut obj = value.as_object().ok_or("not a JSON object")?.clone();
    obj.remove("signatures");
    obj.remove("unsigned");
    canonical_json(&Value::Object(obj))
}

/// Decodes an ed25519 public key (unpadded or padded base64 of 32 bytes).
pub fn decode_public_key(b64: &str) -> Option<VerifyingKey> {
    if b64.len() > 64 {
        return None;
    }
    let bytes: [u8; 32] = crate::keys::decode_base64_lenient(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// Decodes an ed25519 signature (base64 of 64 bytes).
pub fn decode_signature(b64: &str) -> Option<Signature> {
    if b64.len() > 128 {
        return None;
    }
    let bytes: [u8; 64] = crate::keys::decode_base64_lenient(b64).ok()?.try_into().ok()?;
    Some(Signature::from_bytes(&bytes))
}

/// Whether `value` carries a valid signature of `server` with `key_id` made by `key`.
pub fn verify_json(value: &Value, server: &str, key_id: &str, key: &VerifyingKey) -> bool {
    let Some(sig) = value
        .get("signatures")
        .and_then(|s| s.get(server))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .and_then(decode_signature)
    else {
        return false;
    };
    match signed_bytes(value) {
        Ok(bytes) => key.verify_strict(bytes.as_bytes(), &sig).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer(name: &str) -> Signer {
        let k = ServerKey::generate();
        Signer { server_name: ServerName::parse(name).unwrap(), key_id: k.key_id, key: k.signing_key }
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let s = signer("a.example");
        let mut v = json!({"b": 1, "a": "x", "unsigned": {"age": 3}});
        s.sign_json(&mut v).unwrap();
        let vk = decode_public_key(&s.public_key_base64()).unwrap();
        assert!(verify_json(&v, "a.example", &s.key_id, &vk));
        // `unsigned` is not covered.
        v["unsigned"] = json!({"age": 4});
        assert!(verify_json(&v, "a.example", &s.key_id, &vk));
        v["b"] = json!(2);
        assert!(!verify_json(&v, "a.example", &s.key_id, &vk));
        assert!(!verify_json(&v, "b.example", &s.key_id, &vk));
    }

    #[test]
    fn a_second_signature_keeps_the_first() {
        let (a, b) = (signer("a.example"), signer("[::1]:8448"));
        let mut v = json!({"server_name": "a.example"});
        a.sign_json(&mut v).unwrap();
        b.sign_json(&mut v).unwrap();
        let (ka, kb) =
            (decode_public_key(&a.public_key_base64()).unwrap(), decode_public_key(&b.public_key_base64()).unwrap());
        assert!(verify_json(&v, "a.example", &a.key_id, &ka));
        assert!(verify_json(&v, "[::1]:8448", &b.key_id, &kb));
    }

    #[test]
    fn hostile_keys_and_signatures_are_refused() {
        assert!(decode_public_key("").is_none());
        assert!(decode_public_key("AAAA").is_none());
        assert!(decode_public_key(&"A".repeat(10_000)).is_none());
        assert!(decode_signature("not base64!").is_none());
        assert!(decode_signature(&"A".repeat(100_000)).is_none());
        // Floats are not canonical JSON.
        assert!(canonical_json(&json!({"a": 1.5})).is_err());
    }
}
