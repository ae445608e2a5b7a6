//! The `pvc` backup destination: a PersistentVolumeClaim served over HTTP.
//!
//! Backups run in the operator's process and restores and verifications in pods of their own;
//! none of them can mount a claim that another pod holds (a claim is usually ReadWriteOnce).
//! So one small server mounts the claim ([`server`], `cairn-operator serve-store`, run by the
//! operator as a Deployment) and everything else reaches it as an object store ([`client`], an
//! `object_store::ObjectStore`): backups, retention, restores and verifications stay the same
//! code as for S3.
//!
//! The protocol is ours (both ends are this crate), over plain HTTP inside the cluster, every
//! request carrying `Authorization: Bearer <token>` (the token in a Secret the operator makes):
//! - `GET`/`HEAD`/`PUT`/`DELETE /o/<key>`: an object (ranges on `GET`; a `PUT` is written to a
//!   temporary file, fsynced and renamed, so that an object is whole or absent);
//! - `GET /list/<prefix>`: the objects below a prefix, as JSON;
//! - `PUT /u/<upload>/<part>`, `POST /u/<upload>` (`{"to": <key>, "parts": <n>}`),
//!   `DELETE /u/<upload>`: a multipart upload's parts, its completion (the parts joined into
//!   the object, fsynced, renamed) and its abort.
//!
//! Keys are `/`-separated segments, each non-empty and not starting with `.` (so no `..`, and
//! the server's own temporary files and uploads, which start with `.`, are never addressed or
//! listed).

pub mod client;
pub mod deploy;
pub mod server;

/// The port the store server listens on.
pub const PORT: u16 = 8080;
/// The environment variable (and credentials key) of the bearer token.
pub const TOKEN_ENV: &str = "CAIRN_STORE_TOKEN";
/// The environment variable (and credentials key) of the store server's base URL.
pub const URL_ENV: &str = "CAIRN_STORE_URL";
/// The longest key accepted.
const MAX_KEY: usize = 1024;
/// The most parts a multipart upload may have.
const MAX_PARTS: usize = 10_000;
/// The longest segment of a key (a file name, with room for the temporary name's suffix).
const MAX_SEGMENT: usize = 200;

/// Whether `key` is a key the store accepts: `/`-separated segments, each non-empty and not
/// starting with `.`, with no NUL or backslash, at most [`MAX_KEY`] bytes.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("a key has 1 to {MAX_KEY} bytes, not {}", key.len()));
    }
    for seg in key.split('/') {
        if seg.is_empty()
            || seg.starts_with('.')
            || seg.len() > MAX_SEGMENT
            || seg.chars().any(|c| c.is_control() || c == '\\')
        {
            return Err(format!(
                "key {key:?}: each segment has 1 to {MAX_SEGMENT} bytes, does not start with '.' and holds no control character or backslash"
            ));
        }
    }
    Ok(())
}

/// Whether `id` is an upload id: 32 lowercase hexadecimal digits.
fn check_upload(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Percent-encodes one path segment (everything but RFC 3986's unreserved characters).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A key as a URL path: each segment percent-encoded.
fn encode_key(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// Decodes a percent-encoded URL path segment; `None` if malformed or not UTF-8.
fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Decodes a URL path of segments into a key (each segment decoded on its own, so that an
/// encoded `/` inside one is refused by [`check_key`]'s rule rather than splitting it).
fn decode_key(path: &str) -> Result<String, String> {
    let mut segments = Vec::new();
    for seg in path.split('/') {
        let d = decode(seg).ok_or_else(|| format!("malformed path {path:?}"))?;
        if d.contains('/') {
            return Err(format!("path {path:?}: a segment holds '/'"));
        }
        segments.push(d);
    }
    let key = segments.join("/");
    check_key(&key)?;
    Ok(key)
}

/// One object as `GET /list` describes it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
    pub etag: String,
}

/// The body of `POST /u/<upload>`.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Complete {
    to: String,
    parts: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_their_encoding() {
        for good in ["a", "ns/cluster/uid/20260101T000000Z.snap", "a b/ü/%"] {
            check_key(good).unwrap();
            assert_eq!(decode_key(&encode_key(good)).unwrap(), good);
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "..",
            "a/../b",
            ".uploads/x",
            "a/.tmp",
            "a\\b",
            "a\0b",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key(&"a".repeat(MAX_KEY + 1)).is_err());
        assert!(check_key(&"a".repeat(MAX_SEGMENT + 1)).is_err());
        assert!(check_key("a\nb").is_err());
        // An encoded '/' inside a segment does not make two segments.
        assert!(decode_key("a%2F..%2Fb").is_err());
        assert!(decode_key("a/%2E%2E/b").is_err());
        assert!(decode_key("a%zz").is_err());
        assert!(decode_key("a%").is_err());
        assert!(decode_key("%ff%fe").is_err(), "not UTF-8");
        assert!(check_upload(&"0123456789abcdef".repeat(2)));
        assert!(!check_upload("../../etc"));
        assert!(!check_upload(&"0123456789ABCDEF".repeat(2)));
    }
}
