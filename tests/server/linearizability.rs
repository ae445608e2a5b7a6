//! A linearizability checker for key-value histories (Wing & Gong's
//! search with Lowe's memoization, as in Porcupine/Knossos), one register
//! per key. Values written are unique, reads are linearizable gets. A write
//! whose outcome is unknown (error or timeout) has no return: it may take
//! effect at any point after its invocation, or never.

use std::collections::{BTreeMap, HashSet};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Put of a unique value.
    Put(u64),
    /// Get that returned this value (None: key absent).
    Get(Option<u64>),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub key: u32,
    pub kind: Kind,
    /// Invocation time (ns since the run began).
    pub call: u64,
    /// Response time; None when the outcome is unknown.
    pub ret: Option<u64>,
}

/// Checks every key's history, each key starting at `initial` (absent if
/// not there); the error describes the first key whose history has no
/// linearization.
pub fn check(ops: &[Op], initial: &BTreeMap<u32, u64>) -> Result<(), String> {
    let mut by_key: BTreeMap<u32, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key).or_default().push(op.clone());
    }
    for (key, ops) in by_key {
        check_register(&ops, initial.get(&key).copied()).map_err(|e| format!("key {key}: {e}"))?;
    }
    Ok(())
}

const NIL: usize = usize::MAX;

struct Entry {
    op: usize,
    call: bool,
    /// For a call: its return entry.
    pair: usize,
    prev: usize,
    next: usize,
}

fn step(state: Option<u64>, kind: &Kind) -> Option<Option<u64>> {
    match kind {
        Kind::Put(v) => Some(Some(*v)),
        Kind::Get(seen) => (*seen == state).then_some(state),
    }
}

/// One register, starting at `initial` (None: absent).
pub fn check_register(ops: &[Op], initial: Option<u64>) -> Result<(), String> {
    // Events: calls sort before returns at the same instant (the lenient
    // reading of equal timestamps). Unknown outcomes return at the end.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, 0, i));
        events.push((op.ret.unwrap_or(u64::MAX), 1, i));
    }
    events.sort();
    // Entry 0 is the head sentinel.
    let mut e: Vec<Entry> = vec![Entry {
        op: NIL,
        call: false,
        pair: NIL,
        prev: NIL,
        next: NIL,
    }];
    let mut call_entry = vec![NIL; ops.len()];
    for (_, is_ret, i) in &events {
        let idx = e.len();
        let prev = idx - 1;
        e[prev].next = idx;
        e.push(Entry {
            op: *i,
            call: *is_ret == 0,
            pair: NIL,
            prev,
            next: NIL,
        });
        if *is_ret == 0 {
            call_entry[*i] = idx;
        } else {
            e[call_entry[*i]].pair = idx;
        }
    }
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = initial;
    let mut cur = e[0].next;
    let mut steps = 0u64;
    while e[0].next != NIL {
        steps += 1;
        if steps > 50_000_000 {
            return Err("search too large to decide".into());
        }
        if cur == NIL {
            return Err("internal: ran off the history".into());
        }
        if e[cur].call {
            let op = e[cur].op;
            if let Some(next_state) = step(state, &ops[op].kind) {
                let mut bits = linearized.clone();
                bits[op / 64] |= 1 << (op % 64);
                if cache.insert((bits.clone(), next_state)) {
                    stack.push((cur, state));
                    state = next_state;
                    linearized = bits;
                    lift(&mut e, cur);
                    cur = e[0].next;
                    continue;
                }
            }
            cur = e[cur].next;
        } else {
            // An operation returned before any order could place it.
            let Some((entry, prev_state)) = stack.pop() else {
                let op = &ops[e[cur].op];
                return Err(format!(
                    "no linearization: {:?} invoked at {} ns, returned at {:?} ns",
                    op.kind, op.call, op.ret
                ));
            };
            state = prev_state;
            let op = e[entry].op;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut e, entry);
            cur = e[entry].next;
        }
    }
    Ok(())
}

fn lift(e: &mut [Entry], call: usize) {
    let ret = e[call].pair;
    for x in [call, ret] {
        let (p, n) = (e[x].prev, e[x].next);
        e[p].next = n;
        if n != NIL {
            e[n].prev = p;
        }
    }
}

fn unlift(e: &mut [Entry], call: usize) {
    let ret = e[call].pair;
    for x in [ret, call] {
        let (p, n) = (e[x].prev, e[x].next);
        e[p].next = x;
        if n != NIL {
            e[n].prev = x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(v: u64, call: u64, ret: Option<u64>) -> Op {
        Op {
            key: 0,
            kind: Kind::Put(v),
            call,
            ret,
        }
    }

    fn get(v: Option<u64>, call: u64, ret: u64) -> Op {
        Op {
            key: 0,
            kind: Kind::Get(v),
            call,
            ret: Some(ret),
        }
    }

    #[test]
    fn sequential_history_passes() {
        let h = [
            get(None, 0, 1),
            put(1, 2, Some(3)),
            get(Some(1), 4, 5),
            put(2, 6, Some(7)),
            get(Some(2), 8, 9),
        ];
        assert_eq!(check_register(&h, None), Ok(()));
    }

    #[test]
    fn stale_read_fails() {
        // The read starts after put(2) returned but sees 1.
        let h = [put(1, 0, Some(1)), put(2, 2, Some(3)), get(Some(1), 4, 5)];
        assert!(check_register(&h, None).is_err());
    }

    #[test]
    fn initial_value_counts() {
        let h = [get(Some(7), 0, 1)];
        assert_eq!(check_register(&h, Some(7)), Ok(()));
        assert!(check_register(&h, None).is_err());
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let h = [put(1, 0, Some(1)), get(None, 2, 3)];
        assert!(check_register(&h, None).is_err());
    }

    #[test]
    fn concurrent_ops_may_order_either_way() {
        // The read overlaps put(2): both 1 and 2 are fine.
        let h = [
            put(1, 0, Some(1)),
            put(2, 2, Some(6)),
            get(Some(1), 3, 4),
            get(Some(2), 5, 7),
        ];
        assert_eq!(check_register(&h, None), Ok(()));
        // But once 2 was seen, 1 cannot come back.
        let h = [
            put(1, 0, Some(1)),
            put(2, 2, Some(10)),
            get(Some(2), 3, 4),
            get(Some(1), 5, 6),
        ];
        assert!(check_register(&h, None).is_err());
    }

    #[test]
    fn unknown_writes_may_apply_late_or_never() {
        // put(2) timed out: seen later is fine, never seen is fine.
        let late = [put(1, 0, Some(1)), put(2, 2, None), get(Some(2), 50, 51)];
        assert_eq!(check_register(&late, None), Ok(()));
        let never = [put(1, 0, Some(1)), put(2, 2, None), get(Some(1), 50, 51)];
        assert_eq!(check_register(&never, None), Ok(()));
        // It cannot apply before it was invoked.
        let early = [get(Some(2), 0, 1), put(2, 2, None)];
        assert!(check_register(&early, None).is_err());
        // Nor flicker: seen, then gone, then back.
        let flicker = [
            put(1, 0, Some(1)),
            put(2, 2, None),
            get(Some(2), 3, 4),
            get(Some(1), 5, 6),
        ];
        assert!(check_register(&flicker, None).is_err());
    }
}
