//! Request checks with etcd's errors (etcd `api/v3rpc/key.go`): empty keys,
//! bad options, too many txn operations and keys written twice in one txn,
//! done before a request is proposed; and the shape checks that do not
//! depend on flags ([`check_request`]), done again where every member
//! applies it, whoever proposed it.

use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Most txns nested in one another. etcd bounds nesting only through its op budget (up to
/// `--max-txn-ops` levels); a Raft entry carrying a txn nested past about 48 levels would
/// not decode again (prost refuses messages nested over 100 deep), so deeper ones are refused
/// as too many operations.
pub const MAX_TXN_DEPTH: usize = 32;

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

pub fn check_txn(r: &TxnRequest, max_ops: usize) -> Result<()> {
    if txn_depth(r) > MAX_TXN_DEPTH {
        return Err(Error::TooManyOps);
    }
    check_txn_ops(r, max_ops)?;
    check_intervals(r).map(|_| ())
}

/// etcd's `checkTxnRequest`: the largest of a txn's compares, success ops and failure ops
/// counts against `max_ops`, and a nested txn gets what is left (so nesting cannot multiply
/// the ops a request carries).
fn check_txn_ops(r: &TxnRequest, max_ops: usize) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_ops {
        return Err(Error::TooManyOps);
    }
    check_txn_shape(r, &|nested| check_txn_ops(nested, max_ops - opc))
}

/// The checks of a txn's compares and ops that depend on no flag; `nested` checks each
/// nested txn.
fn check_txn_shape(r: &TxnRequest, nested: &dyn Fn(&TxnRequest) -> Result<()>) -> Result<()> {
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(Error::EmptyKey);
        }
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(Request::RequestRange(x)) => check_range(x)?,
            Some(Request::RequestPut(x)) => check_put(x)?,
            Some(Request::RequestDeleteRange(x)) => check_delete(x)?,
            Some(Request::RequestTxn(x)) => nested(x)?,
            None => {}
        }
    }
    Ok(())
}

