//! Key permissions of one user, merged from the permissions of all its
//! roles into disjoint intervals ([`RangeSet`]), as etcd's range permission
//! cache does: a key is permitted when an interval holds it, a range when
//! one merged interval covers it whole (so `[a,c)` and `[c,e)` together
//! cover `[b,d)`).

use crate::mvcc::RangeSet;
use crate::proto::authpb::{permission::Type, Permission};

/// What one user may read and write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserPerms {
    pub read: RangeSet,
    pub write: RangeSet,
}

impl UserPerms {
    /// Merges the permissions of a user's roles.
    pub fn merge<'a>(perms: impl Iterator<Item = &'a Permission>) -> Self {
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for p in perms {
            let range = (p.key.as_slice(), p.range_end.as_slice());
            match Type::try_from(p.perm_type) {
                Ok(Type::Read) => read.push(range),
                Ok(Type::Write) => write.push(range),
                Ok(Type::Readwrite) => {
                    read.push(range);
                    write.push(range);
                }
                Err(_) => {}
            }
        }
        UserPerms {
            read: RangeSet::new(read),
            write: RangeSet::new(write),
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
