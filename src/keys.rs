//! The server's ed25519 signing key: loaded from a Synapse-format file when configured, otherwise
//! generated on first start and kept in the database (so every instance shares it).

use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;

use crate::storage;

pub struct ServerKey {
    /// `ed25519:<version>`
    pub key_id: String,
    pub signing_key: SigningKey,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl ServerKey {
    pub fn generate() -> Self {
        let seed: [u8; 32] = rand::random();
        let version: String = {
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..4).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect()
        };
        Self { key_id: format!("ed25519:a_{version}"), signing_key: SigningKey::from_bytes(&seed) }
    }

    pub fn from_seed(key_id: String, seed: &[u8]) -> anyhow::Result<Self> {
        let seed: [u8; 32] = seed.try_into().context("signing key seed must be 32 bytes")?;
        Ok(Self { key_id, signing_key: SigningKey::from_bytes(&seed) })
    }

    /// Unpadded base64 of the public key, as published in `/_matrix/key/v2/server`.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.signing_key.verifying_key().as_bytes())
    }

    /// PKCS#8 DER, the form ruma's `Ed25519KeyPair::from_der` takes for signing events.
    pub fn pkcs8_der(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.signing_key.to_pkcs8_der().context("encoding signing key")?.as_bytes().to_vec())
    }

    /// Synapse's key file format: `ed25519 <version> <unpadded base64 seed>`.
    pub fn to_synapse_format(&self) -> String {
        let version = self.key_id.trim_start_matches("ed25519:");
        format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(self.signing_key.to_bytes()))
    }

    pub fn from_synapse_format(text: &str) -> anyhow::Result<Self> {
        let line = text.lines().find(|l| !l.trim().is_empty()).context("empty key file")?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [alg, version, seed] = parts[..] else { bail!("expected `ed25519 <version> <seed>`") };
        if alg != "ed25519" {
            bail!("unsupported key algorithm {alg}");
        }
        let seed = decode_base64_lenient(seed).context("key seed is not base64")?;
        Self::from_seed(format!("ed25519:{version}"), &seed)
    }
}

/// Decodes unpadded or padded standard base64, tolerating non-zero trailing bits (as other
/// Matrix implementations do; the spec's own test seed has them).
pub fn decode_base64_lenient(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s)
}

/// Loads the configured key file, or the database's key (creating it on first start).
pub async fn load_or_create(pool: &sqlx::PgPool, path: Option<&Path>) -> anyhow::Result<ServerKey> {
    if let Some(path) = path {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read signing key file {}", path.display()))?;
        return ServerKey::from_synapse_format(&text)
            .with_context(|| format!("invalid signing key file {}", path.display()));
    }
    if let Some((key_id, seed)) = storage::meta::active_signing_key(pool).await? {
        return ServerKey::from_seed(key_id, &seed);
    }
    let fresh = ServerKey::generate();
    let (key_id, seed) =
        storage::meta::insert_signing_key_if_none(pool, &fresh.key_id, &fresh.signing_key.to_bytes()).await?;
    if key_id == fresh.key_id {
        tracing::info!(key_id, "generated the server signing key");
    }
    ServerKey::from_seed(key_id, &seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synapse_format_round_trip() {
        let k = ServerKey::generate();
        let text = k.to_synapse_format();
        let back = ServerKey::from_synapse_format(&text).unwrap();
        assert_eq!(back.key_id, k.key_id);
        assert_eq!(back.public_key_base64(), k.public_key_base64());
        assert!(k.pkcs8_der().unwrap().len() > 32);
        assert!(ServerKey::from_synapse_format("rsa a b").is_err());
    }

    #[test]
    fn key_signs_like_ruma_expects() {
        // The PKCS#8 form must be accepted by ruma's signing key type.
        let k = ServerKey::generate();
        let version = k.key_id.trim_start_matches("ed25519:").to_owned();
        let pair = ruma::signatures::Ed25519KeyPair::from_der(&k.pkcs8_der().unwrap(), version).unwrap();
        assert_eq!(STANDARD_NO_PAD.encode(pair.public_key()), k.public_key_base64());
    }
}
