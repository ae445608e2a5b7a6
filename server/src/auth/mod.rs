//! etcd's auth: users, roles, key permissions, tokens. `store` is the state
//! machine every member applies from the log (pure, no I/O); `perms` merges
//! a user's permissions; `token` issues and checks tokens. This module does
//! not decide who the caller is (`api/` reads tokens and certificates) and
//! does not persist anything (`raft::KvState` stores the state with the
//! key space, in the same write).

mod perms;
pub mod store;
pub mod token;

pub use store::{AuthApplied, AuthStore, ROOT};
pub use token::Tokens;

use parking_lot::RwLock;

use crate::error::{Error, Result};

/// Who makes a request, as etcd's AuthInfo: a user and the auth revision
/// their token was issued at (the current one for simple tokens and
/// certificate users).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthInfo {
    pub user: String,
    pub revision: u64,
}

impl AuthInfo {
    /// The member itself, for what it proposes on its own (revoking expired
    /// leases): root at any revision, as etcd's internal root token. Root
    /// cannot lose its role or be deleted while auth is enabled.
    pub fn member() -> Self {
        AuthInfo {
            user: ROOT.into(),
            revision: u64::MAX,
        }
    }
}

/// etcd's bcrypt cost when `--bcrypt-cost` is not given.
pub const DEFAULT_BCRYPT_COST: u32 = 10;

/// A member's auth: the replicated state and its token issuer.
pub struct Auth {
    pub store: RwLock<AuthStore>,
    tokens: RwLock<Tokens>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            store: RwLock::new(AuthStore::default()),
            tokens: RwLock::new(Tokens::from_flags("simple", 0).expect("simple tokens")),
        }
    }
}

impl Auth {
    /// Uses `tokens` from now on (set once at start, from the flags).
    pub fn set_tokens(&self, tokens: Tokens) {
        *self.tokens.write() = tokens;
    }

    pub fn tokens(&self) -> parking_lot::RwLockReadGuard<'_, Tokens> {
        self.tokens.read()
    }

    pub fn enabled(&self) -> bool {
        self.store.read().enabled()
    }
}

/// The longest password bcrypt takes whole (Go's refuses longer ones; the
/// bcrypt crate would silently cut them).
pub const MAX_PASSWORD: usize = 72;

/// Hashes a password as etcd does (bcrypt, `$2a$`, at `cost`).
pub fn hash_password(password: &str, cost: u32) -> Result<String> {
    if password.len() > MAX_PASSWORD {
        return Err(Error::Unknown(
            "bcrypt: password length exceeds 72 bytes".into(),
        ));
    }
    bcrypt::hash_with_result(password, cost)
        .map(|h| h.format_for_version(bcrypt::Version::TwoA))
        .map_err(|e| Error::Unknown(format!("bcrypt: {e}")))
}

/// Whether `password` matches the stored bcrypt `hash`.
pub fn password_matches(password: &str, hash: &[u8]) -> bool {
    password.len() <= MAX_PASSWORD
        && std::str::from_utf8(hash)
            .ok()
            .is_some_and(|h| bcrypt::verify(password, h).unwrap_or(false))
}

/// The cost of a bcrypt hash (`$2a$10$...`), if it is one.
pub fn hash_cost(hash: &str) -> Option<u32> {
    let mut parts = hash.split('$');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(""), Some("2a" | "2b" | "2y"), Some(cost), Some(rest)) if rest.len() == 53 => {
            cost.parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("pass", 4).unwrap();
        assert!(h.starts_with("$2a$04$"), "{h}");
        assert!(password_matches("pass", h.as_bytes()));
        assert!(!password_matches("Pass", h.as_bytes()));
        assert!(!password_matches("pass", b"not a hash"));
        assert_eq!(hash_cost(&h), Some(4));
        assert_eq!(hash_cost("$2a$31$short"), None);
        let long = "x".repeat(73);
        assert!(hash_password(&long, 4).is_err());
        let h72 = hash_password(&long[..72], 4).unwrap();
        assert!(password_matches(&long[..72], h72.as_bytes()));
        assert!(!password_matches(&long, h72.as_bytes()));
    }
}
