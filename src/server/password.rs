//! Password hashing with argon2id (the crate's defaults: 19 MiB, 2 passes), run on the
//! blocking pool and limited to one hash per core at a time so a flood of logins cannot
//! exhaust memory. An unknown user's password is checked against a dummy hash: the answer
//! takes as long as for a wrong password.

use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use std::sync::{Arc, LazyLock};
use tokio::sync::Semaphore;

/// A hash checked for users that do not exist, so that their answer takes as long as a
/// wrong password's.
static DUMMY: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(b"nobody's password", &salt)
        .map(|h| h.to_string())
        .expect("argon2id with the default parameters hashes any short password")
});

/// Make the dummy hash now (blocking; it costs one hash), rather than at the first unknown
/// user.
pub fn warm_up() {
    LazyLock::force(&DUMMY);
}

/// Hashes and verifies passwords off the async runtime.
#[derive(Clone)]
pub struct Hasher {
    slots: Arc<Semaphore>,
}

impl Default for Hasher {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Hasher { slots: Arc::new(Semaphore::new(cores)) }
    }
}

impl Hasher {
    /// The PHC string of a new argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let _slot = self.slots.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| anyhow::anyhow!("argon2: {e}"))
        })
        .await?
    }

    /// Whether `password` matches the PHC string `hash`. With no hash (no such user) the
    /// answer is false, after the same work as for a wrong password.
    pub async fn verify(&self, password: String, hash: Option<String>) -> anyhow::Result<bool> {
        let _slot = self.slots.acquire().await?;
        tokio::task::spawn_blocking(move || {
            let known = hash.is_some();
            let hash = hash.unwrap_or_else(|| DUMMY.clone());
            let parsed =
                PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            let matches = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
            Ok(known && matches)
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unknown_users_cost_a_hash_too() {
        let h = Hasher::default();
        let hash = h.hash("right password".into()).await.unwrap();
        assert!(h.verify("right password".into(), Some(hash.clone())).await.unwrap());
        assert!(!h.verify("wrong password".into(), Some(hash)).await.unwrap());
        assert!(!h.verify("nobody's password".into(), None).await.unwrap());
        assert!(!h.verify("anything".into(), None).await.unwrap());
    }
}
