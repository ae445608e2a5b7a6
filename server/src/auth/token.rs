//! Auth tokens (`--auth-token`): etcd's simple tokens, random and kept in
//! each member's memory, and JWTs, signed and verifiable by any member with
//! the key.
//!
//! A simple token is `<16 letters>.<log index>`: the member that checked the
//! password draws the letters, and every member registers the token when it
//! applies that Authenticate entry, so the token works on all of them. It
//! lasts `--auth-token-ttl` seconds from its last use (etcd's sliding TTL)
//! and dies with the process. The number kept is bounded per user: past
//! [`MAX_TOKENS_PER_USER`], that user's oldest goes (users are bounded by
//! who may create them), so one user logging in in a loop logs out nobody
//! else.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;

use super::AuthInfo;
use crate::error::{Error, Result};

/// Most simple tokens a member keeps for one user.
pub const MAX_TOKENS_PER_USER: usize = 1024;
/// etcd's JWT lifetime when the options name none.
const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);

/// How this member issues and checks tokens.
pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(Box<JwtTokens>),
}

pub struct SimpleTokens {
    ttl: Duration,
    live: Mutex<Live>,
}

/// Simple tokens: token -> (user, expiry), and each user's in issue order.
#[derive(Default)]
struct Live {
    tokens: HashMap<String, (String, Instant)>,
    by_user: HashMap<String, VecDeque<String>>,
}

impl Live {
    fn remove(&mut self, token: &str) {
        if let Some((user, _)) = self.tokens.remove(token) {
            if let Some(q) = self.by_user.get_mut(&user) {
                q.retain(|t| t != token);
                if q.is_empty() {
                    self.by_user.remove(&user);
                }
            }
        }
    }
}

pub struct JwtTokens {
    alg: jsonwebtoken::Algorithm,
    sign: Option<jsonwebtoken::EncodingKey>,
    verify: jsonwebtoken::DecodingKey,
    ttl: Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: u64,
}

/// etcd's option string: a type, then `key=value` fields.
fn options(spec: &str) -> Result<(String, HashMap<String, String>), String> {
    let mut parts = spec.split(',');
    let kind = parts.next().unwrap_or_default().to_string();
    let mut opts = HashMap::new();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .filter(|(_, v)| !v.contains('='))
            .ok_or_else(|| format!("invalid auth options: {spec:?}"))?;
        if opts.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("invalid auth options: {spec:?}"));
        }
    }
    Ok((kind, opts))
}

impl Tokens {
    /// From `--auth-token` and `--auth-token-ttl` (seconds; 0: etcd's 300).
    pub fn from_flags(spec: &str, ttl_secs: u64) -> Result<Self, String> {
        let (kind, opts) = options(spec)?;
        match kind.as_str() {
            "simple" => Ok(Tokens::Simple(SimpleTokens {
                ttl: Duration::from_secs(if ttl_secs == 0 { 300 } else { ttl_secs }),
                live: Mutex::new(Live::default()),
            })),
            "jwt" => Ok(Tokens::Jwt(Box::new(JwtTokens::new(&opts)?))),
            other => Err(format!("unknown token type {other:?} in --auth-token")),
        }
    }

