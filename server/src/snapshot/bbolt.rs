//! A reader of bbolt database files (etcd's backend; `etcdctl snapshot save` writes one,
//! followed by its SHA-256), written from the format bbolt 1.3 lays down:
//!
//! - The file is pages of one size (the meta page says which). Every page starts with a
//!   16-byte header: its id (u64), flags (u16: branch 0x01, leaf 0x02, meta 0x04,
//!   freelist 0x10), an element count (u16) and how many pages after it it spans (u32).
//!   All integers little-endian.
//! - Pages 0 and 1 are meta pages: magic `0xED0CDAED`, version 2, page size, flags, the root
//!   bucket (its root page, a sequence), the freelist page, the high-water page id, the
//!   transaction id and an FNV-1a 64 checksum of the fields before it. The valid one with the
//!   higher transaction id is the database.
//! - A branch page's elements are (key offset u32, key size u32, child page u64); a leaf
//!   page's (flags u32, key offset u32, key size u32, value size u32), the offset counted
//!   from the element itself and the value after the key. A leaf element with flag 0x01 is a
//!   bucket: its value is (root page u64, sequence u64), and a root page 0 means the bucket's
//!   only page is stored inline, right after those 16 bytes.
//!
//! Everything read is checked against the file's size before use: a damaged or hostile file is
//! an error, never a panic. Every page is read at most once per open database (bbolt's trees
//! never share pages): a page reached twice, by a cycle or by two parents, is an error, so the
//! work and the memory of any walk stay within the file's size. Each bucket may therefore be
//! walked once.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
/// A leaf element that is a bucket.
const BUCKET_LEAF: u32 = 0x01;
/// Deeper trees than this are not made by bbolt (each level multiplies the keys by at least 2).
const MAX_DEPTH: usize = 64;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("etcd snapshot: {what}"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// How many of a file's first bytes [`is_bbolt`] looks at.
pub const HEAD: usize = 4096 + HEADER + 4;

/// Whether `head` (a file's first bytes) starts a bbolt database: the magic of its first meta
/// page, or of its second at the commonest page size (the first may be damaged; bbolt then
/// reads the second).
pub fn is_bbolt(head: &[u8]) -> bool {
    let magic_at = |at: usize| head.len() >= at + 4 && u32_at(head, at) == MAGIC;
    magic_at(HEADER) || magic_at(4096 + HEADER)
}

fn fnv1a64(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One meta page's content.
#[derive(Debug, Clone, Copy)]
struct Meta {
    page_size: u32,
    root: u64,
    high_water: u64,
    txid: u64,
}

/// Reads the meta page whose data starts at `b[HEADER..]`; None if it is not valid.
fn meta(b: &[u8]) -> Option<Meta> {
    let m = b.get(HEADER..HEADER + 64)?;
    let flags = u16_at(b, 8);
    if flags != META || u32_at(m, 0) != MAGIC || u32_at(m, 4) != VERSION {
        return None;
    }
    if fnv1a64(&m[..56]) != u64_at(m, 56) {
        return None;
    }
    let page_size = u32_at(m, 8);
    if !(512..=(1 << 20)).contains(&page_size) {
        return None;
    }
    Some(Meta {
        page_size,
        root: u64_at(m, 16),
        high_water: u64_at(m, 40),
        txid: u64_at(m, 48),
    })
}

/// What [`Bolt::each`] calls for every element: (flags, key, value); false stops the walk.
pub type Visit<'a> = dyn FnMut(u32, &[u8], &[u8]) -> Result<bool> + 'a;

/// A bucket: its root page, or its one page stored inline in its parent.
#[derive(Debug, Clone)]
pub enum Bucket {
    Root(u64),
    Inline(Vec<u8>),
}

/// An open bbolt database, read from `len` bytes of a file.
pub struct Bolt {
    file: File,
    len: u64,
    page_size: u64,
    pages: u64,
    /// The top-level buckets, by name (the root bucket holds nothing else).
    buckets: Vec<(Vec<u8>, Bucket)>,
    /// Pages read so far, a bit per page id.
    read: std::cell::RefCell<Vec<u64>>,
}

/// A page (with the pages it spans), read whole.
struct Page(Vec<u8>);

impl Page {
    fn flags(&self) -> u16 {
        u16_at(&self.0, 8)
    }
    fn count(&self) -> usize {
        u16_at(&self.0, 10) as usize
    }

    /// The bytes at `elem + pos .. + size`, where `elem` is element `i`'s offset.
    fn slice(&self, i: usize, pos: u32, size: u64) -> Result<&[u8]> {
        let start = (HEADER + i * ELEMENT) as u64 + pos as u64;
        let end = start
            .checked_add(size)
            .filter(|e| *e <= self.0.len() as u64)
            .ok_or_else(|| bad("an element lies outside its page"))?;
        Ok(&self.0[start as usize..end as usize])
    }

    fn element(&self, i: usize) -> Result<&[u8]> {
        let at = HEADER + i * ELEMENT;
        self.0
            .get(at..at + ELEMENT)
            .ok_or_else(|| bad("more elements than the page holds"))
    }

    /// Branch element `i`: (key, child page).
    fn branch(&self, i: usize) -> Result<(&[u8], u64)> {
        let e = self.element(i)?;
        let (pos, ksize, child) = (u32_at(e, 0), u32_at(e, 4), u64_at(e, 8));
        Ok((self.slice(i, pos, ksize as u64)?, child))
    }

    /// Leaf element `i`: (flags, key, value).
    fn leaf(&self, i: usize) -> Result<(u32, &[u8], &[u8])> {
        let e = self.element(i)?;
        let (flags, pos, ksize, vsize) = (u32_at(e, 0), u32_at(e, 4), u32_at(e, 8), u32_at(e, 12));
        let kv = self.slice(i, pos, ksize as u64 + vsize as u64)?;
        let (k, v) = kv.split_at(ksize as usize);
        Ok((flags, k, v))
    }
}

impl Bolt {
    /// Opens the database in the first `len` bytes of `file`.
    pub fn open(file: File, len: u64) -> Result<Self> {
        let read = |at: u64, n: usize| -> Result<Vec<u8>> {
            let mut b = vec![0u8; n];
            if at + n as u64 > len {
                return Err(bad("not a bbolt database (too short)"));
            }
            file.read_exact_at(&mut b, at)
                .map_err(|e| bad(format!("reading: {e}")))?;
            Ok(b)
        };
        let first = meta(&read(0, HEADER + 64)?);
        // The second meta page is one page further, by the first's page size (or, if the
        // first is damaged, by the commonest one, as bbolt does with the OS page size).
        let size = first.map_or(4096, |m| m.page_size as u64);
        let second = read(size, HEADER + 64).ok().and_then(|b| meta(&b));
        let m = match (first, second) {
            (Some(a), Some(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Err(bad("not a bbolt database (no valid meta page)")),
        };
        let page_size = m.page_size as u64;
        let pages = len / page_size;
        if m.high_water > pages {
            return Err(bad(format!(
                "the database has {} pages, the file only {pages} (cut short?)",
                m.high_water
            )));
        }
        let mut db = Self {
            file,
            len,
            page_size,
            pages: m.high_water,
            buckets: Vec::new(),
            read: std::cell::RefCell::new(vec![0; m.high_water.div_ceil(64) as usize]),
        };
        let mut buckets = Vec::new();
        db.each(&Bucket::Root(m.root), &mut |flags, k, v| {
            if flags & BUCKET_LEAF == 0 {
                return Err(bad("a key outside any bucket"));
            }
            buckets.push((k.to_vec(), child_bucket(v)?));
            Ok(true)
        })?;
        db.buckets = buckets;
        Ok(db)
    }

    /// Marks pages `first..first + n` read; an error if one was already.
    fn mark(&self, first: u64, n: u64) -> Result<()> {
        let mut read = self.read.borrow_mut();
        for id in first..first + n {
            let (word, bit) = ((id / 64) as usize, 1u64 << (id % 64));
            let w = read
                .get_mut(word)
                .ok_or_else(|| bad(format!("page {id} out of range")))?;
            if *w & bit != 0 {
                return Err(bad(format!(
                    "page {id} is reached twice (the trees share pages or form a cycle)"
                )));
            }
            *w |= bit;
        }
        Ok(())
    }

    fn page(&self, id: u64) -> Result<Page> {
        if id < 2 || id >= self.pages {
            return Err(bad(format!("page {id} out of range (0..{})", self.pages)));
        }
        let at = id * self.page_size;
        let mut head = [0u8; HEADER];
        self.file
            .read_exact_at(&mut head, at)
            .map_err(|e| bad(format!("reading page {id}: {e}")))?;
        if u64_at(&head, 0) != id {
            return Err(bad(format!(
                "page {id} says it is page {}",
                u64_at(&head, 0)
            )));
        }
        let span = (u32_at(&head, 12) as u64 + 1)
            .checked_mul(self.page_size)
            .filter(|n| at + n <= self.len && id + n / self.page_size <= self.pages)
            .ok_or_else(|| bad(format!("page {id} runs past the end")))?;
        self.mark(id, span / self.page_size)?;
        let mut b = vec![0u8; span as usize];
        self.file
            .read_exact_at(&mut b, at)
            .map_err(|e| bad(format!("reading page {id}: {e}")))?;
        Ok(Page(b))
    }

    /// The database's size in bytes: its pages.
    pub fn size(&self) -> u64 {
        self.pages * self.page_size
    }

    /// The top-level buckets, by name, in name order.
    pub fn buckets(&self) -> &[(Vec<u8>, Bucket)] {
        &self.buckets
    }

    /// The top-level bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Option<Bucket> {
        self.buckets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
    }

    /// Calls `f(flags, key, value)` for every element of `bucket` in key order, until it
    /// returns false. Nested buckets come as elements with flag 0x01. A bucket stored in pages
    /// can be walked once (see the module's notes).
    pub fn each(&self, bucket: &Bucket, f: &mut Visit<'_>) -> Result<()> {
        match bucket {
            Bucket::Inline(b) => {
                let page = Page(b.clone());
                if page.flags() != LEAF {
                    return Err(bad("an inline bucket that is not a leaf"));
                }
                self.walk(page, 0, f).map(|_| ())
            }
            Bucket::Root(id) => self.walk(self.page(*id)?, 0, f).map(|_| ()),
        }
    }

    /// Walks the tree under `page`; false once `f` asked to stop. No page is read twice
    /// ([`Self::page`]); the depth is bounded so that a long chain of one-child branch pages
    /// cannot exhaust the stack.
    fn walk(&self, page: Page, depth: usize, f: &mut Visit<'_>) -> Result<bool> {
        if depth > MAX_DEPTH {
            return Err(bad("the tree is deeper than any bbolt makes"));
        }
        match page.flags() {
            LEAF => {
                for i in 0..page.count() {
                    let (flags, k, v) = page.leaf(i)?;
                    if !f(flags, k, v)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            BRANCH => {
                for i in 0..page.count() {
                    let (_, child) = page.branch(i)?;
                    if !self.walk(self.page(child)?, depth + 1, f)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            other => Err(bad(format!("a page of kind {other:#x} inside a tree"))),
        }
    }
}

/// The bucket a bucket element's value describes.
pub fn child_bucket(v: &[u8]) -> Result<Bucket> {
    if v.len() < 16 {
        return Err(bad("a bucket element too short"));
    }
    match u64_at(v, 0) {
        0 => {
            let inline = &v[16..];
            if inline.len() < HEADER {
                return Err(bad("an inline bucket too short"));
            }
            Ok(Bucket::Inline(inline.to_vec()))
        }
        root => Ok(Bucket::Root(root)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page of `size` bytes: header, then elements laid out as bbolt lays them out.
    fn leaf_page(id: u64, size: usize, items: &[(&[u8], &[u8], u32)]) -> Vec<u8> {
        let mut p = vec![0u8; size];
        p[0..8].copy_from_slice(&id.to_le_bytes());
        p[8..10].copy_from_slice(&LEAF.to_le_bytes());
        p[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut data = HEADER + items.len() * ELEMENT;
        for (i, (k, v, flags)) in items.iter().enumerate() {
            let e = HEADER + i * ELEMENT;
            p[e..e + 4].copy_from_slice(&flags.to_le_bytes());
            p[e + 4..e + 8].copy_from_slice(&((data - e) as u32).to_le_bytes());
            p[e + 8..e + 12].copy_from_slice(&(k.len() as u32).to_le_bytes());
            p[e + 12..e + 16].copy_from_slice(&(v.len() as u32).to_le_bytes());
            p[data..data + k.len()].copy_from_slice(k);
            p[data + k.len()..data + k.len() + v.len()].copy_from_slice(v);
            data += k.len() + v.len();
        }
        p
    }

    fn meta_page(id: u64, size: usize, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
        let mut p = vec![0u8; size];
        p[0..8].copy_from_slice(&id.to_le_bytes());
        p[8..10].copy_from_slice(&META.to_le_bytes());
        let m = &mut p[HEADER..HEADER + 64];
        m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        m[4..8].copy_from_slice(&VERSION.to_le_bytes());
        m[8..12].copy_from_slice(&(size as u32).to_le_bytes());
        m[16..24].copy_from_slice(&root.to_le_bytes());
        m[40..48].copy_from_slice(&high_water.to_le_bytes());
        m[48..56].copy_from_slice(&txid.to_le_bytes());
        let sum = fnv1a64(&m[..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
        p
    }

    fn file_of(pages: &[Vec<u8>]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for p in pages {
            std::io::Write::write_all(&mut f, p).unwrap();
        }
        let len = pages.iter().map(|p| p.len() as u64).sum();
        (f, len)
    }

    fn inline_bucket(items: &[(&[u8], &[u8], u32)]) -> Vec<u8> {
        let page = leaf_page(0, 4096, items);
        // Only what the elements use: bbolt stores the page cut to its content.
        let used = HEADER
            + items.len() * ELEMENT
            + items
                .iter()
                .map(|(k, v, _)| k.len() + v.len())
                .sum::<usize>();
        let mut v = vec![0u8; 16];
        v.extend_from_slice(&page[..used]);
        v
    }

    #[test]
    fn reads_buckets_inline_and_in_pages() {
        let size = 4096;
        let inline = inline_bucket(&[(b"a", b"1", 0), (b"b", b"2", 0)]);
        let mut on_page = vec![0u8; 16];
        on_page[0..8].copy_from_slice(&3u64.to_le_bytes());
        let root = leaf_page(
            2,
            size,
            &[
                (b"big", &on_page, BUCKET_LEAF),
                (b"small", &inline, BUCKET_LEAF),
            ],
        );
        let big = leaf_page(3, size, &[(b"k", b"v", 0)]);
        // The older meta (txid 1) names a root that is not there: the newer one wins.
        let pages = [
            meta_page(0, size, 2, 4, 7),
            meta_page(1, size, 99, 4, 1),
            root,
            big,
        ];
        let (f, len) = file_of(&pages);
        let db = Bolt::open(f.reopen().unwrap(), len).unwrap();
        let items = |b: &Bucket| {
            let mut out = vec![];
            db.each(b, &mut |_, k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
            out
        };
        let small = db.bucket(b"small").unwrap();
        assert_eq!(
            items(&small),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
        let big = db.bucket(b"big").unwrap();
        assert_eq!(items(&big), vec![(b"k".to_vec(), b"v".to_vec())]);
        assert!(db.bucket(b"none").is_none());
    }

    #[test]
    fn damaged_files_are_errors() {
        let size = 4096;
        // Page 2: the root, with bucket "b" whose tree is page 3, a leaf; page 4: a spare leaf.
        let mut bucket = vec![0u8; 16];
        bucket[0..8].copy_from_slice(&3u64.to_le_bytes());
        let root = leaf_page(2, size, &[(b"b", &bucket, BUCKET_LEAF)]);
        let good = [
            meta_page(0, size, 2, 5, 1),
            meta_page(1, size, 2, 5, 0),
            root,
            leaf_page(3, size, &[(b"k", b"v", 0)]),
            leaf_page(4, size, &[(b"x", b"y", 0)]),
        ];
        let open = |pages: &[Vec<u8>]| {
            let (f, len) = file_of(pages);
            Bolt::open(f.reopen().unwrap(), len).and_then(|db| {
                for (_, b) in db.buckets() {
                    db.each(b, &mut |_, _, _| Ok(true))?;
                }
                Ok(())
            })
        };
        let branch = |id: u64, children: &[u64], overflow: u32| {
            let mut p = vec![0u8; size];
            p[0..8].copy_from_slice(&id.to_le_bytes());
            p[8..10].copy_from_slice(&BRANCH.to_le_bytes());
            p[10..12].copy_from_slice(&(children.len() as u16).to_le_bytes());
            p[12..16].copy_from_slice(&overflow.to_le_bytes());
            for (i, c) in children.iter().enumerate() {
                let e = HEADER + i * ELEMENT;
                p[e + 8..e + 16].copy_from_slice(&c.to_le_bytes());
            }
            p
        };
        open(&good).unwrap();
        // Both metas with bad checksums.
        let mut p = good.to_vec();
        p[0][HEADER + 20] ^= 1;
        p[1][HEADER + 20] ^= 1;
        assert!(open(&p).is_err());
        // Cut short: the meta says 5 pages.
        assert!(open(&good[..4]).is_err());
        // An element whose key runs past its page.
        let mut p = good.to_vec();
        p[3][HEADER + 8..HEADER + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(open(&p).is_err());
        // A count of elements larger than the page.
        let mut p = good.to_vec();
        p[3][10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(open(&p).is_err());
        // A key outside any bucket.
        let mut p = good.to_vec();
        p[2] = leaf_page(2, size, &[(b"k", b"v", 0)]);
        assert!(open(&p).is_err());
        // A branch page pointing at itself, spanning the rest of the file (each level would
        // hold another copy of it), or naming one page twice (read over and over).
        for bad in [branch(3, &[3], 1), branch(3, &[4, 4, 4, 4], 0)] {
            let mut p = good.to_vec();
            p[3] = bad;
            let err = open(&p).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("reached twice"), "{err}");
        }
        // The root's page named as a bucket's tree too.
        let mut p = good.to_vec();
        let mut twice = vec![0u8; 16];
        twice[0..8].copy_from_slice(&2u64.to_le_bytes());
        p[2] = leaf_page(2, size, &[(b"b", &twice, BUCKET_LEAF)]);
        assert!(open(&p).is_err());
        // A page claiming to span far past the file.
        let mut p = good.to_vec();
        p[3][12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(open(&p).is_err());
        // Not bbolt at all.
        assert!(!is_bbolt(b"CAIRNSNAP1...................."));
        assert!(is_bbolt(&good[0]));
        let mut damaged_first = good[0].clone();
        damaged_first[HEADER] ^= 1;
        assert!(!is_bbolt(&damaged_first));
        damaged_first.extend_from_slice(&good[1]);
        assert!(is_bbolt(&damaged_first));
    }
}
