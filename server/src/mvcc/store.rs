//! The deterministic state machine of the key space: applies Put,
//! DeleteRange, Txn, Compaction, lease grants/revokes and alarms at the next
//! revision, and evaluates Range at any retained revision.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::index::{KeyAt, KeyIndex, KeyRange, RangeWalk};
use super::{Record, Revision, RevisionReader};
use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, compare::CompareResult, compare::CompareTarget,
    compare::TargetUnion, range_request::SortOrder, range_request::SortTarget, request_op,
    response_op, AlarmMember, AlarmRequest, AlarmResponse, AlarmType, CompactionRequest,
    CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::proto::raftpb::{internal_request::Request, InternalRequest};

/// A lease as the state machine knows it: its granted TTL and the keys
/// attached to it. Expiry is decided by the leader's clock (`crate::lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub ttl: i64,
    pub keys: BTreeSet<Vec<u8>>,
}

/// The response of an applied request (headers carry only the revision; the
/// API layer adds cluster, member and term).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Applied {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    Alarm(AlarmResponse),
    /// An auth change (applied by `crate::auth`, not here); `token` is
    /// Authenticate's.
    Auth {
        token: String,
    },
}

/// Everything a batch of applied requests changed, for the storage engine to
/// persist atomically and the watch hub to publish.
#[derive(Debug, Default)]
pub struct WriteSet {
    pub records: Vec<(Revision, Record)>,
    pub removed: Vec<Revision>,
    /// Lease id to its TTL, or `None` when the lease is gone.
    pub leases: Vec<(i64, Option<i64>)>,
    /// Events in revision order (`kv.mod_revision` is the event's revision).
    pub events: Vec<Event>,
    /// Revisions of leases revoked (the lessor forgets their deadlines).
    pub revoked: Vec<i64>,
    /// Leases granted, with their TTL (the lessor starts their clocks).
    pub granted: Vec<(i64, i64)>,
}

/// One request's write context: its writes share `begin + 1` as revision.
struct Tx {
    begin: i64,
    sub: i64,
}

impl Tx {
    /// A request applied on top of revision `begin`.
    fn at(begin: i64) -> Self {
        Tx { begin, sub: 0 }
    }

