//! The snapshot file format, shared by Maintenance.Snapshot (and so by
//! `etcdctl snapshot save`) and restores.
//!
//! Layout: magic, payload length (u64 LE), the serialized state machine
//! ([`SnapshotPayload`]), zero padding to a multiple of 512
//! bytes, then — as etcd does — the SHA-256 of everything before it.
//! etcdctl checks `size % 512 == 32` to find that checksum, hence the padding.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

mod bbolt;
pub mod cmd;
pub mod etcd;
mod payload;

pub use payload::{
    auth_extension, check_meta, check_record, PayloadReader, PayloadSource, SnapshotPayload,
    AUTH_EXTENSION,
};

/// Identifies a cairn snapshot and its format version.
pub const MAGIC: &[u8; 10] = b"CAIRNSNAP1";
const HEADER: usize = MAGIC.len() + 8;

/// Wraps a serialized state machine into snapshot file bytes.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let body = (HEADER + payload.len()).div_ceil(512) * 512;
    let mut out = Vec::with_capacity(body + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(body, 0);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Checks a snapshot file and returns its payload.
pub fn verify(file: &[u8]) -> Result<&[u8]> {
    if file.len() < HEADER + 32 || &file[..MAGIC.len()] != MAGIC {
        return Err(Error::InvalidArgument(
            "snapshot: not a cairn snapshot file".into(),
        ));
    }
    let (body, sum) = file.split_at(file.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(Error::InvalidArgument(
            "snapshot: sha256 checksum mismatch".into(),
        ));
    }
    let len = u64::from_le_bytes(body[MAGIC.len()..HEADER].try_into().expect("8 bytes")) as usize;
    body.get(HEADER..HEADER + len)
        .ok_or_else(|| Error::InvalidArgument("snapshot: truncated payload".into()))
}

/// The SHA-256 of the first `n` bytes of `file`, read in 1 MiB pieces.
pub(crate) fn sha256_prefix(file: &mut std::fs::File, n: u64) -> std::io::Result<[u8; 32]> {
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let take = (buf.len() as u64).min(left) as usize;
        file.read_exact(&mut buf[..take])?;
        hasher.update(&buf[..take]);
        left -= take as u64;
    }
    Ok(hasher.finalize().into())
}

/// Whether the `len` bytes of `file` end in the SHA-256 of those before (etcd's snapshot files
/// and cairn's both do).
pub(crate) fn ends_in_its_sha256(file: &mut std::fs::File, len: u64) -> std::io::Result<bool> {
    use std::io::Read;
    let Some(body) = len.checked_sub(32) else {
        return Ok(false);
    };
    let digest = sha256_prefix(file, body)?;
    let mut sum = [0u8; 32];
    file.read_exact(&mut sum)?;
    Ok(digest == sum)
}

/// Where the payload of the snapshot file `file` (of `len` bytes) lies: (offset, length).
/// With `check_hash`, the file's SHA-256 is checked first, reading it through in 1 MiB pieces.
pub fn locate_payload(file: &mut std::fs::File, len: u64, check_hash: bool) -> Result<(u64, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let not_ours = || Error::InvalidArgument("snapshot: not a cairn snapshot file".into());
    let io = |e: std::io::Error| Error::InvalidArgument(format!("snapshot: {e}"));
    let min = if check_hash { HEADER + 32 } else { HEADER } as u64;
    if len < min {
        return Err(not_ours());
    }
    let mut header = [0u8; HEADER];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut header).map_err(io)?;
    if &header[..MAGIC.len()] != MAGIC {
        return Err(not_ours());
    }
    if check_hash && !ends_in_its_sha256(file, len).map_err(io)? {
        return Err(Error::InvalidArgument(
            "snapshot: sha256 checksum mismatch".into(),
        ));
    }
    let payload = u64::from_le_bytes(header[MAGIC.len()..].try_into().expect("8 bytes"));
    if payload > len - HEADER as u64 {
        return Err(Error::InvalidArgument("snapshot: truncated payload".into()));
    }
    Ok((HEADER as u64, payload))
}

