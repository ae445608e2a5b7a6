//! The one door from the API into the member's key space: who the caller is
//! (token or certificate), ranges, txns (read-only ones evaluated here,
//! others proposed), typed proposals, and the lookups the Lease and
//! Maintenance services answer from. Reads are checked against the caller's
//! permissions here; writes where they are applied. Handlers validate, call
//! one of these and respond; nothing in `api/` locks the store itself.

use crate::auth::AuthInfo;
use crate::error::{Error, Result};
use crate::mvcc::{Applied, LeaseRecord};
use crate::proto::etcdserverpb::{
    request_op, AlarmMember, AlarmResponse, CompactionResponse, DeleteRangeResponse,
    LeaseGrantResponse, LeaseRevokeResponse, PutResponse, RangeRequest, RangeResponse,
    ResponseHeader, TxnRequest, TxnResponse,
};
use crate::proto::raftpb::internal_request::Request;

use super::EtcdServer;

/// Ranges bounded to this many keys are evaluated inline.
const INLINE_RANGE_LIMIT: i64 = 1000;

/// A response the state machine gives, with the header the API completes.
pub trait AppliedResponse: Sized {
    fn from_applied(a: Applied) -> Option<Self>;
    fn header_mut(&mut self) -> &mut Option<ResponseHeader>;
}

macro_rules! applied_response {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl AppliedResponse for $ty {
            fn from_applied(a: Applied) -> Option<Self> {
                match a {
                    Applied::$variant(r) => Some(r),
                    _ => None,
                }
            }
            fn header_mut(&mut self) -> &mut Option<ResponseHeader> {
                &mut self.header
            }
        }
    )*};
}

applied_response! {
    Put => PutResponse,
    DeleteRange => DeleteRangeResponse,
    Txn => TxnResponse,
    Compaction => CompactionResponse,
    LeaseGrant => LeaseGrantResponse,
    LeaseRevoke => LeaseRevokeResponse,
    Alarm => AlarmResponse,
}

fn typed<T: AppliedResponse>(a: Applied) -> Result<T> {
    let kind = format!("{a:?}");
    T::from_applied(a).ok_or_else(|| Error::Internal(format!("unexpected apply result {kind}")))
}

/// Runs a read where it arrives when `small`, otherwise on the blocking pool: client
/// threads are single-threaded runtimes, and a large read must stall nobody else.
async fn evaluate<T: Send + 'static>(
    small: bool,
    eval: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if small {
        eval()
    } else {
        tokio::task::spawn_blocking(eval)
            .await
            .map_err(Error::internal)?
    }
}

/// Whether a range reads few enough keys to be evaluated where it arrives.
fn is_small(r: &RangeRequest) -> bool {
    r.range_end.is_empty() || (!r.count_only && r.limit > 0 && r.limit <= INLINE_RANGE_LIMIT)
}

fn txn_is_serializable(t: &TxnRequest) -> bool {
    crate::mvcc::all_txn_ops(t, &|r| match r {
        request_op::Request::RequestRange(r) => r.serializable,
        _ => true,
    })
}

impl EtcdServer {
    /// Who makes a request, as etcd's AuthInfoFromCtx decides: nobody while
    /// auth is disabled; the user of `token` if one is sent (an unknown or
    /// expired one is refused, never passed over); else, with
    /// `--client-cert-auth`, the common name of the verified client
    /// certificate; else nobody.
    pub async fn caller(
        &self,
        token: Option<&str>,
        common_name: Option<&str>,
    ) -> Result<Option<AuthInfo>> {
        if !self.state.auth.enabled() {
            return Ok(None);
        }
        if let Some(token) = token {
            // (The auth state before the tokens, as where entries are applied.)
            let current = self.state.auth.store.read().revision();
            if let Some(info) = self.state.auth.tokens().info(token, current) {
                return Ok(Some(info));
            }
            // A simple token issued by an entry this member has not applied
            // yet: wait a little for it (a forged index costs its sender at
            // most this wait, never the request timeout).
            let index = self.state.auth.tokens().index_of(token);
            let applied = self.state.applied().0.map(|l| l.index).unwrap_or(0);
            if index.is_some_and(|i| i > applied) {
                let wait = self
                    .cfg
                    .election_timeout
                    .min(std::time::Duration::from_secs(1));
                let _ = self.wait_applied(index.unwrap_or(0), wait).await;
            }
            let current = self.state.auth.store.read().revision();
            let info = self.state.auth.tokens().info(token, current);
            return info.map(Some).ok_or(Error::InvalidAuthToken);
        }
        let cert_auth = self
            .cfg
            .client_tls
            .as_ref()
            .is_some_and(|t| t.client_cert_auth);
        Ok(match common_name {
            Some(cn) if cert_auth => Some(AuthInfo {
                user: cn.to_string(),
                revision: self.state.auth.store.read().revision(),
            }),
            _ => None,
        })
    }

