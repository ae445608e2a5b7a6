//! The snapshot file format, shared by Maintenance.Snapshot (and so by
//! `etcdctl snapshot save`) and restores: a magic header, the serialized
//! state machine ([`crate::raft::SnapshotPayload`]), then — as etcd does —
//! the SHA-256 of everything before it, so a truncated or corrupted file is
//! detected.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Identifies a cairn snapshot and its format version.
pub const MAGIC: &[u8; 10] = b"CAIRNSNAP1";

/// Wraps a serialized state machine into snapshot file bytes.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + payload.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(payload);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Checks a snapshot file and returns its payload.
pub fn verify(file: &[u8]) -> Result<&[u8]> {
    if file.len() < MAGIC.len() + 32 || &file[..MAGIC.len()] != MAGIC {
        return Err(Error::InvalidArgument("snapshot: not a cairn snapshot file".into()));
    }
    let (body, sum) = file.split_at(file.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err(Error::InvalidArgument("snapshot: sha256 checksum mismatch".into()));
    }
    Ok(&body[MAGIC.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let f = encode(b"state");
        assert_eq!(verify(&f).unwrap(), b"state");
        let mut bad = f.clone();
        bad[12] ^= 1;
        assert!(verify(&bad).is_err());
        assert!(verify(&f[..f.len() - 1]).is_err());
    }
}
