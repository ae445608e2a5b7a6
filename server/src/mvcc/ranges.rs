//! Sets of keys given as etcd ranges (a key; `[key, end)`; every key from
//! `key` on when `end` is `"\0"`), merged into disjoint sorted intervals:
//! whether a key is in the set, or a whole range, is a binary search. Used
//! for txn validation (keys a branch deletes) and auth (keys a user may
//! read or write).

/// The end of an interval: a key (exclusive) or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Inf,
}

/// Disjoint, sorted, non-touching intervals `[begin, end)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet(Vec<(Vec<u8>, End)>);

/// `key` followed by a zero byte: the first key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// An etcd range as an interval: a single key when `range_end` is empty,
/// all keys from `key` on when it is `"\0"`, `[key, range_end)` otherwise.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    let end = match range_end {
        [] => End::Key(successor(key)),
        [0] => End::Inf,
        e => End::Key(e.to_vec()),
    };
    (key.to_vec(), end)
}

impl RangeSet {
    /// The union of etcd ranges `(key, range_end)`; empty ones add nothing.
    pub fn new<'a>(ranges: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut all: Vec<(Vec<u8>, End)> = ranges
            .into_iter()
            .map(|(k, e)| interval(k, e))
            .filter(|(b, e)| match e {
                End::Key(k) => b < k,
                End::Inf => true,
            })
            .collect();
        all.sort();
        let mut out: Vec<(Vec<u8>, End)> = Vec::with_capacity(all.len());
        for (b, e) in all {
            if let Some(last) = out.last_mut() {
                let touches = match &last.1 {
                    End::Inf => true,
                    End::Key(k) => b <= *k,
                };
                if touches {
                    if e > last.1 {
                        last.1 = e;
                    }
                    continue;
                }
            }
            out.push((b, e));
        }
        RangeSet(out)
    }

    /// Whether `key` is in the set.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.covers(key, &End::Key(successor(key)))
    }

    /// Whether the whole range `[key, range_end)` (etcd's forms) is in the set.
    pub fn covers_range(&self, key: &[u8], range_end: &[u8]) -> bool {
        let (_, end) = interval(key, range_end);
        self.covers(key, &end)
    }

    fn covers(&self, key: &[u8], end: &End) -> bool {
        // The last interval beginning at or before `key`.
        let i = self.0.partition_point(|(b, _)| b.as_slice() <= key);
        i > 0 && self.0[i - 1].1 >= *end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ranges_and_from_key_merge() {
        let s = RangeSet::new([
            (&b"foo"[..], &b""[..]),
            (b"a", b"c"),
            (b"c", b"e"),
            (b"z", b"\0"),
            (b"q", b"p"),
        ]);
        assert!(s.holds(b"foo") && !s.holds(b"foo0") && !s.holds(b"fo"));
        assert!(s.covers_range(b"b", b"d") && s.covers_range(b"a", b"e"));
        assert!(!s.covers_range(b"a", b"f") && !s.covers_range(b"a", b"\0"));
        assert!(s.holds(b"z") && s.holds(b"\xff\xff") && s.covers_range(b"z1", b"\0"));
        assert!(
            !s.holds(b"y") && !s.holds(b"q"),
            "an empty range adds nothing"
        );
        assert!(s.covers_range(b"b", b""));
        let all = RangeSet::new([(&b"\0"[..], &b"\0"[..])]);
        assert!(all.covers_range(b"\0", b"\0") && all.holds(b"anything"));
        assert!(!RangeSet::default().holds(b"a"));
    }
}
