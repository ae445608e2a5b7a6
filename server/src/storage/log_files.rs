//! The Raft log's record files: the format of the log's journal
//! (`<data-dir>/member/cairn-journal`, see [`super::journal`]), which is also
//! the format in which builds 146416b..816ab1f kept the whole log outside
//! RocksDB (`<data-dir>/member/cairn-wal`, moved back into RocksDB at open).
//!
//! Layout: `<dir>/<seq as 16 hex digits>.wal`, each starting with the magic
//! `cairnwal` and its sequence number (u64), then records
//! `[length u32][crc32 u32][kind u8][index u64][payload]`, length and CRC
//! covering kind, index and payload, all little-endian. An entry record holds
//! one encoded Raft entry and replaces the entry at its index and every entry
//! after it; a truncation record drops every entry at and after its index.
//! A length of zero (or the file's end) ends a segment. Only the newest
//! segment may end in a damaged record (a write that never completed, so was
//! never acknowledged); damage in an older one is an error.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub(crate) const MAGIC: &[u8; 8] = b"cairnwal";
pub(crate) const SEGMENT_HEADER: usize = 16;
const RECORD_HEADER: usize = 8;
/// Kind and index, before the payload.
const RECORD_PREFIX: usize = 9;
pub(crate) const KIND_ENTRY: u8 = 1;
pub(crate) const KIND_TRUNCATE: u8 = 2;

/// The path of segment `seq` in `dir`.
pub(crate) fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

/// Makes the entries of `dir` (files created, renamed or removed) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Appends one record to `out`.
pub(crate) fn encode_record(out: &mut Vec<u8>, kind: u8, index: u64, payload: &[u8]) {
    let len = (RECORD_PREFIX + payload.len()) as u32;
    let start = out.len();
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + RECORD_HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn corrupt(path: &Path, offset: usize, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {} at offset {offset}: {what}", path.display()),
    )
}

/// The segment files in `dir` with their sequence numbers, oldest first
/// (none if `dir` does not exist).
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut seqs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let name = e?.file_name();
        if let Some(hex) = name.to_string_lossy().strip_suffix(".wal") {
            if let Ok(seq) = u64::from_str_radix(hex, 16) {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    Ok(seqs
        .into_iter()
        .map(|s| (s, segment_path(dir, s)))
        .collect())
}

/// The entries (index, encoded entry) that the files in `dir` hold after
/// `purged`, in index order.
pub fn read(dir: &Path, purged: Option<u64>) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut log = replay(dir)?.entries;
    if let Some(p) = purged {
        log = log.split_off(&(p + 1));
    }
    Ok(log.into_iter().collect())
}

/// What the records in a directory of segments amount to.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The entries they leave, by index.
    pub entries: BTreeMap<u64, Vec<u8>>,
    /// The lowest index any record names: the records replace the log from
    /// there on (an entry replaces its index and all after it).
    pub from: Option<u64>,
    /// The highest segment number seen.
    pub last_seq: Option<u64>,
}

/// Replays the records of every segment in `dir`, in order.
pub fn replay(dir: &Path) -> io::Result<Replayed> {
    let paths = segments(dir)?;
    let mut out = Replayed::default();
    for (k, (seq, path)) in paths.iter().enumerate() {
        out.last_seq = Some(*seq);
        let newest = k + 1 == paths.len();
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.read_to_end(&mut bytes)?;
        let header = bytes.get(..SEGMENT_HEADER);
        if header.is_none_or(|h| h.iter().all(|b| *b == 0)) {
            if newest {
                // Cut short while being created (segments were renamed into
                // place zero-filled, then given their header): no record.
                continue;
            }
            return Err(corrupt(path, 0, "missing segment header"));
        }
        if &bytes[..8] != MAGIC || bytes[8..16] != seq.to_le_bytes() {
            return Err(corrupt(path, 0, "not a cairn log segment"));
        }
        let mut off = SEGMENT_HEADER;
        while off + RECORD_HEADER <= bytes.len() {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                break;
            }
            let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
            let body = bytes.get(off + RECORD_HEADER..off + RECORD_HEADER + len);
            let whole = body.filter(|b| len >= RECORD_PREFIX && crc32fast::hash(b) == crc);
            let Some(body) = whole else {
                if newest {
                    break;
                }
                return Err(corrupt(path, off, "damaged record"));
            };
            let i = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
            match body[0] {
                KIND_ENTRY => {
                    out.entries.split_off(&i);
                    out.entries.insert(i, body[RECORD_PREFIX..].to_vec());
                }
                KIND_TRUNCATE => {
                    out.entries.split_off(&i);
                }
                _ => return Err(corrupt(path, off, "unknown record kind")),
            }
            out.from = Some(out.from.map_or(i, |f| f.min(i)));
            off += RECORD_HEADER + len;
        }
    }
    Ok(out)
}

