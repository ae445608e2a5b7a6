//! The snapshot file format, shared by Maintenance.Snapshot (and so by
//! `etcdctl snapshot save`) and restores.
//!
//! Layout: magic, payload length (u64 LE), the serialized state machine
//! ([`crate::raft::SnapshotPayload`]), zero padding to a multiple of 512
//! bytes, then — as etcd does — the SHA-256 of everything before it.
//! etcdctl checks `size % 512 == 32` to find that checksum, hence the padding.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

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

/// A snapshot file's payload without checking its checksum (`restore --skip-hash-check`).
pub fn payload_unchecked(file: &[u8]) -> Result<&[u8]> {
    if file.len() < HEADER || &file[..MAGIC.len()] != MAGIC {
        return Err(Error::InvalidArgument(
            "snapshot: not a cairn snapshot file".into(),
        ));
    }
    let len = u64::from_le_bytes(file[MAGIC.len()..HEADER].try_into().expect("8 bytes")) as usize;
    file.get(HEADER..HEADER + len)
        .ok_or_else(|| Error::InvalidArgument("snapshot: truncated payload".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