    /// What the member that checked a password sends along with the
    /// Authenticate entry: a simple token's random part.
    pub fn prefix(&self) -> String {
        match self {
            Tokens::Simple(_) => {
                const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
                let mut rng = rand::thread_rng();
                (0..16)
                    .map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char)
                    .collect()
            }
            Tokens::Jwt(_) => String::new(),
        }
    }

    /// Whether every member keeps the tokens it issues (simple tokens), so
    /// every member must issue them.
    pub fn registers(&self) -> bool {
        matches!(self, Tokens::Simple(_))
    }

    /// Issues a token for `user` at auth revision `revision`; simple tokens
    /// are `<prefix>.<index>` of the applied entry.
    pub fn assign(&self, user: &str, revision: u64, prefix: &str, index: u64) -> Result<String> {
        match self {
            Tokens::Simple(s) => {
                let token = format!("{prefix}.{index}");
                let mut live = s.live.lock();
                live.remove(&token);
                let queue = live.by_user.entry(user.to_string()).or_default();
                queue.push_back(token.clone());
                let oldest = (queue.len() > MAX_TOKENS_PER_USER).then(|| queue.pop_front());
                if let Some(Some(old)) = oldest {
                    live.tokens.remove(&old);
                }
                live.tokens
                    .insert(token.clone(), (user.to_string(), Instant::now() + s.ttl));
                Ok(token)
            }
            Tokens::Jwt(j) => j.sign(user, revision),
        }
    }

    /// The user and auth revision a token stands for, if it is valid now.
    /// A simple token stands for the current revision (`current`).
    pub fn info(&self, token: &str, current: u64) -> Option<AuthInfo> {
        match self {
            Tokens::Simple(s) => {
                let mut live = s.live.lock();
                let now = Instant::now();
                let (user, exp) = live.tokens.get_mut(token)?;
                if *exp <= now {
                    live.remove(token);
                    return None;
                }
                *exp = now + s.ttl;
                Some(AuthInfo {
                    user: user.clone(),
                    revision: current,
                })
            }
            Tokens::Jwt(j) => j.verify(token),
        }
    }

    /// The log index a simple token was issued at (it is valid on a member
    /// once that member has applied it).
    pub fn index_of(&self, token: &str) -> Option<u64> {
        match self {
            Tokens::Simple(_) => token.split_once('.')?.1.parse().ok(),
            Tokens::Jwt(_) => None,
        }
    }

    /// Forgets `user`'s simple tokens (deleted, or its password changed).
    pub fn invalidate_user(&self, user: &str) {
        if let Tokens::Simple(s) = self {
            let mut live = s.live.lock();
            for t in live.by_user.remove(user).unwrap_or_default() {
                live.tokens.remove(&t);
            }
        }
    }

    /// Forgets every simple token (auth disabled).
    pub fn clear(&self) {
        if let Tokens::Simple(s) = self {
            *s.live.lock() = Live::default();
        }
    }
}

fn read_key(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// A PEM public key, or the public key of a PEM certificate (etcd accepts
/// both for `pub-key`).
fn decoding_key(
    alg: jsonwebtoken::Algorithm,
    pem: &[u8],
) -> Result<jsonwebtoken::DecodingKey, String> {
    use jsonwebtoken::{Algorithm::*, DecodingKey};
    let text = String::from_utf8_lossy(pem);
    if text.contains("BEGIN CERTIFICATE") {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("pub-key: {e}"))?;
        let cert = p.parse_x509().map_err(|e| format!("pub-key: {e}"))?;
        let spk = &cert.public_key().subject_public_key.data;
        return Ok(match alg {
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_der(spk),
            _ => DecodingKey::from_ec_der(spk),
        });
    }
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => DecodingKey::from_rsa_pem(pem),
        _ => DecodingKey::from_ec_pem(pem),
    }
    .map_err(|e| format!("pub-key: {e}"))
}

impl JwtTokens {
    fn new(opts: &HashMap<String, String>) -> Result<Self, String> {
        use jsonwebtoken::{Algorithm::*, DecodingKey, EncodingKey};
        let method = opts
            .get("sign-method")
            .ok_or("jwt: sign-method is required")?;
        let alg: jsonwebtoken::Algorithm = method
            .parse()
            .map_err(|_| format!("jwt: unsupported sign-method {method:?}"))?;
        let ttl = match opts.get("ttl") {
            Some(t) => crate::config::parse_go_duration(t)?,
            None => DEFAULT_JWT_TTL,
        };
        let private = opts.get("priv-key").map(|p| read_key(p)).transpose()?;
        let public = opts.get("pub-key").map(|p| read_key(p)).transpose()?;
        let (sign, verify) = match alg {
            HS256 | HS384 | HS512 => {
                let secret = private.ok_or("jwt: priv-key is required for HMAC")?;
                (
                    Some(EncodingKey::from_secret(&secret)),
                    DecodingKey::from_secret(&secret),
                )
            }
            RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 => {
                let public = public.ok_or("jwt: pub-key is required")?;
                let sign = match private {
                    None => None,
                    Some(k) if matches!(alg, ES256 | ES384) => {
                        Some(EncodingKey::from_ec_pem(&k).map_err(|e| format!("priv-key: {e}"))?)
                    }
                    Some(k) => {
                        Some(EncodingKey::from_rsa_pem(&k).map_err(|e| format!("priv-key: {e}"))?)
                    }
                };
                (sign, decoding_key(alg, &public)?)
            }
            other => return Err(format!("jwt: unsupported sign-method {other:?}")),
        };
        Ok(Self {
            alg,
            sign,
            verify,
            ttl,
        })
    }

