//! Key permissions of one user, merged from the permissions of all its
//! roles into disjoint intervals, as etcd's range permission cache does: a
//! key is permitted when an interval holds it, a range when one merged
//! interval covers it whole (so `[a,c)` and `[c,e)` together cover `[b,d)`).

use crate::proto::authpb::{permission::Type, Permission};

/// The end of an interval: a key (exclusive) or past every key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Key(Vec<u8>),
    Inf,
}

/// Disjoint, sorted, non-touching intervals `[begin, end)`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Intervals(Vec<(Vec<u8>, End)>);

/// `key` followed by a zero byte: the first key after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

/// A permission's interval: a single key when `range_end` is empty, all
/// keys from `key` on when it is `"\0"`, `[key, range_end)` otherwise.
fn interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, End) {
    let end = match range_end {
        [] => End::Key(successor(key)),
        [0] => End::Inf,
        e => End::Key(e.to_vec()),
    };
    (key.to_vec(), end)
}

impl Intervals {
    fn build(mut all: Vec<(Vec<u8>, End)>) -> Self {
        all.retain(|(b, e)| match e {
            End::Key(k) => b < k,
            End::Inf => true,
        });
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
        Intervals(out)
    }

    /// Whether `key` is in an interval.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.covers(key, &End::Key(successor(key)))
    }

    /// Whether the range `[key, range_end)` (`range_end` empty: the key
    /// alone; `"\0"`: every key from `key` on) lies in one interval.
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

/// What one user may read and write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserPerms {
    pub read: Intervals,
    pub write: Intervals,
}

impl UserPerms {
    /// Merges the permissions of a user's roles.
    pub fn merge<'a>(perms: impl Iterator<Item = &'a Permission>) -> Self {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for p in perms {
            let iv = interval(&p.key, &p.range_end);
            match Type::try_from(p.perm_type) {
                Ok(Type::Read) => read.push(iv),
                Ok(Type::Write) => write.push(iv),
                Ok(Type::Readwrite) => {
                    read.push(iv.clone());
                    write.push(iv);
                }
                Err(_) => {}
            }
        }
        UserPerms {
            read: Intervals::build(read),
            write: Intervals::build(write),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perm(t: Type, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        }
    }

    #[test]
    fn keys_ranges_prefixes_and_from_key() {
        let p = UserPerms::merge(
            [
                perm(Type::Readwrite, "foo", ""),
                perm(Type::Read, "a", "c"),
                perm(Type::Read, "c", "e"),
                perm(Type::Write, "z", "\0"),
            ]
            .iter(),
        );
        assert!(p.read.holds(b"foo") && p.write.holds(b"foo"));
        assert!(!p.read.holds(b"foo0") && !p.read.holds(b"fo"));
        // Two touching grants cover a range across both.
        assert!(p.read.covers_range(b"b", b"d"));
        assert!(p.read.covers_range(b"a", b"e"));
        assert!(!p.read.covers_range(b"a", b"f"));
        assert!(!p.read.covers_range(b"a", b"\0"));
        assert!(!p.write.holds(b"a"));
        assert!(p.write.holds(b"z") && p.write.holds(b"\xff\xff"));
        assert!(p.write.covers_range(b"z1", b"\0"));
        assert!(!p.write.holds(b"y"));
        // A single key inside a range.
        assert!(p.read.covers_range(b"b", b""));
    }

    #[test]
    fn all_keys_and_nothing() {
        let all = UserPerms::merge([perm(Type::Read, "\0", "\0")].iter());
        assert!(all.read.covers_range(b"\0", b"\0"));
        assert!(all.read.holds(b"anything"));
        let none = UserPerms::default();
        assert!(!none.read.holds(b"a") && !none.write.covers_range(b"a", b"b"));
    }
}