/// Levels of txns nested in `r` (0 for a txn with none).
fn txn_depth(r: &TxnRequest) -> usize {
    r.success
        .iter()
        .chain(&r.failure)
        .filter_map(|op| match &op.request {
            Some(Request::RequestTxn(x)) => Some(1 + txn_depth(x)),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// What every member checks before it applies a request, whoever proposed it: the checks
/// above that depend on no flag (so that every member decides alike). A raw proposal from a
/// peer skips the API's checks; an invalid option found halfway through a txn would leave it
/// partly applied.
pub fn check_request(r: &crate::proto::raftpb::internal_request::Request) -> Result<()> {
    use crate::proto::raftpb::internal_request::Request as R;
    match r {
        R::Put(p) => check_put(p),
        R::DeleteRange(d) => check_delete(d),
        // No depth limit here: an entry decodes only if it is nested less than prost's
        // limit, and builds before the limit applied txns nested deeper than it.
        R::Txn(t) => {
            fn shape(t: &TxnRequest) -> Result<()> {
                check_txn_shape(t, &shape)
            }
            shape(t)
        }
        _ => Ok(()),
    }
}

/// Keys written by one branch: puts and deleted ranges.
#[derive(Default)]
struct Writes {
    puts: std::collections::BTreeSet<Vec<u8>>,
    dels: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Writes {
    /// The keys the branch deletes, as a set to search.
    fn deleted(&self) -> super::RangeSet {
        super::RangeSet::new(self.dels.iter().map(|(k, e)| (k.as_slice(), e.as_slice())))
    }
}

/// etcd's `checkIntervals`: within the branch a txn takes, a key may be put
/// once and not both put and deleted. Branches of nested txns count for both.
/// O(n log n) in the number of operations (sets, not pairwise comparisons).
fn check_intervals(r: &TxnRequest) -> Result<Writes> {
    let s = branch_writes(&r.success)?;
    let f = branch_writes(&r.failure)?;
    let mut all = Writes::default();
    for w in [s, f] {
        all.puts.extend(w.puts);
        all.dels.extend(w.dels);
    }
    Ok(all)
}

fn branch_writes(ops: &[crate::proto::etcdserverpb::RequestOp]) -> Result<Writes> {
    let mut w = Writes::default();
    let mut nested = Vec::new();
    for op in ops {
        match &op.request {
            Some(Request::RequestPut(p)) if !w.puts.insert(p.key.clone()) => {
                return Err(Error::DuplicateKey);
            }
            Some(Request::RequestDeleteRange(d)) => {
                w.dels.push((d.key.clone(), d.range_end.clone()))
            }
            Some(Request::RequestTxn(t)) => nested.push(check_intervals(t)?),
            _ => {}
        }
    }
    let mut deleted = w.deleted();
    if w.puts.iter().any(|p| deleted.holds(p)) {
        return Err(Error::DuplicateKey);
    }
    for n in nested {
        if n.puts
            .iter()
            .any(|p| w.puts.contains(p) || deleted.holds(p))
            || n.dels.iter().any(|(k, e)| puts_in(&w.puts, k, e))
        {
            return Err(Error::DuplicateKey);
        }
        w.puts.extend(n.puts);
        if !n.dels.is_empty() {
            w.dels.extend(n.dels);
            deleted = w.deleted();
        }
    }
    Ok(w)
}

/// Whether any of `puts` is in the range `(key, range_end)` (etcd's forms):
/// a range query on the set, not a walk over it.
fn puts_in(puts: &std::collections::BTreeSet<Vec<u8>>, key: &[u8], range_end: &[u8]) -> bool {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let upper = match range_end {
        [] => return puts.contains(key),
        [0] => Unbounded,
        end if end <= key => return false,
        end => Excluded(end),
    };
    puts.range::<[u8], _>((Included(key), upper))
        .next()
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_nested_txns_are_not_quadratic() {
        // 20,000 nested txns of one put each beside 20,000 puts.
        let mut ops: Vec<RequestOp> = (0..20_000).map(|i| put(&format!("p{i:05}"))).collect();
        ops.extend((0..20_000).map(|i| RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                success: vec![put(&format!("n{i:05}"))],
                ..Default::default()
            })),
        }));
        let t = TxnRequest {
            success: ops,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        assert!(check_intervals(&t).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // A nested delete over an outer put is still caught.
        let clash = TxnRequest {
            success: vec![
                put("k5"),
                RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        success: vec![del("k", "l")],
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        assert_eq!(check_intervals(&clash).err(), Some(Error::DuplicateKey));
    }

    #[test]
    fn validating_a_huge_txn_is_not_quadratic() {
        // 200,000 distinct puts and deletes (what fits in far more than the
        // request limit): pairwise comparisons would take minutes.
        let ops: Vec<RequestOp> = (0..100_000)
            .flat_map(|i| [put(&format!("p{i:06}")), del(&format!("d{i:06}"), "")])
            .collect();
        let t = TxnRequest {
            success: ops,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        assert!(check_intervals(&t).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    use crate::proto::etcdserverpb::RequestOp;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, e: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: e.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn duplicate_puts_and_put_delete_overlap_are_refused() {
        let t = TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Err(Error::DuplicateKey));
        let t = TxnRequest {
            success: vec![put("a1"), del("a", "b")],
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Err(Error::DuplicateKey));
        let t = TxnRequest {
            success: vec![put("a")],
            failure: vec![put("a")],
            ..Default::default()
        };
        assert_eq!(
            check_txn(&t, MAX_TXN_OPS),
            Ok(()),
            "different branches may write the same key"
        );
        let t = TxnRequest {
            success: vec![del("a", ""), del("a", "")],
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Ok(()));
    }

    #[test]
    fn too_many_ops() {
        let t = TxnRequest {
            success: (0..129).map(|i| put(&i.to_string())).collect(),
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Err(Error::TooManyOps));
    }

    fn txn(ops: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                success: ops,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn nested_txns_share_the_op_budget() {
        // 64 nested txns of 64 ranges each: 4096 ops in one request. etcd gives a nested txn
        // what its parent left (128 - 64), so this passes, and one more op at either level
        // does not.
        let range = |i: usize| RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: format!("k{i}").into(),
                ..Default::default()
            })),
        };
        let wide = |n: usize| txn((0..n).map(range).collect());
        let t = TxnRequest {
            success: (0..64).map(|_| wide(64)).collect(),
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Ok(()));
        let t = TxnRequest {
            success: (0..64).map(|_| wide(65)).collect(),
            ..Default::default()
        };
        assert_eq!(check_txn(&t, MAX_TXN_OPS), Err(Error::TooManyOps));
    }

    /// A txn with `levels` txns nested in one another below it, a put in the innermost.
    fn nested(levels: usize) -> TxnRequest {
        let mut ops = vec![put("deep")];
        for _ in 0..levels {
            ops = vec![txn(ops)];
        }
        TxnRequest {
            success: ops,
            ..Default::default()
        }
    }

    #[test]
    fn nesting_is_bounded_so_that_the_entry_decodes() {
        use crate::proto::raftpb::internal_request::Request as R;
        let too_deep = nested(MAX_TXN_DEPTH + 1);
        assert_eq!(txn_depth(&too_deep), MAX_TXN_DEPTH + 1);
        assert_eq!(check_txn(&too_deep, MAX_TXN_OPS), Err(Error::TooManyOps));
        // The deepest txn allowed is allowed, and still decodes inside a Raft entry.
        let deepest = nested(MAX_TXN_DEPTH);
        assert_eq!(check_txn(&deepest, MAX_TXN_OPS), Ok(()));
        assert_eq!(check_request(&R::Txn(deepest.clone())), Ok(()));
        use prost::Message;
        let batch = crate::proto::raftpb::Batch {
            requests: vec![crate::proto::raftpb::InternalRequest {
                request: Some(R::Txn(deepest)),
                ..Default::default()
            }],
            proposer: 1,
            seq: 1,
        };
        let bytes = batch.encode_to_vec();
        assert!(crate::proto::raftpb::Batch::decode(bytes.as_slice()).is_ok());
        // Far deeper does not (what the limit keeps out of the log).
        let batch = crate::proto::raftpb::Batch {
            requests: vec![crate::proto::raftpb::InternalRequest {
                request: Some(R::Txn(nested(60))),
                ..Default::default()
            }],
            proposer: 1,
            seq: 1,
        };
        let bytes = batch.encode_to_vec();
        assert!(crate::proto::raftpb::Batch::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn invalid_options_deep_in_a_txn_are_found_before_it_applies() {
        use crate::proto::raftpb::internal_request::Request as R;
        let bad_sort = RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: "a".into(),
                sort_target: 99,
                ..Default::default()
            })),
        };
        let t = TxnRequest {
            success: vec![put("a"), txn(vec![bad_sort])],
            ..Default::default()
        };
        assert_eq!(check_request(&R::Txn(t)), Err(Error::InvalidSortOption));
        assert_eq!(
            check_request(&R::Put(PutRequest::default())),
            Err(Error::EmptyKey)
        );
    }
}