    fn sign(&self, user: &str, revision: u64) -> Result<String> {
        let key = self.sign.as_ref().ok_or_else(|| {
            Error::Unknown("auth: token signing attempted with verify-only key".into())
        })?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d + self.ttl)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            username: user.to_string(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.alg), &claims, key)
            .map_err(|e| Error::Unknown(format!("auth: {e}")))
    }

    fn verify(&self, token: &str) -> Option<AuthInfo> {
        let mut v = jsonwebtoken::Validation::new(self.alg);
        v.leeway = 0;
        v.required_spec_claims = ["exp".to_string()].into();
        let data = jsonwebtoken::decode::<Claims>(token, &self.verify, &v).ok()?;
        Some(AuthInfo {
            user: data.claims.username,
            revision: data.claims.revision,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_slide_expire_and_are_bounded() {
        let t = Tokens::from_flags("simple", 300).unwrap();
        let p = t.prefix();
        assert_eq!(p.len(), 16);
        assert!(p.chars().all(|c| c.is_ascii_alphabetic()));
        let tok = t.assign("alice", 3, &p, 42).unwrap();
        assert_eq!(tok, format!("{p}.42"));
        assert_eq!(t.index_of(&tok), Some(42));
        let ai = t.info(&tok, 7).unwrap();
        assert_eq!((ai.user.as_str(), ai.revision), ("alice", 7));
        assert!(t.info("nope.1", 7).is_none());
        t.invalidate_user("alice");
        assert!(t.info(&tok, 7).is_none());
        let short = Tokens::Simple(SimpleTokens {
            ttl: Duration::ZERO,
            live: Mutex::new(Live::default()),
        });
        let tok = short.assign("bob", 1, "x", 1).unwrap();
        assert!(short.info(&tok, 1).is_none());
        let dave = t.assign("dave", 1, "d", 1).unwrap();
        for i in 0..(MAX_TOKENS_PER_USER + 10) as u64 {
            t.assign("carol", 1, "p", i).unwrap();
        }
        if let Tokens::Simple(s) = &t {
            assert_eq!(s.live.lock().tokens.len(), MAX_TOKENS_PER_USER + 1);
        }
        // Carol's oldest went; Dave's token did not.
        assert!(t.info("p.0", 1).is_none());
        assert!(t
            .info(&format!("p.{}", MAX_TOKENS_PER_USER + 9), 1)
            .is_some());
        assert!(t.info(&dave, 1).is_some());
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            "",
            "nope",
            "simple,a",
            "simple,a=1,a=2",
            "jwt",
            "jwt,sign-method=none",
        ] {
            assert!(Tokens::from_flags(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn hmac_jwt_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, b"secret").unwrap();
        let spec = format!("jwt,priv-key={},sign-method=HS256,ttl=1m", key.display());
        let t = Tokens::from_flags(&spec, 0).unwrap();
        let tok = t.assign("root", 5, "", 9).unwrap();
        let ai = t.info(&tok, 99).unwrap();
        assert_eq!((ai.user.as_str(), ai.revision), ("root", 5));
        assert!(t.info(&format!("{tok}x"), 99).is_none());
    }
}
