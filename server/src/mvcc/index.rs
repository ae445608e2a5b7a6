//! The key index: for every key, the revisions at which it changed, grouped
//! in generations (a generation runs from a create to a delete), as etcd's
//! `treeIndex`/`keyIndex` do.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::Revision;

/// The keys a request addresses, decoded from etcd's `key`/`range_end` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly `key`.
    Single(Vec<u8>),
    /// `range_end == "\0"`: every key `>= key`.
    From(Vec<u8>),
    /// `[key, range_end)`.
    Between(Vec<u8>, Vec<u8>),
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        match self {
            KeyRange::Single(key) => key.as_slice() == k,
            KeyRange::From(key) => k >= key.as_slice(),
            KeyRange::Between(key, end) => k >= key.as_slice() && k < end.as_slice(),
        }
    }

    fn bounds(&self) -> Option<KeyBounds<'_>> {
        Some(match self {
            KeyRange::Single(key) => (Bound::Included(key), Bound::Included(key)),
            KeyRange::From(key) => (Bound::Included(key), Bound::Unbounded),
            KeyRange::Between(key, end) => {
                if end <= key {
                    return None;
                }
                (Bound::Included(key), Bound::Excluded(end))
            }
        })
    }
}

type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

#[derive(Debug, Clone, Default)]
struct Generation {
    /// Number of changes in this generation, the deletion included; never
    /// reduced by compaction, so versions stay right after it.
    ver: i64,
    created: Revision,
    revs: Vec<Revision>,
}

#[derive(Debug, Clone)]
struct KeyHistory {
    /// Oldest first; the last one is empty when the key is deleted.
    gens: Vec<Generation>,
}

/// A key as seen at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyAt {
    pub key: Vec<u8>,
    pub modified: Revision,
    pub created: Revision,
    pub version: i64,
}

impl KeyHistory {
    fn find_generation(&self, at: i64) -> Option<&Generation> {
        let last = self.gens.len() - 1;
        for (i, g) in self.gens.iter().enumerate().rev() {
            if g.revs.is_empty() {
                continue;
            }
            if i != last && g.revs[g.revs.len() - 1].main <= at {
                // Deleted at or before `at`.
                return None;
            }
            if g.revs[0].main <= at {
                return Some(g);
            }
        }
        None
    }

    fn get(&self, at: i64) -> Option<(Revision, Revision, i64)> {
        let g = self.find_generation(at)?;
        let n = g.revs.iter().rposition(|r| r.main <= at)?;
        Some((g.revs[n], g.created, g.ver - (g.revs.len() - n - 1) as i64))
    }
}

/// A range walk over the index given up to several steps
/// ([`KeyIndex::range_step`]), so that a reader of many keys can let the
/// index go between steps.
#[derive(Debug, Clone)]
pub struct RangeWalk {
    range: KeyRange,
    /// The revision the keys are seen at.
    pub at: i64,
    /// At most this many keys kept (0: all).
    limit: usize,
    /// Whether keys are kept at all (not when only counted).
    collect: bool,
    /// The last key walked, where the next step resumes.
    resume: Option<Vec<u8>>,
    /// The live keys kept so far, in key order.
    pub keys: Vec<KeyAt>,
    /// How many live keys were seen so far.
    pub total: usize,
}

impl RangeWalk {
    /// A walk of `range` at `at` keeping at most `limit` keys (0: all), or
    /// none when `collect` is false (a count).
    pub fn new(range: KeyRange, at: i64, limit: usize, collect: bool) -> Self {
        RangeWalk {
            range,
            at,
            limit,
            collect,
            resume: None,
            keys: Vec::new(),
            total: 0,
        }
    }

    /// Starts over at `at` (what was walked was compacted away).
    pub fn restart(&mut self, at: i64) {
        self.at = at;
        self.resume = None;
        self.keys.clear();
        self.total = 0;
    }
}

/// The in-memory index of every key's revisions.
#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    keys: BTreeMap<Vec<u8>, KeyHistory>,
}

impl KeyIndex {
    /// Records a put of `key` at `rev`.
    pub fn put(&mut self, key: &[u8], rev: Revision) {
        let h = self.keys.entry(key.to_vec()).or_insert_with(|| KeyHistory {
            gens: vec![Generation::default()],
        });
        let g = h.gens.last_mut().expect("history has a generation");
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.ver += 1;
    }

