//! etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::mvcc::validate;
use crate::proto::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::raftpb::internal_request::Request as Internal;
use crate::server::EtcdServer;

pub struct KvService {
    s: Arc<EtcdServer>,
}

impl KvService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key), rev = req.get_ref().revision))]
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        let r = req.into_inner();
        validate::check_range(&r)?;
        Ok(Response::new(self.s.range(r, ai.as_ref()).await?))
    }

    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key)))]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        let r = req.into_inner();
        validate::check_put(&r)?;
        let r = Internal::Put(r);
        Ok(Response::new(self.s.propose_as(r, ai.as_ref()).await?))
    }

    #[instrument(level = "debug", skip_all, fields(key = %String::from_utf8_lossy(&req.get_ref().key)))]
    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        let r = req.into_inner();
        validate::check_delete(&r)?;
        let r = Internal::DeleteRange(r);
        Ok(Response::new(self.s.propose_as(r, ai.as_ref()).await?))
    }

    #[instrument(level = "debug", skip_all)]
    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        let r = req.into_inner();
        validate::check_txn(&r, self.s.cfg.max_txn_ops)?;
        Ok(Response::new(self.s.txn(r, ai.as_ref()).await?))
    }

    #[instrument(level = "debug", skip_all, fields(rev = req.get_ref().revision))]
    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let ai = super::caller(&self.s, &req).await?;
        self.s.check_user(ai.as_ref())?;
        let req = req.into_inner();
        let (rev, physical) = (req.revision, req.physical);
        let resp = self
            .s
            .propose_as(Internal::Compaction(req), ai.as_ref())
            .await?;
        if physical {
            // Applied to the key index; the records go in the background (as with etcd,
            // `physical` answers once they are gone).
            self.s.state.compactor.wait(rev).await;
        }
        Ok(Response::new(resp))
    }
}