    fn next(&mut self) -> Revision {
        self.sub += 1;
        Revision::new(self.begin + 1, self.sub - 1)
    }
    /// The revision reads inside this request report.
    fn read_rev(&self) -> i64 {
        if self.sub > 0 {
            self.begin + 1
        } else {
            self.begin
        }
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// The key space with its history.
#[derive(Debug)]
pub struct MvccStore {
    index: KeyIndex,
    rev: i64,
    compacted: i64,
    leases: BTreeMap<i64, LeaseRecord>,
    alarms: Vec<AlarmMember>,
    /// Records written since the last `take_writes`, not yet readable from storage.
    pending: HashMap<Revision, Record>,
    ws: WriteSet,
    min_lease_ttl: i64,
    /// Tombstones found by a rebuild for keys it had no record of (see `restore`).
    orphans: Vec<Revision>,
}

impl Default for MvccStore {
    fn default() -> Self {
        Self::new(2)
    }
}

impl MvccStore {
    /// An empty store at revision 1. Lease TTLs below `min_lease_ttl`
    /// seconds are raised to it.
    pub fn new(min_lease_ttl: i64) -> Self {
        Self {
            index: KeyIndex::default(),
            rev: 1,
            compacted: 0,
            leases: BTreeMap::new(),
            alarms: Vec::new(),
            pending: HashMap::new(),
            ws: WriteSet::default(),
            min_lease_ttl,
            orphans: Vec::new(),
        }
    }

    /// Rebuilds the index from stored history (in revision order).
    pub fn restore(
        min_lease_ttl: i64,
        records: impl Iterator<Item = (Revision, Record)>,
        leases: impl Iterator<Item = (i64, i64)>,
        rev: i64,
        compacted: i64,
        alarms: Vec<AlarmMember>,
    ) -> Self {
        let mut r = Restorer::new(min_lease_ttl);
        for (rev, rec) in records {
            r.add(rev, rec);
        }
        r.finish(leases, rev, compacted, alarms)
    }

    pub fn revision(&self) -> i64 {
        self.rev
    }

    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    pub fn alarms(&self) -> &[AlarmMember] {
        &self.alarms
    }

    pub fn keys_total(&self) -> usize {
        self.index.len()
    }

    pub fn lease(&self, id: i64) -> Option<&LeaseRecord> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = (i64, &LeaseRecord)> {
        self.leases.iter().map(|(k, v)| (*k, v))
    }

    /// Compacts the index at the stored compaction revision, after a rebuild from storage:
    /// the revisions of records a compaction dropped whose deletion never finished (see
    /// `storage::compactor`).
    pub fn compact_leftovers(&mut self) -> Vec<Revision> {
        let mut left = std::mem::take(&mut self.orphans);
        if self.compacted > 0 {
            left.extend(self.index.compact(self.compacted));
        }
        left
    }

    /// The revisions at or before the compaction revision that are kept (HashKV hashes
    /// those and everything after, as etcd does: whether a compaction's records are
    /// deleted yet does not change a hash).
    pub fn kept_at_compacted(&self) -> std::collections::HashSet<Revision> {
        self.index.kept_at(self.compacted)
    }

    /// Hands over the changes applied since the last call. Until the caller
    /// has persisted them, reads must keep going through this store.
    pub fn take_writes(&mut self) -> WriteSet {
        self.pending.clear();
        std::mem::take(&mut self.ws)
    }

    fn read(&self, reader: &dyn RevisionReader, rev: Revision) -> Result<Record> {
        if let Some(r) = self.pending.get(&rev) {
            return Ok(r.clone());
        }
        reader.read(rev)?.ok_or_else(|| missing(rev))
    }

    fn kv_of(&self, reader: &dyn RevisionReader, k: &KeyAt) -> Result<KeyValue> {
        Ok(kv_at(self.read(reader, k.modified)?, k))
    }

    /// The live value of `key` as of `at`.
    pub fn get(
        &self,
        reader: &dyn RevisionReader,
        key: &[u8],
        at: i64,
    ) -> Result<Option<KeyValue>> {
        match self.index.get(key, at) {
            Some(k) => Ok(Some(self.kv_of(reader, &k)?)),
            None => Ok(None),
        }
    }

    /// Evaluates a Range at the current revision.
    pub fn range(&self, reader: &dyn RevisionReader, r: &RangeRequest) -> Result<RangeResponse> {
        self.range_at(reader, r, self.rev)
    }

    fn check_revision(&self, rev: i64, cur: i64) -> Result<()> {
        if rev > cur {
            return Err(Error::FutureRev);
        }
        if rev > 0 && rev < self.compacted {
            return Err(Error::Compacted);
        }
        Ok(())
    }

    fn range_at(
        &self,
        reader: &dyn RevisionReader,
        r: &RangeRequest,
        cur: i64,
    ) -> Result<RangeResponse> {
        match self.plan_range_at(r, cur)? {
            RangePlan::Counted(resp) => Ok(resp),
            RangePlan::Read { keys, total, cur } => {
                let kvs = keys
                    .iter()
                    .map(|k| self.kv_of(reader, k))
                    .collect::<Result<Vec<_>>>()?;
                finish_range(r, kvs, total, cur)
            }
        }
    }

    /// Starts resolving a Range at the current revision against the index alone:
    /// [`Self::step_range`] walks it, [`RangePlan::read`] then reads the records from
    /// storage. A caller holds the store's lock for one step at a time and reads from a
    /// storage view taken under the lock of the last step, so a large range holds up an
    /// apply for one step at most.
    pub fn start_range(&self, r: &RangeRequest) -> Result<RangeSteps> {
        self.start_range_at(r, self.rev)
    }

    fn start_range_at(&self, r: &RangeRequest, cur: i64) -> Result<RangeSteps> {
        let at = if r.revision <= 0 { cur } else { r.revision };
        self.check_revision(at, cur)?;
        if !r.count_only {
            SortOrder::try_from(r.sort_order).map_err(|_| Error::InvalidSortOption)?;
            SortTarget::try_from(r.sort_target).map_err(|_| Error::InvalidSortOption)?;
        }
        let limit = if r.count_only || range_filtered(r) || r.limit <= 0 {
            0
        } else {
            r.limit as usize + 1
        };
        let range = KeyRange::new(&r.key, &r.range_end);
        Ok(RangeSteps {
            walk: RangeWalk::new(range, at, limit, !r.count_only),
            cur,
            pinned: r.revision > 0,
            count_only: r.count_only,
        })
    }

    /// Walks `steps` on over at most `budget` keys of the index; the plan once the walk
    /// is done. A range at the current revision that a compaction overtook between steps
    /// starts over at the revision now current (its answer is as fresh as asked); one at
    /// a revision it names fails as compacted, as it would have had it come later.
    pub fn step_range(&self, steps: &mut RangeSteps, budget: usize) -> Result<Option<RangePlan>> {
        if steps.walk.at < self.compacted {
            if steps.pinned {
                return Err(Error::Compacted);
            }
            steps.cur = self.rev;
            steps.walk.restart(self.rev);
        }
        if !self.index.range_step(&mut steps.walk, budget) {
            return Ok(None);
        }
        let total = steps.walk.total;
        Ok(Some(if steps.count_only {
            RangePlan::Counted(RangeResponse {
                header: header(steps.cur),
                count: total as i64,
                ..Default::default()
            })
        } else {
            RangePlan::Read {
                keys: std::mem::take(&mut steps.walk.keys),
                total,
                cur: steps.cur,
            }
        }))
    }

    fn plan_range_at(&self, r: &RangeRequest, cur: i64) -> Result<RangePlan> {
        let mut steps = self.start_range_at(r, cur)?;
        self.step_range(&mut steps, usize::MAX)?
            .ok_or_else(|| Error::Internal("mvcc: an unbounded range walk stopped".into()))
    }

    fn nospace(&self) -> bool {
        self.alarms
            .iter()
            .any(|a| a.alarm == AlarmType::Nospace as i32)
    }

    /// Applies one request at the next revision.
    pub fn apply(&mut self, reader: &dyn RevisionReader, req: &InternalRequest) -> Result<Applied> {
        let Some(request) = &req.request else {
            return Err(Error::InvalidArgument("empty request".into()));
        };
        super::validate::check_request(request)?;
        match request {
            Request::Put(p) => {
                if self.nospace() {
                    return Err(Error::NoSpace);
                }
                self.check_put(reader, p)?;
                let mut tx = Tx::at(self.rev);
                let resp = self.put(reader, &mut tx, p)?;
                self.finish(tx);
                Ok(Applied::Put(resp))
            }
            Request::DeleteRange(d) => {
                let mut tx = Tx::at(self.rev);
                let resp = self.delete(reader, &mut tx, d)?;
                self.finish(tx);
                Ok(Applied::DeleteRange(resp))
            }
            Request::Txn(t) => {
                if self.nospace() && !is_read_only(t) {
                    return Err(Error::NoSpace);
                }
                let path = self.compare_path(reader, t)?;
                self.check_txn(reader, t, &path)?;
                let mut tx = Tx::at(self.rev);
                let mut resp = self.txn(reader, &mut tx, t, &path)?;
                resp.header = header(tx.read_rev());
                self.finish(tx);
                Ok(Applied::Txn(resp))
            }
            Request::Compaction(c) => self.compact(c).map(Applied::Compaction),
            Request::LeaseGrant(g) => {
                if self.nospace() {
                    return Err(Error::NoSpace);
                }
                self.lease_grant(g).map(Applied::LeaseGrant)
            }
            Request::LeaseRevoke(r) => self.lease_revoke(reader, r).map(Applied::LeaseRevoke),
            Request::Alarm(a) => self.alarm(a).map(Applied::Alarm),
            other => Err(Error::Internal(format!(
                "not a key-space request: {other:?}"
            ))),
        }
    }

    fn finish(&mut self, tx: Tx) {
        if tx.sub > 0 {
            self.rev = tx.begin + 1;
        }
    }

    fn check_put(&self, reader: &dyn RevisionReader, p: &PutRequest) -> Result<()> {
        if (p.ignore_value || p.ignore_lease) && self.index.get(&p.key, self.rev).is_none() {
            return Err(Error::KeyNotFound);
        }
        let _ = reader;
        if p.lease != 0 && !self.leases.contains_key(&p.lease) {
            return Err(Error::LeaseNotFound);
        }
        Ok(())
    }

    /// Records a change; its event carries the previous value, which watchers
    /// that asked for `prev_kv` get without another read.
    fn write(&mut self, rev: Revision, kv: KeyValue, tombstone: bool, prev: Option<KeyValue>) {
        let event_type = if tombstone {
            EventType::Delete
        } else {
            EventType::Put
        };
        self.ws.events.push(Event {
            r#type: event_type as i32,
            kv: Some(kv.clone()),
            prev_kv: prev,
        });
        let rec = Record { kv, tombstone };
        self.pending.insert(rev, rec.clone());
        self.ws.records.push((rev, rec));
    }

    fn detach(&mut self, key: &[u8], lease: i64) {
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
    }

    fn put(
        &mut self,
        reader: &dyn RevisionReader,
        tx: &mut Tx,
        p: &PutRequest,
    ) -> Result<PutResponse> {
        let prev = self.get(reader, &p.key, tx.begin + 1)?;
        let value = if p.ignore_value {
            prev.as_ref().map(|kv| kv.value.clone()).unwrap_or_default()
        } else {
            p.value.clone()
        };
        let lease = if p.ignore_lease {
            prev.as_ref().map(|kv| kv.lease).unwrap_or_default()
        } else {
            p.lease
        };
        let rev = tx.next();
        let (create_revision, version) = match &prev {
            Some(kv) => (kv.create_revision, kv.version + 1),
            None => (rev.main, 1),
        };
        self.index.put(&p.key, rev);
        if let Some(old) = prev
            .as_ref()
            .map(|kv| kv.lease)
            .filter(|l| *l != 0 && *l != lease)
        {
            self.detach(&p.key, old);
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(p.key.clone());
            }
        }
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.write(rev, kv, false, prev.clone());
        Ok(PutResponse {
            header: header(rev.main),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(
        &mut self,
        reader: &dyn RevisionReader,
        tx: &mut Tx,
        d: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let (keys, _) = self
            .index
            .range(&KeyRange::new(&d.key, &d.range_end), tx.begin + 1, 0);
        let mut prev_kvs = Vec::new();
        for k in &keys {
            let kv = self.kv_of(reader, k)?;
            let rev = tx.next();
            self.index.tombstone(&k.key, rev);
            if kv.lease != 0 {
                self.detach(&k.key, kv.lease);
            }
            let tomb = KeyValue {
                key: k.key.clone(),
                mod_revision: rev.main,
                ..Default::default()
            };
            self.write(rev, tomb, true, Some(kv.clone()));
            if d.prev_kv {
                prev_kvs.push(kv);
            }
        }
        Ok(DeleteRangeResponse {
            header: header(tx.read_rev()),
            deleted: keys.len() as i64,
            prev_kvs,
        })
    }

    /// Evaluates the compares of `t` and of the nested txns on the chosen
    /// branches, all against the state before the txn (as etcd does).
    fn compare_path(&self, reader: &dyn RevisionReader, t: &TxnRequest) -> Result<Vec<bool>> {
        let mut path = vec![true];
        for c in &t.compare {
            if !self.compare(reader, c)? {
                path[0] = false;
                break;
            }
        }
        let ops = if path[0] { &t.success } else { &t.failure };
        for op in ops {
            if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
                path.extend(self.compare_path(reader, nested)?);
            }
        }
        Ok(path)
    }

    fn compare(&self, reader: &dyn RevisionReader, c: &Compare) -> Result<bool> {
        let (keys, _) = self
            .index
            .range(&KeyRange::new(&c.key, &c.range_end), self.rev, 0);
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        if keys.is_empty() {
            // A missing key has no value to compare; its revisions and version are 0.
            if target == CompareTarget::Value {
                return Ok(false);
            }
            return Ok(compare_kv(c, target, &KeyValue::default()));
        }
        for k in &keys {
            let kv = self.kv_of(reader, k)?;
            if !compare_kv(c, target, &kv) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn check_txn(
        &self,
        reader: &dyn RevisionReader,
        t: &TxnRequest,
        path: &[bool],
    ) -> Result<usize> {
        let ops = if path[0] { &t.success } else { &t.failure };
        let mut used = 1;
        for op in ops {
            match &op.request {
                Some(request_op::Request::RequestRange(r)) if r.revision > 0 => {
                    self.check_revision(r.revision, self.rev)?;
                }
                Some(request_op::Request::RequestPut(p)) => self.check_put(reader, p)?,
                Some(request_op::Request::RequestTxn(nested)) => {
                    used += self.check_txn(reader, nested, &path[used..])?
                }
                _ => {}
            }
        }
        Ok(used)
    }

    fn txn(
        &mut self,
        reader: &dyn RevisionReader,
        tx: &mut Tx,
        t: &TxnRequest,
        path: &[bool],
    ) -> Result<TxnResponse> {
        walk_txn(t, path, &mut |op| {
            Ok(match op {
                request_op::Request::RequestRange(r) => {
                    response_op::Response::ResponseRange(self.range_at(reader, r, tx.read_rev())?)
                }
                request_op::Request::RequestPut(p) => {
                    response_op::Response::ResponsePut(self.put(reader, tx, p)?)
                }
                request_op::Request::RequestDeleteRange(d) => {
                    response_op::Response::ResponseDeleteRange(self.delete(reader, tx, d)?)
                }
                // walk_txn runs nested txns itself.
                request_op::Request::RequestTxn(_) => {
                    return Err(Error::Internal("a nested txn given as an operation".into()))
                }
            })
        })
    }

    /// A read-only txn (every operation a range, in nested txns too: see
    /// [`is_read_only`]), walked and read in one go: the same answer [`Self::apply`] gives it
    /// (tests; members walk it in steps, `KvState::read_only_txn`).
    #[cfg(test)]
    pub fn read_only_txn(
        &self,
        reader: &dyn RevisionReader,
        t: &TxnRequest,
    ) -> Result<TxnResponse> {
        let mut steps = self.start_read_only_txn(reader, t)?;
        match self.step_read_only_txn(&mut steps, usize::MAX)? {
            TxnStep::Planned(plan) => plan.read(reader, t),
            _ => Err(Error::Internal(
                "mvcc: an unbounded txn walk stopped".into(),
            )),
        }
    }

    /// Starts resolving a read-only txn at the current revision: its compares are
    /// evaluated (reading their keys from `reader`) and its ranges on the taken branches
    /// lined up; [`Self::step_read_only_txn`] walks them, [`TxnPlan::read`] then reads the
    /// records from a storage view taken under the lock of the last step.
    pub fn start_read_only_txn(
        &self,
        reader: &dyn RevisionReader,
        t: &TxnRequest,
    ) -> Result<TxnSteps> {
        if !is_read_only(t) {
            return Err(Error::Internal("a txn that writes is not read-only".into()));
        }
        let path = self.compare_path(reader, t)?;
        self.check_txn(reader, t, &path)?;
        let mut ranges = Vec::new();
        walk_txn(t, &path, &mut |op| match op {
            request_op::Request::RequestRange(r) => {
                ranges.push(self.start_range_at(r, self.rev)?);
                Ok(response_op::Response::ResponseRange(
                    RangeResponse::default(),
                ))
            }
            _ => Err(Error::Internal("a write in a read-only txn".into())),
        })?;
        ranges.reverse();
        Ok(TxnSteps {
            path,
            ranges,
            plans: Vec::new(),
            rev: self.rev,
        })
    }

    /// Walks a read-only txn's ranges on over at most `budget` keys of the index.
    pub fn step_read_only_txn(&self, steps: &mut TxnSteps, budget: usize) -> Result<TxnStep> {
        // Its compares were evaluated at its revision: a compaction past it means starting
        // over (a range naming an older revision then fails as compacted, as it would have
        // had the txn come later).
        if steps.rev < self.compacted {
            return Ok(TxnStep::Overtaken);
        }
        while let Some(range) = steps.ranges.last_mut() {
            match self.step_range(range, budget)? {
                Some(plan) => {
                    steps.plans.push(plan);
                    steps.ranges.pop();
                }
                None => return Ok(TxnStep::More),
            }
        }
        Ok(TxnStep::Planned(TxnPlan {
            path: std::mem::take(&mut steps.path),
            plans: std::mem::take(&mut steps.plans),
            rev: steps.rev,
        }))
    }

    fn compact(&mut self, c: &CompactionRequest) -> Result<CompactionResponse> {
        if c.revision <= self.compacted {
            return Err(Error::Compacted);
        }
        if c.revision > self.rev {
            return Err(Error::FutureRev);
        }
        let removed = self.index.compact(c.revision);
        for r in &removed {
            self.pending.remove(r);
        }
        self.ws.removed.extend(removed);
        self.compacted = c.revision;
        Ok(CompactionResponse {
            header: header(self.rev),
        })
    }

    fn lease_grant(&mut self, g: &LeaseGrantRequest) -> Result<LeaseGrantResponse> {
        // Checked here, where every member applies it, whoever proposed it (etcd's lessor
        // checks at apply too): a raw peer proposal skips the API's checks.
        if g.id == 0 {
            return Err(Error::LeaseNotFound);
        }
        if g.ttl > crate::lease::MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if self.leases.contains_key(&g.id) {
            return Err(Error::LeaseExist);
        }
        let ttl = g.ttl.max(self.min_lease_ttl);
        self.leases.insert(
            g.id,
            LeaseRecord {
                ttl,
                keys: BTreeSet::new(),
            },
        );
        self.ws.leases.push((g.id, Some(ttl)));
        self.ws.granted.push((g.id, ttl));
        Ok(LeaseGrantResponse {
            header: header(self.rev),
            id: g.id,
            ttl,
            error: String::new(),
        })
    }

    fn lease_revoke(
        &mut self,
        reader: &dyn RevisionReader,
        r: &LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse> {
        let Some(lease) = self.leases.remove(&r.id) else {
            return Err(Error::LeaseNotFound);
        };
        // One revision for all keys, in key order (the same on every member).
        let mut tx = Tx::at(self.rev);
        for key in &lease.keys {
            let d = DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            };
            self.delete(reader, &mut tx, &d)?;
        }
        self.finish(tx);
        self.ws.leases.push((r.id, None));
        self.ws.revoked.push(r.id);
        Ok(LeaseRevokeResponse {
            header: header(self.rev),
        })
    }

    fn alarm(&mut self, a: &AlarmRequest) -> Result<AlarmResponse> {
        let action = AlarmAction::try_from(a.action).unwrap_or(AlarmAction::Get);
        let mut alarms = Vec::new();
        match action {
            AlarmAction::Get => {
                alarms = self
                    .alarms
                    .iter()
                    .filter(|m| a.alarm == AlarmType::None as i32 || m.alarm == a.alarm)
                    .cloned()
                    .collect();
            }
            AlarmAction::Activate => {
                let m = AlarmMember {
                    member_id: a.member_id,
                    alarm: a.alarm,
                };
                // A bounded list: every alarm is stored with the state's position, rewritten
                // on each write (etcd keeps any number; the API takes only the kinds etcd
                // acts on, see `api::maintenance`).
                if a.alarm != AlarmType::None as i32
                    && !self.alarms.contains(&m)
                    && self.alarms.len() >= MAX_ALARMS
                {
                    return Err(Error::InvalidArgument("too many alarms".into()));
                }
                if a.alarm != AlarmType::None as i32 && !self.alarms.contains(&m) {
                    self.alarms.push(m);
                }
                alarms.push(m);
            }
            AlarmAction::Deactivate => {
                let m = AlarmMember {
                    member_id: a.member_id,
                    alarm: a.alarm,
                };
                if let Some(i) = self.alarms.iter().position(|x| *x == m) {
                    self.alarms.remove(i);
                    alarms.push(m);
                }
            }
        }
        Ok(AlarmResponse {
            header: header(self.rev),
            alarms,
        })
    }
}

/// Most alarms kept at once (two kinds per member: far more than any cluster has members).
pub const MAX_ALARMS: usize = 1024;

/// Runs the branch of `t` that `path` (from [`MvccStore::compare_path`])
/// chose, nested txns included: `op` answers each range, put and delete in
/// order; nested txns answer with an empty header, as in etcd.
fn walk_txn(
    t: &TxnRequest,
    path: &[bool],
    op: &mut dyn FnMut(&request_op::Request) -> Result<response_op::Response>,
) -> Result<TxnResponse> {
    let succeeded = path[0];
    let ops: &[RequestOp] = if succeeded { &t.success } else { &t.failure };
    let mut responses = Vec::with_capacity(ops.len());
    let mut used = 1;
    for o in ops {
        let response = match &o.request {
            Some(request_op::Request::RequestTxn(nested)) => {
                let sub_path = &path[used..];
                used += count_path(nested, sub_path);
                let mut r = walk_txn(nested, sub_path, op)?;
                r.header = Some(ResponseHeader::default());
                Some(response_op::Response::ResponseTxn(r))
            }
            Some(request) => Some(op(request)?),
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded,
        responses,
    })
}

/// How many path entries a txn and its nested txns on the taken branch use.
fn count_path(t: &TxnRequest, path: &[bool]) -> usize {
    let ops = if path[0] { &t.success } else { &t.failure };
    let mut used = 1;
    for op in ops {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            used += count_path(nested, &path[used..]);
        }
    }
    used
}

/// Builds a store's index from history records fed one at a time, in revision order
/// ([`MvccStore::restore`]; a snapshot load feeds it as it reads).
pub struct Restorer {
    s: MvccStore,
    lease_of: HashMap<Vec<u8>, i64>,
    max_rev: i64,
}

impl Restorer {
    pub fn new(min_lease_ttl: i64) -> Self {
        Self {
            s: MvccStore::new(min_lease_ttl),
            lease_of: HashMap::new(),
            max_rev: 1,
        }
    }

    /// The next record.
    pub fn add(&mut self, r: Revision, rec: Record) {
        self.max_rev = self.max_rev.max(r.main);
        let s = &mut self.s;
        if rec.tombstone {
            if !s.index.tombstone(&rec.kv.key, r) {
                // Its generation's puts were deleted by a compaction that stopped
                // before the tombstone (see `compact_leftovers`).
                s.orphans.push(r);
            }
            self.lease_of.remove(&rec.kv.key);
        } else {
            s.index
                .put_restored(&rec.kv.key, r, rec.kv.create_revision, rec.kv.version);
            if rec.kv.lease != 0 {
                self.lease_of.insert(rec.kv.key, rec.kv.lease);
            } else {
                self.lease_of.remove(&rec.kv.key);
            }
        }
    }

    /// The store, with its leases, position and alarms.
    pub fn finish(
        self,
        leases: impl Iterator<Item = (i64, i64)>,
        rev: i64,
        compacted: i64,
        alarms: Vec<AlarmMember>,
    ) -> MvccStore {
        let mut s = self.s;
        s.leases = leases
            .map(|(id, ttl)| {
                (
                    id,
                    LeaseRecord {
                        ttl,
                        keys: BTreeSet::new(),
                    },
                )
            })
            .collect();
        for (key, id) in self.lease_of {
            if let Some(l) = s.leases.get_mut(&id) {
                l.keys.insert(key);
            }
        }
        s.rev = rev.max(self.max_rev);
        s.compacted = compacted;
        s.alarms = alarms;
        s
    }
}

/// A Range being resolved against the index ([`MvccStore::start_range`]).
pub struct RangeSteps {
    walk: RangeWalk,
    /// The store's revision the answer's header carries.
    cur: i64,
    /// The request named its revision.
    pinned: bool,
    count_only: bool,
}

/// A Range resolved against the index ([`MvccStore::step_range`]).
pub enum RangePlan {
    /// Answered already (`count_only`).
    Counted(RangeResponse),
    /// The keys to read, in key order, how many matched, and the store's revision.
    Read {
        keys: Vec<KeyAt>,
        total: usize,
        cur: i64,
    },
}

impl RangePlan {
    /// The answer, reading each key's record from `reader`: a view of storage taken under
    /// the same lock as the plan (nothing applied since then is in it).
    pub fn read(self, reader: &dyn RevisionReader, r: &RangeRequest) -> Result<RangeResponse> {
        let (keys, total, cur) = match self {
            RangePlan::Counted(resp) => return Ok(resp),
            RangePlan::Read { keys, total, cur } => (keys, total, cur),
        };
        // Unless sorted by value, a keys-only answer drops each value as it is read: a
        // large one never holds them all.
        let drop_values = r.keys_only && r.sort_target != SortTarget::Value as i32;
        let mut kvs = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(READ_BATCH) {
            let revs: Vec<Revision> = chunk.iter().map(|k| k.modified).collect();
            for (k, rec) in chunk.iter().zip(reader.read_many(&revs)?) {
                let mut kv = kv_at(rec.ok_or_else(|| missing(k.modified))?, k);
                if drop_values {
                    kv.value = Vec::new();
                }
                kvs.push(kv);
            }
        }
        finish_range(r, kvs, total, cur)
    }
}

/// A read-only txn being resolved against the index ([`MvccStore::start_read_only_txn`]).
pub struct TxnSteps {
    path: Vec<bool>,
    /// The ranges still to walk, the next one last.
    ranges: Vec<RangeSteps>,
    /// The ranges walked, in the order they answer.
    plans: Vec<RangePlan>,
    rev: i64,
}

/// Where a read-only txn's walk is ([`MvccStore::step_read_only_txn`]).
pub enum TxnStep {
    /// Walked: what to read.
    Planned(TxnPlan),
    /// More to walk.
    More,
    /// A compaction passed the txn's revision: start it over.
    Overtaken,
}

/// A read-only txn resolved against the index ([`MvccStore::step_read_only_txn`]).
pub struct TxnPlan {
    path: Vec<bool>,
    /// One per range on the taken branches, in the order they answer.
    plans: Vec<RangePlan>,
    rev: i64,
}

impl TxnPlan {
    /// The answer to `t` (the txn planned), reading the records from `reader`.
    pub fn read(self, reader: &dyn RevisionReader, t: &TxnRequest) -> Result<TxnResponse> {
        let mut plans = self.plans.into_iter();
        let mut resp = walk_txn(t, &self.path, &mut |op| match (op, plans.next()) {
            (request_op::Request::RequestRange(r), Some(plan)) => {
                Ok(response_op::Response::ResponseRange(plan.read(reader, r)?))
            }
            _ => Err(Error::Internal(
                "a read-only txn read against another's plan".into(),
            )),
        })?;
        resp.header = header(self.rev);
        Ok(resp)
    }
}

/// Records a range reads from storage at a time.
const READ_BATCH: usize = 1024;

/// The KeyValue index entry `k` answers with, from its record.
fn kv_at(rec: Record, k: &KeyAt) -> KeyValue {
    let mut kv = rec.kv;
    kv.version = k.version;
    kv.create_revision = k.created.main;
    kv
}

fn missing(rev: Revision) -> Error {
    Error::Internal(format!(
        "mvcc: revision {}/{} missing from storage",
        rev.main, rev.sub
    ))
}

/// Whether a Range filters or sorts what the index yields (its limit then applies after).
fn range_filtered(r: &RangeRequest) -> bool {
    r.sort_order != SortOrder::None as i32
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

/// A Range's answer from the values read for the keys the index yielded: filtered,
/// sorted, limited.
fn finish_range(
    r: &RangeRequest,
    mut kvs: Vec<KeyValue>,
    total: usize,
    cur: i64,
) -> Result<RangeResponse> {
    let order = SortOrder::try_from(r.sort_order).map_err(|_| Error::InvalidSortOption)?;
    let target = SortTarget::try_from(r.sort_target).map_err(|_| Error::InvalidSortOption)?;
    if r.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= r.max_mod_revision);
    }
    if r.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= r.min_mod_revision);
    }
    if r.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= r.max_create_revision);
    }
    if r.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= r.min_create_revision);
    }
    // The index yields key order; other targets sort ascending by default.
    let order = if target != SortTarget::Key && order == SortOrder::None {
        SortOrder::Ascend
    } else {
        order
    };
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: header(cur),
        kvs,
        more,
        count: total as i64,
    })
}