    /// Someone must be named once auth is on (etcd's requireAuthInfo, which
    /// later 3.4 releases ask of Compaction, Alarm, MoveLeader and the Lease
    /// calls; 3.4.23 asked nothing there).
    pub fn check_user(&self, ai: Option<&AuthInfo>) -> Result<()> {
        if ai.is_none() && self.state.auth.enabled() {
            return Err(Error::UserEmpty);
        }
        Ok(())
    }

    /// Lease `id`'s keys may be written (`write`) or read by `ai`: root, or
    /// one permitted on every key attached (etcd's keep-alive and
    /// time-to-live checks). A lease that does not exist passes.
    pub fn check_lease_keys(&self, ai: Option<&AuthInfo>, id: i64, write: bool) -> Result<()> {
        if !self.state.auth.enabled() {
            return Ok(());
        }
        self.check_user(ai)?;
        if self.check_admin(ai).is_ok() {
            return Ok(());
        }
        let keys = self.lease(id).map(|l| l.keys).unwrap_or_default();
        let auth = self.state.auth.store.read();
        keys.iter()
            .try_for_each(|k| auth.check_range(ai, k, &[], write))
    }

    /// etcd's admin check: passes while auth is disabled, then only for
    /// users with the root role.
    pub fn check_admin(&self, ai: Option<&AuthInfo>) -> Result<()> {
        self.state.auth.store.read().check_admin(ai)
    }

    /// Proposes `request` and answers with its response, header completed.
    pub async fn propose_as<T: AppliedResponse>(
        &self,
        request: Request,
        ai: Option<&AuthInfo>,
    ) -> Result<T> {
        let mut resp = typed::<T>(self.propose(request, ai).await?)?;
        self.fill(resp.header_mut());
        Ok(resp)
    }

    /// Proposes an auth change; Authenticate's answer is its token.
    pub async fn propose_auth(&self, request: Request, ai: Option<&AuthInfo>) -> Result<String> {
        match self.propose(request, ai).await? {
            Applied::Auth { token } => Ok(token),
            other => Err(Error::Internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    /// A range: linearizable unless `serializable`. Client threads are
    /// single-threaded runtimes, so a range that may be large is evaluated
    /// on the blocking pool and stalls nobody else.
    pub async fn range(&self, r: RangeRequest, ai: Option<&AuthInfo>) -> Result<RangeResponse> {
        if self.corrupt() {
            return Err(Error::Corrupt);
        }
        if !r.serializable {
            self.read_index().await?;
        }
        self.state
            .auth
            .store
            .read()
            .check_range(ai, &r.key, &r.range_end, false)?;
        let small = is_small(&r);
        let state = self.state.clone();
        let mut resp = evaluate(small, move || state.range(&r)).await?;
        self.fill(&mut resp.header);
        Ok(resp)
    }

    /// A txn: a read-only one changes nothing and is evaluated here (as etcd
    /// does), after a read-index round unless all its ranges are
    /// serializable; any other is proposed.
    pub async fn txn(&self, r: TxnRequest, ai: Option<&AuthInfo>) -> Result<TxnResponse> {
        if !crate::mvcc::is_read_only(&r) {
            return self.propose_as(Request::Txn(r), ai).await;
        }
        if !txn_is_serializable(&r) {
            self.read_index().await?;
        }
        // Read-only: nothing changes, so no proposal (etcd serves these
        // locally too), and the store's shared lock only while the compares
        // are evaluated and the ranges walked, a step at a time; the
        // records are read from a storage view without it. One with a range
        // that may be large goes to the blocking pool, as such a range does.
        let small = crate::mvcc::all_txn_ops(&r, &|op| match op {
            request_op::Request::RequestRange(range) => is_small(range),
            _ => true,
        });
        let state = self.state.clone();
        let ai = ai.cloned();
        let mut resp = evaluate(small, move || {
            let check = |store: &crate::mvcc::MvccStore| {
                let auth = state.auth.store.read();
                let keys = |id: i64| store.lease(id).map(|l| l.keys.clone());
                auth.check_txn(ai.as_ref(), &r, &keys)
            };
            state.read_only_txn(&r, check)
        })
        .await?;
        self.fill(&mut resp.header);
        Ok(resp)
    }

    /// Lease `id` as applied here.
    pub fn lease(&self, id: i64) -> Option<LeaseRecord> {
        self.state.store.read().lease(id).cloned()
    }

    /// Every lease's ID, with the revision they are current at.
    pub fn lease_ids(&self) -> (Vec<i64>, i64) {
        let store = self.state.store.read();
        (store.leases().map(|(id, _)| id).collect(), store.revision())
    }

    /// The alarms raised.
    pub fn alarms(&self) -> Vec<AlarmMember> {
        self.state.store.read().alarms().to_vec()
    }
}
