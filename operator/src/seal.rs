//! Client-side encryption of backups: AES-256-GCM over fixed-size segments, streamed (a
//! backup of any size is sealed and opened in constant memory), with a key from a Secret.
//!
//! The format (`CAIRNEC1`): an 8-byte magic, a 7-byte random nonce prefix, then segments of
//! [`SEGMENT`] bytes of plaintext (the last one shorter, possibly empty), each sealed with its
//! 16-byte tag under the nonce `prefix || segment number (u32, big-endian) || last (0 or 1)`:
//! the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár), so that segments cannot be
//! dropped, reordered, repeated or cut off at a segment boundary without the open failing. A
//! new random prefix per backup keeps nonces unique under one key (2^56 prefixes, 2^32
//! segments of 64 KiB each: 256 TiB per backup). The key's id is recorded in the backup's
//! manifest, not in the object.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// The first bytes of a sealed backup.
pub const MAGIC: &[u8; 8] = b"CAIRNEC1";
/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 << 10;
const TAG: usize = 16;
const PREFIX: usize = 7;
/// The header's length: the magic and the nonce prefix.
pub const HEADER: usize = MAGIC.len() + PREFIX;

/// Why a backup cannot be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("a backup key is 32 bytes (or their base64), not {0} bytes")]
    KeyLength(usize),
    #[error(
        "not an encrypted backup (no {} header)",
        String::from_utf8_lossy(MAGIC)
    )]
    NotSealed,
    #[error("segment {0} does not decrypt: a wrong key, or the backup was damaged or cut short")]
    Open(u32),
    #[error("the backup is too big to seal under one nonce prefix")]
    TooBig,
    #[error("the system's random number generator failed")]
    Random,
}

/// A 256-bit backup key and its id.
#[derive(Clone)]
pub struct BackupKey {
    pub id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for BackupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupKey").field("id", &self.id).finish()
    }
}

impl BackupKey {
    /// A key from a Secret's value: 32 raw bytes, or their base64 (whitespace around ignored).
    pub fn parse(id: &str, value: &[u8]) -> Result<Self, SealError> {
        use base64::Engine as _;
        let bytes = if value.len() == 32 {
            value.to_vec()
        } else {
            let text = String::from_utf8_lossy(value);
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| SealError::KeyLength(value.len()))?
        };
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SealError::KeyLength(bytes.len()))?;
        Ok(BackupKey {
            id: id.to_string(),
            key,
        })
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 32-byte key"))
    }
}

fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Seals a stream: [`Sealer::header`] first, then what [`Sealer::update`] and
/// [`Sealer::finish`] return, in order.
pub struct Sealer {
    key: LessSafeKey,
    prefix: [u8; PREFIX],
    counter: u32,
    buf: Vec<u8>,
}

impl Sealer {
    pub fn new(key: &BackupKey) -> Result<Self, SealError> {
        let mut prefix = [0u8; PREFIX];
        aws_lc_rs::rand::fill(&mut prefix).map_err(|_| SealError::Random)?;
        Ok(Sealer {
            key: key.aead(),
            prefix,
            counter: 0,
            buf: Vec::with_capacity(2 * SEGMENT),
        })
    }

    /// The header to write before the segments.
    pub fn header(&self) -> Vec<u8> {
        [MAGIC.as_slice(), &self.prefix].concat()
    }

    fn seal(&mut self, plain: &[u8], last: bool) -> Result<Vec<u8>, SealError> {
        let mut out = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                nonce(&self.prefix, self.counter, last),
                Aad::empty(),
                &mut out,
            )
            .map_err(|_| SealError::TooBig)?;
        self.counter = self.counter.checked_add(1).ok_or(SealError::TooBig)?;
        Ok(out)
    }

    /// Takes plaintext; returns the segments sealed so far. The last segment is held back
    /// until [`Sealer::finish`] (only then is it known to be the last).
    pub fn update(&mut self, plain: &[u8]) -> Result<Vec<u8>, SealError> {
        self.buf.extend_from_slice(plain);
        let mut out = Vec::new();
        let mut start = 0;
        while self.buf.len() - start > SEGMENT {
            let segment = self.buf[start..start + SEGMENT].to_vec();
            out.extend(self.seal(&segment, false)?);
            start += SEGMENT;
        }
        self.buf.drain(..start);
        Ok(out)
    }

    /// Seals what is left as the last segment.
    pub fn finish(mut self) -> Result<Vec<u8>, SealError> {
        let rest = std::mem::take(&mut self.buf);
        self.seal(&rest, true)
    }
}

/// Opens a stream sealed by [`Sealer`].
pub struct Opener {
    key: LessSafeKey,
    prefix: Option<[u8; PREFIX]>,
    counter: u32,
    buf: Vec<u8>,
}

impl Opener {
    pub fn new(key: &BackupKey) -> Self {
        Opener {
            key: key.aead(),
            prefix: None,
            counter: 0,
            buf: Vec::with_capacity(2 * (SEGMENT + TAG)),
        }
    }

    fn open(&mut self, sealed: &mut [u8], last: bool) -> Result<usize, SealError> {
        let prefix = self.prefix.ok_or(SealError::NotSealed)?;
        let n = self
            .key
            .open_in_place(nonce(&prefix, self.counter, last), Aad::empty(), sealed)
            .map_err(|_| SealError::Open(self.counter))?
            .len();
        self.counter = self.counter.checked_add(1).ok_or(SealError::TooBig)?;
        Ok(n)
    }