/// Whether `pred` holds for every operation of both branches of `t` and of
/// its nested txns (which are walked, not passed to `pred`).
pub fn all_txn_ops(t: &TxnRequest, pred: &impl Fn(&request_op::Request) -> bool) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(request_op::Request::RequestTxn(n)) => all_txn_ops(n, pred),
            Some(r) => pred(r),
            None => true,
        })
}

/// Whether a txn writes nothing on either branch (such txns need no proposal).
pub fn is_read_only(t: &TxnRequest) -> bool {
    all_txn_ops(t, &|r| matches!(r, request_op::Request::RequestRange(_)))
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match target {
        CompareTarget::Value => {
            let v: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(v)
        }
        CompareTarget::Create => kv.create_revision.cmp(&int_target(c, |t| match t {
            TargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&int_target(c, |t| match t {
            TargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Version => kv.version.cmp(&int_target(c, |t| match t {
            TargetUnion::Version(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&int_target(c, |t| match t {
            TargetUnion::Lease(v) => Some(*v),
            _ => None,
        })),
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn int_target(c: &Compare, f: impl Fn(&TargetUnion) -> Option<i64>) -> i64 {
    c.target_union.as_ref().and_then(f).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::MemoryHistory;

    struct T {
        s: MvccStore,
        h: MemoryHistory,
    }

    impl T {
        fn new() -> Self {
            T {
                s: MvccStore::new(2),
                h: MemoryHistory::default(),
            }
        }
        fn apply(&mut self, r: Request) -> Result<Applied> {
            let out = self.s.apply(
                &self.h,
                &InternalRequest {
                    request: Some(r),
                    ..Default::default()
                },
            );
            let ws = self.s.take_writes();
            self.h.persist(&ws);
            out
        }
        fn put(&mut self, k: &str, v: &str) -> PutResponse {
            match self
                .apply(Request::Put(PutRequest {
                    key: k.into(),
                    value: v.into(),
                    ..Default::default()
                }))
                .unwrap()
            {
                Applied::Put(p) => p,
                other => panic!("{other:?}"),
            }
        }
        fn get(&self, k: &str) -> KeyValue {
            let r = RangeRequest {
                key: k.into(),
                ..Default::default()
            };
            self.range(r).unwrap().kvs.remove(0)
        }
        fn range(&self, r: RangeRequest) -> Result<RangeResponse> {
            self.s.range(&self.h, &r)
        }
    }

    fn all() -> RangeRequest {
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        }
    }

    /// A rebuild from storage that a compaction thinned out (its records deleted in the
    /// background, partly or whole) answers as the store did: creation revisions and
    /// versions of keys whose first records are gone, and the same kept revisions; a
    /// tombstone left without its generation's puts is handed back for deletion.
    #[test]
    fn a_rebuild_after_compaction_answers_as_before() {
        let mut t = T::new();
        t.put("a", "1"); // 2
        t.put("a", "2"); // 3
        t.put("b", "1"); // 4
        t.apply(Request::DeleteRange(DeleteRangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        }))
        .unwrap(); // 5
        t.put("a", "3"); // 6
                         // Applied to the index; the records stay in storage for now.
        t.s.apply(
            &t.h,
            &InternalRequest {
                request: Some(Request::Compaction(CompactionRequest {
                    revision: 5,
                    physical: false,
                })),
                ..Default::default()
            },
        )
        .unwrap();
        let removed = t.s.take_writes().removed;
        assert_eq!(
            removed,
            vec![
                Revision::new(2, 0),
                Revision::new(4, 0),
                Revision::new(5, 0)
            ]
        );
        let before = t.get("a");
        assert_eq!((before.create_revision, before.version), (2, 3));
        let kept = t.s.kept_at_compacted();
        // Storage with b's put deleted and its tombstone not yet (a stop in between).
        let left: Vec<(Revision, Record)> =
            t.h.records
                .iter()
                .filter(|(r, _)| **r != Revision::new(2, 0) && **r != Revision::new(4, 0))
                .map(|(r, rec)| (*r, rec.clone()))
                .collect();
        let h = MemoryHistory {
            records: left.iter().cloned().collect(),
        };
        let mut s = MvccStore::restore(2, left.into_iter(), std::iter::empty(), 6, 5, vec![]);
        let leftovers = s.compact_leftovers();
        assert_eq!(
            leftovers,
            vec![Revision::new(5, 0)],
            "the orphaned tombstone"
        );
        let kv = s.get(&h, b"a", 6).unwrap().unwrap();
        assert_eq!((kv.create_revision, kv.version), (2, 3));
        assert_eq!(s.kept_at_compacted(), kept);
        // And the next put goes on from there.
        let mut t2 = T { s, h };
        t2.put("a", "4");
        let kv = t2.get("a");
        assert_eq!((kv.create_revision, kv.version), (2, 4));
    }

    #[test]
    fn first_write_is_revision_two_and_noop_delete_keeps_revision() {
        let mut t = T::new();
        assert_eq!(t.s.revision(), 1);
        assert_eq!(t.put("a", "1").header.unwrap().revision, 2);
        let del = t
            .apply(Request::DeleteRange(DeleteRangeRequest {
                key: "zz".into(),
                ..Default::default()
            }))
            .unwrap();
        let Applied::DeleteRange(d) = del else {
            panic!()
        };
        assert_eq!((d.deleted, d.header.unwrap().revision), (0, 2));
        assert_eq!(t.s.revision(), 2);
    }

    #[test]
    fn same_value_bumps_version_and_delete_resets() {
        let mut t = T::new();
        t.put("a", "1");
        t.put("a", "1");
        let kv = t.get("a");
        assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 2, 3));
        t.apply(Request::DeleteRange(DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        }))
        .unwrap();
        t.put("a", "2");
        let kv = t.get("a");
        assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (1, 5, 5));
    }

    #[test]
    fn range_limit_count_more_sort_and_history() {
        let mut t = T::new();
        for (k, v) in [("a", "3"), ("b", "1"), ("c", "2")] {
            t.put(k, v);
        }
        let r = t.range(RangeRequest { limit: 2, ..all() }).unwrap();
        assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));
        let r = t.range(RangeRequest { limit: 3, ..all() }).unwrap();
        assert!(!r.more);
        let r = t
            .range(RangeRequest {
                sort_target: SortTarget::Value as i32,
                limit: 1,
                ..all()
            })
            .unwrap();
        assert_eq!(
            r.kvs[0].key, b"b",
            "non-key target with order NONE sorts ascending"
        );
        let r = t
            .range(RangeRequest {
                sort_order: SortOrder::Descend as i32,
                ..all()
            })
            .unwrap();
        assert_eq!(r.kvs[0].key, b"c");
        let r = t
            .range(RangeRequest {
                revision: 3,
                ..all()
            })
            .unwrap();
        assert_eq!((r.kvs.len(), r.header.unwrap().revision), (2, 4));
        assert_eq!(
            t.range(RangeRequest {
                revision: 9,
                ..all()
            })
            .unwrap_err(),
            Error::FutureRev
        );
        let r = t
            .range(RangeRequest {
                min_mod_revision: 3,
                ..all()
            })
            .unwrap();
        assert_eq!(r.kvs.len(), 2);
        let r = t
            .range(RangeRequest {
                count_only: true,
                ..all()
            })
            .unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 3));
    }

    #[test]
    fn compaction_errors_and_reads() {
        let mut t = T::new();
        t.put("a", "1");
        t.put("a", "2");
        t.put("a", "3");
        let c = |rev| {
            Request::Compaction(CompactionRequest {
                revision: rev,
                physical: false,
            })
        };
        assert_eq!(t.apply(c(9)).unwrap_err(), Error::FutureRev);
        t.apply(c(3)).unwrap();
        assert_eq!(t.apply(c(3)).unwrap_err(), Error::Compacted);
        assert_eq!(
            t.range(RangeRequest {
                revision: 2,
                ..all()
            })
            .unwrap_err(),
            Error::Compacted
        );
        assert_eq!(
            t.range(RangeRequest {
                revision: 3,
                ..all()
            })
            .unwrap()
            .kvs[0]
                .value,
            b"2"
        );
        assert!(
            !t.h.records.contains_key(&Revision::new(2, 0)),
            "compacted revision removed from storage"
        );
    }

    #[test]
    fn txn_sees_own_writes_shares_revision_and_compares_missing_keys() {
        let mut t = T::new();
        t.put("x", "0");
        let put = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        };
        let get = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                key: "missing".into(),
                target: CompareTarget::Mod as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::ModRevision(0)),
                range_end: vec![],
            }],
            success: vec![put("a"), get("a"), put("b")],
            failure: vec![],
        };
        let Applied::Txn(r) = t.apply(Request::Txn(txn)).unwrap() else {
            panic!()
        };
        assert!(r.succeeded);
        assert_eq!(r.header.unwrap().revision, 3);
        let Some(response_op::Response::ResponseRange(rr)) = &r.responses[1].response else {
            panic!()
        };
        assert_eq!(rr.kvs[0].mod_revision, 3);
        let value_cmp = Compare {
            key: "missing".into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::NotEqual as i32,
            target_union: Some(TargetUnion::Value(b"q".to_vec())),
            range_end: vec![],
        };
        let Applied::Txn(r) = t
            .apply(Request::Txn(TxnRequest {
                compare: vec![value_cmp],
                ..Default::default()
            }))
            .unwrap()
        else {
            panic!()
        };
        assert!(!r.succeeded, "a value compare on a missing key is false");
        assert_eq!(
            r.header.unwrap().revision,
            3,
            "a read-only txn keeps the revision"
        );
    }

    #[test]
    fn read_only_txns_answer_as_applied_ones() {
        let mut t = T::new();
        t.put("a", "1");
        t.put("b", "2");
        let range = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let nested = TxnRequest {
            compare: vec![],
            success: vec![range("b")],
            failure: vec![],
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                key: b"a".to_vec(),
                target: CompareTarget::Value as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::Value(b"1".to_vec())),
                ..Default::default()
            }],
            success: vec![
                range("a"),
                RequestOp {
                    request: Some(request_op::Request::RequestTxn(nested)),
                },
            ],
            failure: vec![range("b")],
        };
        let shared = t.s.read_only_txn(&t.h, &txn).unwrap();
        let Applied::Txn(applied) = t.apply(Request::Txn(txn.clone())).unwrap() else {
            panic!("not a txn answer");
        };
        assert_eq!(shared, applied);
        assert!(shared.succeeded && shared.responses.len() == 2);
        let mut writes = txn;
        writes.failure.push(RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest::default())),
        });
        assert!(t.s.read_only_txn(&t.h, &writes).is_err());
    }

    /// A range walked in steps with applies between them answers as of its start; one
    /// that a compaction overtook starts over at the current revision, or fails as
    /// compacted when it named its revision.
    #[test]
    fn ranges_in_steps_hold_their_revision_across_applies_and_compactions() {
        let mut t = T::new();
        for i in 0..10 {
            t.put(&format!("k{i}"), "v"); // 2..=11
        }
        let want = t.range(all()).unwrap();
        let compact = |t: &mut T, revision| {
            t.apply(Request::Compaction(CompactionRequest {
                revision,
                physical: false,
            }))
            .unwrap();
        };
        let mut steps = t.s.start_range(&all()).unwrap();
        assert!(t.s.step_range(&mut steps, 3).unwrap().is_none());
        t.put("k0", "w"); // 12
        t.put("k5", "w"); // 13
        let plan = loop {
            if let Some(plan) = t.s.step_range(&mut steps, 3).unwrap() {
                break plan;
            }
        };
        assert_eq!(plan.read(&t.h, &all()).unwrap(), want);

        let mut steps = t.s.start_range(&all()).unwrap();
        assert!(t.s.step_range(&mut steps, 3).unwrap().is_none());
        t.put("k9", "w"); // 14
        compact(&mut t, 14);
        let now = t.range(all()).unwrap();
        let plan = t.s.step_range(&mut steps, 100).unwrap().unwrap();
        assert_eq!(plan.read(&t.h, &all()).unwrap(), now);
        assert_eq!(now.header.unwrap().revision, 14);

        let at_14 = RangeRequest {
            revision: 14,
            ..all()
        };
        let mut pinned = t.s.start_range(&at_14).unwrap();
        assert!(t.s.step_range(&mut pinned, 2).unwrap().is_none());
        t.put("k1", "w"); // 15
        compact(&mut t, 15);
        assert!(matches!(
            t.s.step_range(&mut pinned, 100),
            Err(Error::Compacted)
        ));
        let count = RangeRequest {
            count_only: true,
            ..all()
        };
        let mut counted = t.s.start_range(&count).unwrap();
        let plan = loop {
            if let Some(plan) = t.s.step_range(&mut counted, 4).unwrap() {
                break plan;
            }
        };
        assert_eq!(plan.read(&t.h, &count).unwrap().count, 10);
    }

    /// A read-only txn walked in steps answers as in one go, whatever is applied between
    /// steps; a compaction past its revision asks for it to start over.
    #[test]
    fn read_only_txns_in_steps_answer_as_in_one_go() {
        let mut t = T::new();
        for i in 0..10 {
            t.put(&format!("k{i}"), "v"); // 2..=11
        }
        let txn = TxnRequest {
            compare: vec![Compare {
                key: b"k1".to_vec(),
                target: CompareTarget::Version as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::Version(1)),
                ..Default::default()
            }],
            success: vec![
                RequestOp {
                    request: Some(request_op::Request::RequestRange(all())),
                },
                RequestOp {
                    request: Some(request_op::Request::RequestRange(RangeRequest {
                        key: b"k5".to_vec(),
                        range_end: b"k8".to_vec(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let want = t.s.read_only_txn(&t.h, &txn).unwrap();
        assert!(want.succeeded);
        let mut steps = t.s.start_read_only_txn(&t.h, &txn).unwrap();
        let mut n = 0;
        let plan = loop {
            match t.s.step_read_only_txn(&mut steps, 3).unwrap() {
                TxnStep::Planned(plan) => break plan,
                TxnStep::More => {
                    n += 1;
                    t.put("k1", "w");
                    t.put("k6", "w");
                }
                TxnStep::Overtaken => panic!("no compaction ran"),
            }
        };
        assert!(n >= 3, "{n} steps");
        assert_eq!(plan.read(&t.h, &txn).unwrap(), want);

        // k1's version moved on: without the compare, the same ranges.
        let txn = TxnRequest {
            compare: vec![],
            ..txn
        };
        let mut steps = t.s.start_read_only_txn(&t.h, &txn).unwrap();
        assert!(matches!(
            t.s.step_read_only_txn(&mut steps, 3).unwrap(),
            TxnStep::More
        ));
        let rev = t.put("k9", "w").header.unwrap().revision;
        t.apply(Request::Compaction(CompactionRequest {
            revision: rev,
            physical: false,
        }))
        .unwrap();
        assert!(matches!(
            t.s.step_read_only_txn(&mut steps, 3).unwrap(),
            TxnStep::Overtaken
        ));
    }

    #[test]
    fn alarms_are_bounded() {
        let mut t = T::new();
        let activate = |alarm: AlarmType, member_id| {
            Request::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id,
                alarm: alarm as i32,
            })
        };
        t.apply(activate(AlarmType::Nospace, 1)).unwrap();
        // NONE is no alarm: nothing is kept (etcd's no-op).
        t.apply(activate(AlarmType::None, 1)).unwrap();
        assert_eq!(t.s.alarms().len(), 1);
        for id in 2..=MAX_ALARMS as u64 {
            t.apply(activate(AlarmType::Corrupt, id)).unwrap();
        }
        let over = t.apply(activate(AlarmType::Nospace, 5000));
        assert!(matches!(over, Err(Error::InvalidArgument(_))), "{over:?}");
        // One already raised may be raised again at the bound.
        t.apply(activate(AlarmType::Nospace, 1)).unwrap();
        assert_eq!(t.s.alarms().len(), MAX_ALARMS);
    }

    #[test]
    fn lease_grants_out_of_range_are_refused_at_apply() {
        let mut t = T::new();
        let huge = t.apply(Request::LeaseGrant(LeaseGrantRequest {
            ttl: i64::MAX,
            id: 5,
        }));
        assert!(matches!(huge, Err(Error::LeaseTtlTooLarge)), "{huge:?}");
        assert_eq!(
            Error::LeaseTtlTooLarge.to_string(),
            "etcdserver: too large lease TTL"
        );
        let no_id = t.apply(Request::LeaseGrant(LeaseGrantRequest { ttl: 5, id: 0 }));
        assert!(matches!(no_id, Err(Error::LeaseNotFound)), "{no_id:?}");
        assert!(t.s.lease(5).is_none());
        // etcd's largest TTL itself is granted.
        t.apply(Request::LeaseGrant(LeaseGrantRequest {
            ttl: crate::lease::MAX_LEASE_TTL,
            id: 6,
        }))
        .unwrap();
    }

    #[test]
    fn lease_revoke_deletes_keys_in_one_revision() {
        let mut t = T::new();
        t.apply(Request::LeaseGrant(LeaseGrantRequest { ttl: 1, id: 7 }))
            .unwrap();
        assert_eq!(t.s.lease(7).unwrap().ttl, 2, "TTL raised to the minimum");
        for k in ["a", "b"] {
            t.apply(Request::Put(PutRequest {
                key: k.into(),
                lease: 7,
                ..Default::default()
            }))
            .unwrap();
        }
        let err = t
            .apply(Request::Put(PutRequest {
                key: "c".into(),
                lease: 8,
                ..Default::default()
            }))
            .unwrap_err();
        assert_eq!(err, Error::LeaseNotFound);
        t.apply(Request::LeaseRevoke(LeaseRevokeRequest { id: 7 }))
            .unwrap();
        assert_eq!(t.s.revision(), 4);
        assert_eq!(t.range(all()).unwrap().count, 0);
    }
}
