//! etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::unexpected;
use crate::error::Error;
use crate::mvcc::{validate, Applied};
use crate::proto::etcdserverpb::{
    kv_server::Kv, request_op, CompactionRequest, CompactionResponse, DeleteRangeRequest,
    DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest,
    TxnResponse,
};
use crate::proto::raftpb::{internal_request::Request as Internal, InternalRequest};
use crate::server::EtcdServer;

/// Ranges bounded to this many keys are evaluated inline.
const INLINE_RANGE_LIMIT: i64 = 1000;

pub struct KvService {
    s: Arc<EtcdServer>,
}

impl KvService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }
}

fn txn_is_serializable(t: &TxnRequest) -> bool {
    crate::mvcc::all_txn_ops(t, &|r| match r {
        request_op::Request::RequestRange(r) => r.serializable,
        _ => true,
    })
}

#[tonic::async_trait]
impl Kv for KvService {
    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key), rev = req.get_ref().revision))]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        validate::check_range(&r)?;
        if !r.serializable {
            self.s.read_index().await?;
        }
        // Client threads are single-threaded runtimes: a range that may be
        // large is evaluated on the blocking pool so it stalls nobody else.
        let small = r.range_end.is_empty()
            || (!r.count_only && r.limit > 0 && r.limit <= INLINE_RANGE_LIMIT);
        let mut resp = if small {
            let store = self.s.state.store.read();
            store.range(&*self.s.state.engine, &r)?
        } else {
            let state = self.s.state.clone();
            tokio::task::spawn_blocking(move || state.store.read().range(&*state.engine, &r))
                .await
                .map_err(Error::internal)??
        };
        self.s.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key)))]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        validate::check_put(&r)?;
        match self.s.propose(Internal::Put(r)).await? {
            Applied::Put(mut resp) => {
                self.s.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key)))]
    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = req.into_inner();
        validate::check_delete(&r)?;
        match self.s.propose(Internal::DeleteRange(r)).await? {
            Applied::DeleteRange(mut resp) => {
                self.s.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all)]
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        validate::check_txn(&r, self.s.cfg.max_txn_ops)?;
        let applied = if crate::mvcc::is_read_only(&r) {
            if !txn_is_serializable(&r) {
                self.s.read_index().await?;
            }
            // Read-only: evaluating it changes nothing, so no proposal is needed
            // (etcd serves these locally too).
            let mut store = self.s.state.store.write();
            store.apply(
                &*self.s.state.engine,
                &InternalRequest {
                    request: Some(Internal::Txn(r)),
                },
            )?
        } else {
            self.s.propose(Internal::Txn(r)).await?
        };
        match applied {
            Applied::Txn(mut resp) => {
                self.s.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    #[instrument(level = "debug", skip_all, fields(rev = req.get_ref().revision))]
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        // Compaction is applied synchronously, so `physical` holds on return.
        match self
            .s
            .propose(Internal::Compaction(req.into_inner()))
            .await?
        {
            Applied::Compaction(mut resp) => {
                self.s.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }
}