/// Removes the log files and `dir` itself, durably.
pub fn remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes segment `seq` holding `records` (kind, index, payload) in the
    /// files' format.
    pub(crate) fn write_segment(dir: &Path, seq: u64, records: &[(u8, u64, &[u8])]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&seq.to_le_bytes());
        for (kind, index, payload) in records {
            encode_record(&mut out, *kind, *index, payload);
        }
        // Zero-filled past the last record, as the files were.
        out.resize(out.len() + 64, 0);
        let path = segment_path(dir, seq);
        std::fs::write(&path, out).unwrap();
        path
    }

    fn indexes(log: &[(u64, Vec<u8>)]) -> Vec<(u64, String)> {
        log.iter()
            .map(|(i, b)| (*i, String::from_utf8(b.clone()).unwrap()))
            .collect()
    }

    #[test]
    fn replays_appends_overwrites_truncations_and_purges() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(
            dir.path(),
            0,
            &[(1, 0, b"a0"), (1, 1, b"a1"), (1, 2, b"a2"), (1, 3, b"a3")],
        );
        // An entry overwrites its index and drops those after it; a
        // truncation drops its index and after.
        write_segment(
            dir.path(),
            1,
            &[(1, 2, b"b2"), (1, 3, b"b3"), (1, 4, b"b4"), (2, 4, b"")],
        );
        let got = read(dir.path(), Some(0)).unwrap();
        assert_eq!(
            indexes(&got),
            vec![(1, "a1".into()), (2, "b2".into()), (3, "b3".into())]
        );
        assert_eq!(read(dir.path(), None).unwrap().len(), 4);
    }

    #[test]
    fn a_torn_tail_of_the_newest_segment_is_dropped_elsewhere_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 0, &[(1, 1, b"x1")]);
        let newest = write_segment(dir.path(), 1, &[(1, 2, b"x2"), (1, 3, b"x3")]);
        // Damage the last record's payload.
        let mut bytes = std::fs::read(&newest).unwrap();
        let at = SEGMENT_HEADER + 2 * (RECORD_HEADER + RECORD_PREFIX) + 2 + 1;
        bytes[at] ^= 0xff;
        std::fs::write(&newest, &bytes).unwrap();
        assert_eq!(
            indexes(&read(dir.path(), None).unwrap()),
            vec![(1, "x1".into()), (2, "x2".into())]
        );
        // The same damage in an older segment is not a shorter log.
        write_segment(dir.path(), 2, &[(1, 4, b"x4")]);
        let err = read(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("damaged record"), "{err}");
    }

    #[test]
    fn a_newest_segment_without_its_header_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 0, &[(1, 1, b"y1")]);
        std::fs::write(dir.path().join(format!("{:016x}.wal", 1)), vec![0u8; 4096]).unwrap();
        assert_eq!(
            indexes(&read(dir.path(), None).unwrap()),
            vec![(1, "y1".into())]
        );
        write_segment(dir.path(), 2, &[(1, 2, b"y2")]);
        assert!(
            read(dir.path(), None).is_err(),
            "an older headerless segment"
        );
    }

    #[test]
    fn no_directory_is_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("absent"), None).unwrap().is_empty());
        remove(&dir.path().join("absent")).unwrap();
    }
}
