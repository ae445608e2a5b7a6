//! Request checks done before a request is proposed, with etcd's errors
//! (etcd `api/v3rpc/key.go`): empty keys, bad options, too many txn
//! operations and keys written twice in one txn.

use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest,
};

/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

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
    check_txn_ops(r, max_ops)?;
    check_intervals(r).map(|_| ())
}

fn check_txn_ops(r: &TxnRequest, max_ops: usize) -> Result<()> {
    if r.compare.len() > max_ops || r.success.len() > max_ops || r.failure.len() > max_ops {
        return Err(Error::TooManyOps);
    }
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
            Some(Request::RequestTxn(x)) => check_txn_ops(x, max_ops)?,
            None => {}
        }
    }
    Ok(())
}

/// Keys written by one branch: puts and deleted ranges.
#[derive(Default)]
struct Writes {
    puts: Vec<Vec<u8>>,
    dels: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Writes {
    fn del_covers(&self, key: &[u8]) -> bool {
        self.dels
            .iter()
            .any(|(k, e)| super::KeyRange::new(k, e).contains(key))
    }
}

/// etcd's `checkIntervals`: within the branch a txn takes, a key may be put
/// once and not both put and deleted. Branches of nested txns count for both.
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
            Some(Request::RequestPut(p)) => {
                if w.puts.contains(&p.key) {
                    return Err(Error::DuplicateKey);
                }
                w.puts.push(p.key.clone());
            }
            Some(Request::RequestDeleteRange(d)) => {
                w.dels.push((d.key.clone(), d.range_end.clone()))
            }
            Some(Request::RequestTxn(t)) => nested.push(check_intervals(t)?),
            _ => {}
        }
    }
    for p in &w.puts {
        if w.del_covers(p) {
            return Err(Error::DuplicateKey);
        }
    }
    for n in nested {
        for p in &n.puts {
            if w.puts.contains(p) || w.del_covers(p) {
                return Err(Error::DuplicateKey);
            }
        }
        for p in &w.puts {
            if n.del_covers(p) {
                return Err(Error::DuplicateKey);
            }
        }
        w.puts.extend(n.puts);
        w.dels.extend(n.dels);
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