    /// Records a put read back from storage (a rebuild): as [`Self::put`], except that a
    /// generation whose first records a compaction removed starts with the creation revision
    /// and version the record carries.
    pub fn put_restored(&mut self, key: &[u8], rev: Revision, created: i64, version: i64) {
        let h = self.keys.entry(key.to_vec()).or_insert_with(|| KeyHistory {
            gens: vec![Generation::default()],
        });
        let g = h.gens.last_mut().expect("history has a generation");
        if g.revs.is_empty() {
            g.created = if created > 0 && created < rev.main {
                Revision::new(created, 0)
            } else {
                rev
            };
            if version > 1 {
                g.ver = version - 1;
            }
        }
        g.revs.push(rev);
        g.ver += 1;
    }

    /// Every revision at or before `at` the index still holds: after a compaction at `at`,
    /// the records a member keeps of that part of history (etcd's `keep`).
    pub fn kept_at(&self, at: i64) -> std::collections::HashSet<Revision> {
        self.keys
            .values()
            .flat_map(|h| h.gens.iter())
            .flat_map(|g| g.revs.iter())
            .filter(|r| r.main <= at)
            .copied()
            .collect()
    }

    /// Records the deletion of `key` at `rev`; the key must be live.
    pub fn tombstone(&mut self, key: &[u8], rev: Revision) -> bool {
        let Some(h) = self.keys.get_mut(key) else {
            return false;
        };
        let g = h.gens.last_mut().expect("history has a generation");
        if g.revs.is_empty() {
            return false;
        }
        g.revs.push(rev);
        g.ver += 1;
        h.gens.push(Generation::default());
        true
    }

    /// The key's latest change at or before `at`, if it is live at `at`.
    pub fn get(&self, key: &[u8], at: i64) -> Option<KeyAt> {
        let (modified, created, version) = self.keys.get(key)?.get(at)?;
        Some(KeyAt {
            key: key.to_vec(),
            modified,
            created,
            version,
        })
    }

    /// Every key of `range` live at `at`, in key order, at most `limit` when
    /// `limit > 0`. Returns the keys and the total number live in the range.
    pub fn range(&self, range: &KeyRange, at: i64, limit: usize) -> (Vec<KeyAt>, usize) {
        let mut walk = RangeWalk::new(range.clone(), at, limit, true);
        self.range_step(&mut walk, usize::MAX);
        (walk.keys, walk.total)
    }

    /// Goes on with `walk` for at most `budget` keys of the index, live or
    /// not; returns whether the walk reached the end of its range. A walk
    /// given up to several calls answers as [`Self::range`] (or
    /// [`Self::count`]) would have at its revision, whatever was applied in
    /// between, as long as no compaction passed that revision.
    pub fn range_step(&self, walk: &mut RangeWalk, budget: usize) -> bool {
        let Some((lower, upper)) = walk.range.bounds() else {
            return true;
        };
        let lower = match &walk.resume {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => lower,
        };
        let mut last = None;
        for (n, (k, h)) in self.keys.range::<[u8], _>((lower, upper)).enumerate() {
            if n == budget {
                walk.resume = last.map(<[u8]>::to_vec);
                return false;
            }
            last = Some(k.as_slice());
            if let Some((modified, created, version)) = h.get(walk.at) {
                walk.total += 1;
                if walk.collect && (walk.limit == 0 || walk.keys.len() < walk.limit) {
                    walk.keys.push(KeyAt {
                        key: k.clone(),
                        modified,
                        created,
                        version,
                    });
                }
            }
        }
        true
    }

