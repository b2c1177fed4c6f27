//! Password hashing with argon2id. Hashing is CPU-bound and deliberately slow, so it runs on the
//! blocking thread pool, never on the async workers.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::config::AuthConfig;

#[derive(Clone)]
pub struct Passwords {
    params: Params,
    /// Bounds concurrent hashes to the number of cores: each one holds `argon2_memory_kib` of
    /// memory and a full core, so an unbounded burst of logins would exhaust both.
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// A valid hash of a random password, verified against when the account does not exist so
    /// that a wrong user name costs as much time as a wrong password (no user enumeration).
    dummy_hash: String,
}

impl Passwords {
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let params = Params::new(cfg.argon2_memory_kib, cfg.argon2_iterations, cfg.argon2_parallelism, None)
            .map_err(|e| anyhow::anyhow!("invalid argon2 parameters: {e}"))?;
        let dummy_hash = hash_with(&params, &hex::encode(rand::random::<[u8; 16]>()))?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Ok(Self { params, dummy_hash, permits: std::sync::Arc::new(tokio::sync::Semaphore::new(cores)) })
    }

    pub async fn hash(&self, password: &str) -> anyhow::Result<String> {
        let params = self.params.clone();
        let password = password.to_owned();
        let _permit = self.permits.acquire().await?;
        tokio::task::spawn_blocking(move || hash_with(&params, &password)).await?
    }

    /// Verifies `password` against `hash` (or against the dummy hash when `hash` is `None`, which
    /// always fails but takes the same time).
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> bool {
        let (hash, real) = match hash {
            Some(h) => (h.to_owned(), true),
            None => (self.dummy_hash.clone(), false),
        };
        let password = password.to_owned();
        let Ok(_permit) = self.permits.acquire().await else { return false };
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && real
    }
}

fn hash_with(params: &Params, password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2 hashing failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hash_and_verify() {
        let cfg = AuthConfig { argon2_memory_kib: 64, argon2_iterations: 1, ..Default::default() };
        let p = Passwords::new(&cfg).unwrap();
        let h = p.hash("correct horse").await.unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(p.verify("correct horse", Some(&h)).await);
        assert!(!p.verify("wrong", Some(&h)).await);
        assert!(!p.verify("correct horse", None).await);
        assert!(!p.verify("x", Some("not a hash")).await);
    }
}