    /// Takes sealed bytes; returns the plaintext of the segments opened so far (the last one is
    /// held back until [`Opener::finish`]).
    pub fn update(&mut self, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        self.buf.extend_from_slice(sealed);
        let mut start = 0;
        if self.prefix.is_none() {
            if self.buf.len() < HEADER {
                return Ok(Vec::new());
            }
            if &self.buf[..MAGIC.len()] != MAGIC {
                return Err(SealError::NotSealed);
            }
            let mut prefix = [0u8; PREFIX];
            prefix.copy_from_slice(&self.buf[MAGIC.len()..HEADER]);
            self.prefix = Some(prefix);
            start = HEADER;
        }
        let mut out = Vec::new();
        while self.buf.len() - start > SEGMENT + TAG {
            let mut segment = self.buf[start..start + SEGMENT + TAG].to_vec();
            let n = self.open(&mut segment, false)?;
            out.extend_from_slice(&segment[..n]);
            start += SEGMENT + TAG;
        }
        self.buf.drain(..start);
        Ok(out)
    }

    /// Opens what is left as the last segment: fails if the stream was cut short.
    pub fn finish(mut self) -> Result<Vec<u8>, SealError> {
        if self.prefix.is_none() {
            return Err(SealError::NotSealed);
        }
        let mut rest = std::mem::take(&mut self.buf);
        if rest.len() < TAG {
            return Err(SealError::Open(self.counter));
        }
        let n = self.open(&mut rest, true)?;
        rest.truncate(n);
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> BackupKey {
        BackupKey::parse(id, &[byte; 32]).unwrap()
    }

    fn seal_all(k: &BackupKey, plain: &[u8], piece: usize) -> Vec<u8> {
        let mut s = Sealer::new(k).unwrap();
        let mut out = s.header();
        for chunk in plain.chunks(piece.max(1)) {
            out.extend(s.update(chunk).unwrap());
        }
        out.extend(s.finish().unwrap());
        out
    }

    fn open_all(k: &BackupKey, sealed: &[u8], piece: usize) -> Result<Vec<u8>, SealError> {
        let mut o = Opener::new(k);
        let mut out = Vec::new();
        for chunk in sealed.chunks(piece.max(1)) {
            out.extend(o.update(chunk)?);
        }
        out.extend(o.finish()?);
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_boundary_in_any_pieces() {
        let k = key("k1", 7);
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 5,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            for piece in [1000, SEGMENT, 7 * SEGMENT] {
                let sealed = seal_all(&k, &plain, piece);
                let segments = len.div_ceil(SEGMENT).max(1);
                assert_eq!(sealed.len(), HEADER + len + segments * TAG, "len {len}");
                assert_eq!(open_all(&k, &sealed, 4096).unwrap(), plain, "len {len}");
            }
        }
        // Two seals of the same data differ (a new nonce prefix each time).
        assert_ne!(seal_all(&k, b"same", 10), seal_all(&k, b"same", 10));
    }

    #[test]
    fn a_wrong_key_damage_truncation_or_reordering_fails() {
        let k = key("k1", 7);
        let plain = vec![42u8; 3 * SEGMENT + 100];
        let sealed = seal_all(&k, &plain, SEGMENT);
        assert_eq!(
            open_all(&key("k2", 8), &sealed, 9999),
            Err(SealError::Open(0))
        );
        let mut damaged = sealed.clone();
        damaged[HEADER + SEGMENT + 20] ^= 1;
        assert_eq!(open_all(&k, &damaged, 9999), Err(SealError::Open(1)));
        // Cut at a segment boundary: the new last segment was not sealed as the last.
        let cut = &sealed[..HEADER + 2 * (SEGMENT + TAG)];
        assert_eq!(open_all(&k, cut, 9999), Err(SealError::Open(1)));
        let cut = &sealed[..sealed.len() - 1];
        assert!(open_all(&k, cut, 9999).is_err());
        // Two segments swapped.
        let s = HEADER;
        let seg = SEGMENT + TAG;
        let mut swapped = sealed[..s].to_vec();
        swapped.extend_from_slice(&sealed[s + seg..s + 2 * seg]);
        swapped.extend_from_slice(&sealed[s..s + seg]);
        swapped.extend_from_slice(&sealed[s + 2 * seg..]);
        assert_eq!(open_all(&k, &swapped, 9999), Err(SealError::Open(0)));
        // Not sealed at all, or only a header.
        assert_eq!(
            open_all(&k, b"plain snapshot bytes", 5),
            Err(SealError::NotSealed)
        );
        assert!(open_all(&k, &sealed[..HEADER], 5).is_err());
    }

    #[test]
    fn keys_are_32_bytes_raw_or_base64() {
        use base64::Engine as _;
        let raw = [9u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let a = BackupKey::parse("a", &raw).unwrap();
        let b = BackupKey::parse("b", format!("{b64}\n").as_bytes()).unwrap();
        let sealed = seal_all(&a, b"x", 1);
        assert_eq!(open_all(&b, &sealed, 3).unwrap(), b"x");
        assert_eq!(
            BackupKey::parse("c", b"short").unwrap_err(),
            SealError::KeyLength(5)
        );
        let b64_16 = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        assert_eq!(
            BackupKey::parse("d", b64_16.as_bytes()).unwrap_err(),
            SealError::KeyLength(16)
        );
        assert!(!format!("{a:?}").contains('9'), "the key is not printed");
    }
}