    /// Number of keys with any history.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Drops history older than `at`, keeping for every key the latest change
    /// at or before `at` unless it is a deletion. Returns the dropped revisions
    /// (the storage engine deletes them).
    pub fn compact(&mut self, at: i64) -> Vec<Revision> {
        let mut removed = Vec::new();
        self.keys.retain(|_, h| {
            // The first generation that is still live after `at`, or the last.
            let mut gi = 0;
            while gi < h.gens.len() - 1 {
                let g = &h.gens[gi];
                if g.revs[g.revs.len() - 1].main > at {
                    break;
                }
                gi += 1;
            }
            for g in &h.gens[..gi] {
                removed.extend_from_slice(&g.revs);
            }
            h.gens.drain(..gi);
            let last_gen = h.gens.len() == 1;
            let g = &mut h.gens[0];
            if !g.revs.is_empty() {
                // Keep the latest revision <= at and everything after it.
                if let Some(n) = g.revs.iter().rposition(|r| r.main <= at) {
                    removed.extend(g.revs.drain(..n));
                    // A generation left with only its deletion is gone.
                    if g.revs.len() == 1 && !last_gen {
                        removed.push(g.revs[0]);
                        h.gens.remove(0);
                    }
                }
            }
            !(h.gens.len() == 1 && h.gens[0].revs.is_empty())
        });
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    #[test]
    fn versions_and_generations() {
        let mut ix = KeyIndex::default();
        ix.put(b"a", r(2));
        ix.put(b"a", r(3));
        assert_eq!(ix.get(b"a", 3).unwrap().version, 2);
        assert_eq!(ix.get(b"a", 2).unwrap().version, 1);
        assert!(ix.get(b"a", 1).is_none());
        assert!(ix.tombstone(b"a", r(4)));
        assert!(ix.get(b"a", 4).is_none());
        assert!(
            !ix.tombstone(b"a", r(5)),
            "deleting a deleted key changes nothing"
        );
        ix.put(b"a", r(5));
        let k = ix.get(b"a", 5).unwrap();
        assert_eq!((k.version, k.created, k.modified), (1, r(5), r(5)));
        assert_eq!(ix.get(b"a", 3).unwrap().created, r(2));
    }

    #[test]
    fn range_counts_everything_but_limits_output() {
        let mut ix = KeyIndex::default();
        for (i, k) in [b"a", b"b", b"c"].iter().enumerate() {
            ix.put(*k, r(i as i64 + 2));
        }
        let (keys, total) = ix.range(&KeyRange::new(b"a", b"\0"), 10, 2);
        assert_eq!((keys.len(), total), (2, 3));
        let (keys, _) = ix.range(&KeyRange::new(b"b", b"c"), 10, 0);
        assert_eq!(keys[0].key, b"b");
        assert_eq!(ix.range(&KeyRange::new(b"c", b"a"), 10, 0).1, 0);
    }

    #[test]
    fn a_walk_in_steps_answers_as_one_whatever_is_applied_between() {
        let fresh = || {
            let mut ix = KeyIndex::default();
            for i in 0..50u8 {
                ix.put(&[b'k', i], r(i as i64 + 2));
            }
            ix.tombstone(&[b'k', 7], r(52));
            ix
        };
        let range = KeyRange::new(b"k", b"l");
        let (want, want_total) = fresh().range(&range, 60, 11);
        assert_eq!((want.len(), want_total), (11, 49));
        for budget in [1, 3, 49, 50, 1000] {
            let mut ix = fresh();
            let mut walk = RangeWalk::new(range.clone(), 60, 11, true);
            let mut steps = 1;
            while !ix.range_step(&mut walk, budget) {
                steps += 1;
                // Later changes, before, at and after the walk's position, are not seen.
                ix.put(b"k", r(100 + steps));
                ix.tombstone(&[b'k', 40], r(100 + steps));
                ix.put(&[b'k', 200], r(100 + steps));
            }
            assert_eq!(
                (&walk.keys, walk.total),
                (&want, want_total),
                "budget {budget}"
            );
            assert_eq!(steps > 1, budget < 50, "budget {budget}: {steps} steps");
        }
        let ix = fresh();
        let mut count = RangeWalk::new(range, 60, 0, false);
        while !ix.range_step(&mut count, 7) {}
        assert_eq!((count.keys.len(), count.total), (0, 49));
        let mut empty = RangeWalk::new(KeyRange::new(b"b", b"a"), 60, 0, true);
        assert!(ix.range_step(&mut empty, 1));
        assert_eq!(empty.total, 0);
    }

    #[test]
    fn compaction_keeps_latest_before_and_drops_deleted() {
        let mut ix = KeyIndex::default();
        ix.put(b"a", r(2));
        ix.put(b"a", r(3));
        ix.put(b"b", r(4));
        ix.tombstone(b"b", r(5));
        ix.put(b"a", r(6));
        let mut removed = ix.compact(5);
        removed.sort();
        assert_eq!(removed, vec![r(2), r(4), r(5)]);
        assert_eq!(ix.get(b"a", 5).unwrap().modified, r(3));
        assert_eq!(ix.get(b"a", 5).unwrap().version, 2);
        assert!(ix.get(b"b", 4).is_none());
        assert_eq!(ix.len(), 1);
    }
}
