//! etcdserverpb.Watch: one task per stream multiplexes its watchers.
//!
//! On create the task registers with the hub, sends `created`, replays the
//! history up to the registration revision from storage, and only then goes
//! back to its queue, where live events wait: see [`crate::watch`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::mvcc::KeyRange;
use crate::proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};
use crate::server::EtcdServer;
use crate::watch::{stream_queue, HubMsg, Registered, StreamRx, StreamTx};

/// Most revisions in one replayed watch response (etcd's `watchBatchMaxRevs`).
const WATCH_BATCH_MAX_REVS: usize = 1000;
/// Stored values read per page when a watcher replays history: replaying a
/// long span holds about this much at a time, not the whole span, and a
/// replayed response stays well under the 4 MiB many clients accept by
/// default (etcd's Go client takes any size).
const REPLAY_PAGE_BYTES: usize = 1 << 20;

pub struct WatchService {
    s: Arc<EtcdServer>,
}

impl WatchService {
    pub fn new(s: Arc<EtcdServer>) -> Self {
        Self { s }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        self.s.not_learner()?;
        // Each watch created on the stream is checked against the caller of
        // the stream (its token or certificate), as etcd checks them.
        let token = super::token_of(req.metadata())?.map(str::to_string);
        let common_name = req
            .extensions()
            .get::<super::authority::ClientConn>()
            .and_then(|c| c.common_name.as_deref())
            .map(str::to_string);
        let inbound = req.into_inner();
        let (out, rx) = mpsc::channel(256);
        let (hub_tx, hub_rx) = stream_queue();
        let task = StreamTask {
            id: self.s.state.hub.new_stream(),
            s: self.s.clone(),
            out,
            hub_tx,
            watchers: HashMap::new(),
            next_id: 0,
            token,
            common_name,
        };
        tokio::spawn(task.run(inbound, hub_rx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Watcher {
    range: KeyRange,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
}

impl Watcher {
    fn shape(&self, e: &Event) -> Option<Event> {
        let is_put = e.r#type == EventType::Put as i32;
        if (is_put && self.no_put) || (!is_put && self.no_delete) {
            return None;
        }
        let mut e = e.clone();
        if !self.prev_kv {
            e.prev_kv = None;
        }
        Some(e)
    }
}

struct StreamTask {
    id: u64,
    s: Arc<EtcdServer>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    hub_tx: StreamTx,
    watchers: HashMap<i64, Watcher>,
    next_id: i64,
    token: Option<String>,
    common_name: Option<String>,
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, mut hub_rx: StreamRx) {
        let every = self
            .s
            .cfg
            .progress_notify_interval
            .max(std::time::Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let ok = tokio::select! {
                req = inbound.message() => match req {
                    Ok(Some(req)) => self.handle(req).await,
                    Ok(None) => false,
                    Err(e) => {
                        debug!("watch stream closed: {e}");
                        false
                    }
                },
                Some(msg) = hub_rx.recv() => self.deliver(msg).await,
                _ = progress.tick() => {
                    if self.watchers.values().any(|w| w.progress_notify) {
                        self.s.state.hub.progress(&self.hub_tx, false);
                    }
                    true
                }
            };
            if !ok {
                break;
            }
        }
        self.s.state.hub.close_stream(self.id);
    }

    async fn send(&self, r: WatchResponse) -> bool {
        self.out.send(Ok(r)).await.is_ok()
    }

    async fn handle(&mut self, req: WatchRequest) -> bool {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                if self.watchers.remove(&c.watch_id).is_some() {
                    self.s.state.hub.cancel(self.id, c.watch_id);
                    let r = WatchResponse {
                        header: Some(self.s.header(0)),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    return self.send(r).await;
                }
                true
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                // Queued behind every event already published, so the answer
                // goes out only once this stream's watchers have caught up.
                self.s.state.hub.progress(&self.hub_tx, true);
                true
            }
            None => true,
        }
    }

    /// Whether the stream's caller may read what `c` watches; etcd refuses
    /// with a canceled response of watch ID -1 whose reason is the gRPC
    /// error's text.
    async fn permitted(&self, c: &WatchCreateRequest) -> Result<(), String> {
        let ai = self
            .s
            .caller(self.token.as_deref(), self.common_name.as_deref())
            .await;
        let key: &[u8] = if c.key.is_empty() { b"\0" } else { &c.key };
        let checked = ai.and_then(|ai| {
            self.s
                .state
                .auth
                .store
                .read()
                .check_range(ai.as_ref(), key, &c.range_end, false)
        });
        checked.map_err(|e| {
            let (code, text) = match e {
                crate::error::Error::InvalidAuthToken => ("Unauthenticated", e.to_string()),
                crate::error::Error::AuthOldRevision | crate::error::Error::UserEmpty => {
                    ("InvalidArgument", e.to_string())
                }
                _ => (
                    "PermissionDenied",
                    crate::error::Error::PermissionDenied.to_string(),
                ),
            };
            format!("rpc error: code = {code} desc = {text}")
        })
    }

    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        if let Err(reason) = self.permitted(&c).await {
            let r = WatchResponse {
                header: Some(self.s.header(0)),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            };
            return self.send(r).await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                let r = WatchResponse {
                    header: Some(self.s.header(0)),
                    watch_id: c.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: "mvcc: duplicate watch ID provided on the WatchStream".into(),
                    ..Default::default()
                };
                return self.send(r).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if id >= self.next_id {
            self.next_id = id + 1;
        }
        let w = Watcher {
            range: KeyRange::new(&c.key, &c.range_end),
            prev_kv: c.prev_kv,
            no_put: c.filters.contains(&(FilterType::Noput as i32)),
            no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
            fragment: c.fragment,
        };
        let start = c.start_revision.max(0);
        let reg =
            self.s
                .state
                .hub
                .register(self.id, id, w.range.clone(), start, self.hub_tx.clone());
        match reg {
            Registered::Compacted { compacted, current } => {
                let created = WatchResponse {
                    header: Some(self.s.header(current)),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                };
                self.send(created).await && self.send(self.compacted_cancel(id, compacted)).await
            }
            Registered::Replay { from, to, current } => {
                let created = WatchResponse {
                    header: Some(self.s.header(current)),
                    watch_id: id,
                    created: true,
                    ..Default::default()
                };
                if !self.send(created).await {
                    return false;
                }
                self.watchers.insert(id, w);
                if from <= to {
                    return self.replay(id, from, to).await;
                }
                true
            }
        }
    }

    /// Sends the stored history `[from, to]` of watcher `id`.
    async fn replay(&mut self, id: i64, from: i64, to: i64) -> bool {
        let mut from = from;
        loop {
            let state = self.s.state.clone();
            let page = tokio::task::spawn_blocking(move || {
                // Taken under the store lock: never in the middle of a snapshot load.
                let view = {
                    let _store = state.store.read();
                    state.engine.view()
                };
                view.history_page(from, to, REPLAY_PAGE_BYTES)
            })
            .await;
            let (records, next) = match page {
                Ok(Ok(p)) => p,
                failed => {
                    // History that cannot be read: the watcher is canceled
                    // rather than left to go on with events missing.
                    let reason = match failed {
                        Ok(Err(e)) => e.to_string(),
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(watch = id, "replaying history: {reason}");
                    self.watchers.remove(&id);
                    self.s.state.hub.cancel(self.id, id);
                    let r = WatchResponse {
                        header: Some(self.s.header(0)),
                        watch_id: id,
                        canceled: true,
                        cancel_reason: format!("cairn: replaying history: {reason}"),
                        ..Default::default()
                    };
                    return self.send(r).await;
                }
            };
            if self.s.state.hub.compacted() > from {
                // Compaction ran before this page was read: events may be missing.
                self.watchers.remove(&id);
                self.s.state.hub.cancel(self.id, id);
                let r = self.compacted_cancel(id, self.s.state.hub.compacted());
                return self.send(r).await;
            }
            let events = self.events_of(id, records);
            if !self.send_events(id, events, Some(to)).await {
                return false;
            }
            match next {
                Some(n) => from = n,
                None => return true,
            }
        }
    }

    /// The events watcher `id` gets from stored history records.
    fn events_of(
        &self,
        id: i64,
        records: Vec<(crate::mvcc::Revision, crate::mvcc::Record)>,
    ) -> Vec<Event> {
        let Some(w) = self.watchers.get(&id) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        let store = self.s.state.store.read();
        for (rev, rec) in records {
            if !w.range.contains(&rec.kv.key) {
                continue;
            }
            let prev = if w.prev_kv {
                store
                    .get(&*self.s.state.engine, &rec.kv.key, rev.main - 1)
                    .ok()
                    .flatten()
            } else {
                None
            };
            let (t, kv) = if rec.tombstone {
                (
                    EventType::Delete,
                    KeyValue {
                        key: rec.kv.key,
                        mod_revision: rev.main,
                        ..Default::default()
                    },
                )
            } else {
                (EventType::Put, rec.kv)
            };
            if let Some(e) = w.shape(&Event {
                r#type: t as i32,
                kv: Some(kv),
                prev_kv: prev,
            }) {
                events.push(e);
            }
        }
        events
    }

    async fn deliver(&mut self, msg: HubMsg) -> bool {
        match msg {
            HubMsg::Events {
                watch_id,
                batch,
                from,
                ..
            } => {
                let Some(w) = self.watchers.get(&watch_id) else {
                    return true;
                };
                let events: Vec<Event> = crate::watch::events_for(&batch, &w.range, from)
                    .filter_map(|e| w.shape(e))
                    .collect();
                self.send_events(watch_id, events, None).await
            }
            HubMsg::Progress {
                revision,
                all: true,
            } => {
                let r = WatchResponse {
                    header: Some(self.s.header(revision)),
                    watch_id: -1,
                    ..Default::default()
                };
                self.send(r).await
            }
            HubMsg::Progress {
                revision,
                all: false,
            } => {
                let ids: Vec<i64> = self
                    .watchers
                    .iter()
                    .filter(|(_, w)| w.progress_notify)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    let r = WatchResponse {
                        header: Some(self.s.header(revision)),
                        watch_id: id,
                        ..Default::default()
                    };
                    if !self.send(r).await {
                        return false;
                    }
                }
                true
            }
            HubMsg::Lagged { watch_id, from } => self.resync(watch_id, from).await,
        }
    }

    /// Re-registers a watcher that fell behind and replays what it missed
    /// from storage, or cancels it if that history is compacted.
    async fn resync(&mut self, id: i64, from: i64) -> bool {
        let Some(range) = self.watchers.get(&id).map(|w| w.range.clone()) else {
            return true;
        };
        info!(
            watch = id,
            from, "watch stream fell behind; resyncing from storage"
        );
        match self
            .s
            .state
            .hub
            .register(self.id, id, range, from, self.hub_tx.clone())
        {
            Registered::Replay { from, to, .. } if from <= to => self.replay(id, from, to).await,
            Registered::Replay { .. } => true,
            Registered::Compacted { compacted, .. } => {
                self.watchers.remove(&id);
                self.send(self.compacted_cancel(id, compacted)).await
            }
        }
    }

    /// The response that cancels watch `id` because its history is
    /// compacted, as etcd's: `compact_revision` set (clients turn it into
    /// their compacted error), no cancel reason, a header at revision 0.
    fn compacted_cancel(&self, id: i64, compacted: i64) -> WatchResponse {
        let mut header = self.s.header(0);
        header.revision = 0;
        WatchResponse {
            header: Some(header),
            watch_id: id,
            canceled: true,
            compact_revision: compacted,
            ..Default::default()
        }
    }

    /// Sends events as etcd does: live events one revision per response;
    /// replayed history (`replayed_to` set) up to 1000 revisions per
    /// response, at the replay's revision. Responses over the request size
    /// limit are fragmented when the watcher asked for it.
    async fn send_events(&self, id: i64, events: Vec<Event>, replayed_to: Option<i64>) -> bool {
        let Some(w) = self.watchers.get(&id) else {
            return true;
        };
        let revs_per_response = if replayed_to.is_some() {
            WATCH_BATCH_MAX_REVS
        } else {
            1
        };
        let rev_of = |e: &Event| e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
        let mut start = 0;
        while start < events.len() {
            let mut end = start;
            let mut revs = 0;
            let mut last = None;
            while end < events.len() {
                let r = rev_of(&events[end]);
                if last != Some(r) {
                    if revs == revs_per_response {
                        break;
                    }
                    revs += 1;
                    last = Some(r);
                }
                end += 1;
            }
            let group = &events[start..end];
            let header = Some(
                self.s
                    .header(replayed_to.unwrap_or_else(|| rev_of(&events[start]))),
            );
            let limit = self.s.cfg.max_request_bytes;
            let total: usize = group.iter().map(|e| e.encoded_len()).sum();
            if w.fragment && total > limit {
                let mut chunk: Vec<Event> = Vec::new();
                let mut size = 0;
                let mut chunks = Vec::new();
                for e in group {
                    let n = e.encoded_len();
                    if !chunk.is_empty() && size + n > limit {
                        chunks.push(std::mem::take(&mut chunk));
                        size = 0;
                    }
                    size += n;
                    chunk.push(e.clone());
                }
                chunks.push(chunk);
                let last = chunks.len() - 1;
                for (i, c) in chunks.into_iter().enumerate() {
                    let r = WatchResponse {
                        header,
                        watch_id: id,
                        events: c,
                        fragment: i != last,
                        ..Default::default()
                    };
                    if !self.send(r).await {
                        return false;
                    }
                }
            } else {
                let r = WatchResponse {
                    header,
                    watch_id: id,
                    events: group.to_vec(),
                    ..Default::default()
                };
                if !self.send(r).await {
                    return false;
                }
            }
            start = end;
        }
        true
    }
}