/// Writes a snapshot file in chunks without holding it: the payload is fed piece by piece
/// (its length must be known up front), the padding and checksum are added by [`finish`].
/// The bytes are exactly those [`encode`] makes of the same payload.
///
/// [`finish`]: StreamWriter::finish
pub struct StreamWriter<F: FnMut(&[u8], u64) -> bool> {
    hasher: Sha256,
    buf: Vec<u8>,
    chunk: usize,
    payload_len: usize,
    written: usize,
    total: u64,
    sent: u64,
    sink: F,
    stopped: bool,
}

impl<F: FnMut(&[u8], u64) -> bool> StreamWriter<F> {
    /// `sink` gets each chunk and the bytes remaining after it; it returns false to stop.
    pub fn new(payload_len: usize, chunk: usize, sink: F) -> Self {
        let body = (HEADER + payload_len).div_ceil(512) * 512;
        let mut w = StreamWriter {
            hasher: Sha256::new(),
            buf: Vec::with_capacity(chunk),
            chunk: chunk.max(1),
            payload_len,
            written: 0,
            total: (body + 32) as u64,
            sent: 0,
            sink,
            stopped: false,
        };
        w.hashed(MAGIC);
        w.hashed(&(payload_len as u64).to_le_bytes());
        w
    }

    /// The size of the whole file.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether the sink asked to stop.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn hashed(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.raw(bytes);
    }

    fn raw(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.stopped {
            let take = (self.chunk - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == self.chunk {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() || self.stopped {
            return;
        }
        self.sent += self.buf.len() as u64;
        if !(self.sink)(&self.buf, self.total - self.sent) {
            self.stopped = true;
        }
        self.buf.clear();
    }

    /// Appends payload bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        self.written += bytes.len();
        self.hashed(bytes);
    }

    /// Pads, appends the checksum and sends what is left. Fails if the payload written differs
    /// from the length announced.
    pub fn finish(mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        if self.written != self.payload_len {
            return Err(Error::Internal(format!(
                "snapshot: wrote {} payload bytes, announced {}",
                self.written, self.payload_len
            )));
        }
        let pad = (self.total as usize - 32) - HEADER - self.payload_len;
        self.hashed(&vec![0u8; pad]);
        let digest = std::mem::take(&mut self.hasher).finalize();
        self.raw(&digest);
        self.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_file_equals_encoded_file() {
        for (len, chunk) in [(0, 7), (5, 3), (1000, 64), (4096, 512), (70_000, 32 * 1024)] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut out = Vec::new();
            let mut remaining = Vec::new();
            let mut w = StreamWriter::new(len, chunk, |b, left| {
                assert!(b.len() <= chunk);
                out.extend_from_slice(b);
                remaining.push(left);
                true
            });
            let total = w.total();
            for piece in payload.chunks(13) {
                w.write(piece);
            }
            w.finish().unwrap();
            assert_eq!(out, encode(&payload), "len {len} chunk {chunk}");
            assert_eq!(total, out.len() as u64);
            assert_eq!(remaining.last(), Some(&0));
        }
        // A payload shorter than announced is an error, not a bad file.
        let mut w = StreamWriter::new(10, 4, |_, _| true);
        w.write(b"short");
        assert!(w.finish().is_err());
    }

    #[test]
    fn round_trip_alignment_and_corruption() {
        let f = encode(b"state");
        assert_eq!(f.len() % 512, 32, "etcdctl finds the checksum this way");
        assert_eq!(verify(&f).unwrap(), b"state");
        let mut bad = f.clone();
        bad[20] ^= 1;
        assert!(verify(&bad).is_err());
        assert!(verify(&f[..f.len() - 1]).is_err());
    }
}
