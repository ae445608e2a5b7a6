//! Raft snapshots that are never held in memory (issue 22). The leader sends the state
//! machine as a [`SnapshotPayload`]'s bytes, produced on demand from a RocksDB snapshot taken
//! at its applied position ([`Outgoing`]); the receiving member writes them to a file in its
//! data dir ([`Incoming`]) and loads that file in bounded batches
//! ([`KvState::install_file`]), finishing the load at its next start if a crash cut it short.
//! `cairn snapshot restore` loads snapshot files the same way.
//!
//! [`SnapshotPayload`]: crate::snapshot::SnapshotPayload

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use super::state_machine::{decode_position, load_auth, KvState, Position};
use crate::error::{Error, Result};
use crate::mvcc::{MvccStore, Restorer, Revision};
use crate::snapshot::{check_meta, check_record, PayloadReader, PayloadSource};
use crate::storage::{decode_record, Engine, StateMeta};

/// A key of the `raft` column family, set while a snapshot file is being loaded: the file
/// and how to load it, so that a start after a crash finishes the load first.
const INSTALLING: &[u8] = b"installing_snapshot";

/// The name a received snapshot is loaded under, in the snap dir.
const INSTALLING_FILE: &str = "installing.snap";
/// The SST file a snapshot is loaded through, in the snap dir.
const LOADING_SST: &str = "loading.sst";

/// Bytes an [`Outgoing`] snapshot is produced in.
const CHUNK: usize = 1 << 20;

/// How a file is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Install {
    /// The bare payload, as Raft sends it; the position is the leader's.
    Raft,
    /// A snapshot file (`crate::snapshot`'s format) into a new cluster: no Raft position,
    /// membership or alarms are kept.
    Restore { check_hash: bool },
}

/// A Raft snapshot's bytes: produced for sending, or being received into a file.
pub enum SnapshotData {
    Out(Outgoing),
    In(Incoming),
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Out(_) => f.write_str("SnapshotData::Out"),
            SnapshotData::In(i) => write!(f, "SnapshotData::In({})", i.path.display()),
        }
    }
}

fn io_error(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn producer_gone() -> std::io::Error {
    io_error("snapshot: the producer stopped")
}

/// What an [`Outgoing`] asks of the thread that reads its view.
enum Request {
    Len(oneshot::Sender<Result<u64>>),
    Bytes {
        from: u64,
        tx: mpsc::Sender<Result<Vec<u8>>>,
    },
}

/// The bytes of the state machine at one applied position, read on demand. A thread holds
/// the RocksDB snapshot they come from, with applies going on beside it, and produces them
/// in chunks of [`CHUNK`] through a channel two chunks deep; seeking back (a retried chunk)
/// starts it over from the beginning of the view, skipping what comes before. It stops when
/// this is dropped.
pub struct Outgoing {
    requests: std::sync::mpsc::Sender<Request>,
    pos: u64,
    len: Option<u64>,
    seek: Option<SeekFrom>,
    len_rx: Option<oneshot::Receiver<Result<u64>>>,
    stream: Option<Stream>,
}

struct Stream {
    rx: mpsc::Receiver<Result<Vec<u8>>>,
    /// The producer said it reached the end.
    ended: bool,
    chunk: Vec<u8>,
    used: usize,
    /// The offset of `chunk[used]`.
    at: u64,
}

impl Outgoing {
    /// Takes a view of `state` at its applied position and starts the thread that reads it.
    pub async fn start(state: Arc<KvState>) -> Result<(Position, Outgoing)> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (requests, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("cairn-snapshot".into())
            .spawn(move || produce(&state, ready_tx, rx))
            .map_err(Error::internal)?;
        let pos = ready_rx
            .await
            .map_err(|_| Error::Internal("snapshot: the producer stopped".into()))??;
        let out = Outgoing {
            requests,
            pos: 0,
            len: None,
            seek: None,
            len_rx: None,
            stream: None,
        };
        Ok((pos, out))
    }

    fn poll_len(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        if let Some(len) = self.len {
            return Poll::Ready(Ok(len));
        }
        if self.len_rx.is_none() {
            // The thread answers one request at a time: a stream it is feeding must go.
            self.stream = None;
            let (tx, rx) = oneshot::channel();
            self.requests
                .send(Request::Len(tx))
                .map_err(|_| producer_gone())?;
            self.len_rx = Some(rx);
        }
        let rx = self.len_rx.as_mut().expect("set above");
        let answer = ready!(Pin::new(rx).poll(cx));
        self.len_rx = None;
        let len = answer.map_err(|_| producer_gone())?.map_err(io_error)?;
        self.len = Some(len);
        Poll::Ready(Ok(len))
    }
}

/// The thread behind an [`Outgoing`].
fn produce(
    state: &KvState,
    ready_tx: oneshot::Sender<Result<Position>>,
    requests: std::sync::mpsc::Receiver<Request>,
) {
    let engine = state.engine.clone();
    let (view, meta, pos) = state.view_at_applied(&engine);
    let mut source = match PayloadSource::new(view, &meta) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready_tx.send(Err(e));
            return;
        }
    };
    if ready_tx.send(Ok(pos)).is_err() {
        return;
    }
    while let Ok(request) = requests.recv() {
        match request {
            // Counting and producing stop soon after the asker is gone (a transfer given
            // up, a peer unreachable): each attempt starts a producer, and a pass over a
            // large view must not outlive it.
            Request::Len(tx) => match source.byte_len(&|| !tx.is_closed()) {
                Ok(None) => {}
                Ok(Some(len)) => {
                    let _ = tx.send(Ok(len));
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
            Request::Bytes { from, tx } => {
                let (mut at, mut buf) = (0u64, Vec::with_capacity(CHUNK));
                let sent = source.emit(&|| !tx.is_closed(), |mut piece| {
                    let n = piece.len() as u64;
                    if at + n <= from {
                        at += n;
                        // Skipping can take a pass over the view: stop if nobody waits.
                        return !tx.is_closed();
                    }
                    if at < from {
                        piece = &piece[(from - at) as usize..];
                        at = from;
                    }
                    while !piece.is_empty() {
                        let take = (CHUNK - buf.len()).min(piece.len());
                        buf.extend_from_slice(&piece[..take]);
                        piece = &piece[take..];
                        at += take as u64;
                        if buf.len() == CHUNK {
                            let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK));
                            if tx.blocking_send(Ok(full)).is_err() {
                                return false;
                            }
                        }
                    }
                    true
                });
                // The end is said in so many words (an empty chunk): a producer that stops
                // any other way, a panic included, reads as an error, never as a short
                // snapshot.
                let _ = match sent {
                    Ok(()) if !buf.is_empty() => tx
                        .blocking_send(Ok(buf))
                        .and_then(|()| tx.blocking_send(Ok(Vec::new()))),
                    Ok(()) => tx.blocking_send(Ok(Vec::new())),
                    Err(e) => tx.blocking_send(Err(e)),
                };
            }
        }
    }
}

impl AsyncRead for Outgoing {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || this.len.is_some_and(|len| this.pos >= len) {
            return Poll::Ready(Ok(()));
        }
        if this.stream.as_ref().is_none_or(|s| s.at != this.pos) {
            this.stream = None;
            let (tx, rx) = mpsc::channel(2);
            this.requests
                .send(Request::Bytes { from: this.pos, tx })
                .map_err(|_| producer_gone())?;
            this.stream = Some(Stream {
                rx,
                ended: false,
                chunk: Vec::new(),
                used: 0,
                at: this.pos,
            });
        }
        let s = this.stream.as_mut().expect("set above");
        loop {
            if s.used < s.chunk.len() {
                let n = buf.remaining().min(s.chunk.len() - s.used);
                buf.put_slice(&s.chunk[s.used..s.used + n]);
                s.used += n;
                s.at += n as u64;
                this.pos += n as u64;
                return Poll::Ready(Ok(()));
            }
            if s.ended {
                return Poll::Ready(Ok(()));
            }
            match ready!(s.rx.poll_recv(cx)) {
                Some(Ok(chunk)) if chunk.is_empty() => {
                    s.ended = true;
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(chunk)) => {
                    s.chunk = chunk;
                    s.used = 0;
                }
                Some(Err(e)) => {
                    this.stream = None;
                    return Poll::Ready(Err(io_error(e)));
                }
                None => {
                    this.stream = None;
                    return Poll::Ready(Err(producer_gone()));
                }
            }
        }
    }
}

impl AsyncSeek for Outgoing {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        self.get_mut().seek = Some(position);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        let this = self.get_mut();
        let (base, delta) = match this.seek {
            None => return Poll::Ready(Ok(this.pos)),
            Some(SeekFrom::Start(n)) => (n, 0),
            Some(SeekFrom::Current(d)) => (this.pos, d),
            Some(SeekFrom::End(d)) => (ready!(this.poll_len(cx))?, d),
        };
        this.seek = None;
        let pos = base
            .checked_add_signed(delta)
            .ok_or_else(|| io_error("snapshot: seek out of range"))?;
        this.pos = pos;
        Poll::Ready(Ok(pos))
    }
}

impl AsyncWrite for Outgoing {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Err(io_error("snapshot: an outgoing snapshot is read-only")))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A snapshot being received: a file under `<data-dir>/member/snap`, deleted when this is
/// dropped (a transfer abandoned, or the snapshot installed).
pub struct Incoming {
    file: tokio::fs::File,
    path: PathBuf,
    /// Where the next write goes, and the end of what was written since the last seek to
    /// the start (a transfer sent again from its first byte): the file is cut there.
    pos: u64,
    valid: u64,
    /// Removed on drop (until it is handed over for loading).
    remove: bool,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Incoming {
    /// A new, empty file in `dir`.
    pub async fn create(dir: &Path) -> std::io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(format!(
            "incoming-{}-{}.part",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = tokio::fs::File::create(&path).await?;
        Ok(Self {
            file,
            path,
            pos: 0,
            valid: 0,
            remove: true,
        })
    }

    /// Hands the received bytes over for loading: cut to what was sent, fsynced, renamed to
    /// [`INSTALLING_FILE`] in `dir` (its directory fsynced too). The caller removes the file
    /// once it is loaded, or once it failed before the `INSTALLING` mark was set.
    pub async fn into_installing(mut self, dir: &Path) -> std::io::Result<PathBuf> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        self.file.set_len(self.valid).await?;
        self.file.sync_all().await?;
        let to = dir.join(INSTALLING_FILE);
        tokio::fs::rename(&self.path, &to).await?;
        let d = dir.to_path_buf();
        tokio::task::spawn_blocking(move || sync_dir(&d)).await??;
        self.remove = false;
        Ok(to)
    }

    /// An [`Outgoing`] snapshot copied into a file (openraft's storage suite hands one
    /// straight to `install_snapshot`).
    pub async fn copy_of(mut out: Outgoing, dir: &Path) -> std::io::Result<Self> {
        use tokio::io::AsyncSeekExt;
        let mut this = Self::create(dir).await?;
        out.seek(SeekFrom::Start(0)).await?;
        tokio::io::copy(&mut out, &mut this).await?;
        Ok(this)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AsyncWrite for Incoming {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.file).poll_write(cx, buf))?;
        this.pos += n as u64;
        this.valid = this.valid.max(this.pos);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

impl AsyncSeek for Incoming {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        Pin::new(&mut self.get_mut().file).start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        let this = self.get_mut();
        let pos = ready!(Pin::new(&mut this.file).poll_complete(cx))?;
        this.pos = pos;
        if pos == 0 {
            this.valid = 0;
        }
        Poll::Ready(Ok(pos))
    }
}

impl AsyncRead for Incoming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.file).poll_read(cx, buf))?;
        this.pos += (buf.filled().len() - before) as u64;
        Poll::Ready(Ok(()))
    }
}

macro_rules! delegate {
    ($self:ident, $x:ident => $e:expr) => {
        match $self.get_mut() {
            SnapshotData::Out($x) => {
                let $x = Pin::new($x);
                $e
            }
            SnapshotData::In($x) => {
                let $x = Pin::new($x);
                $e
            }
        }
    };
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, x => x.poll_read(cx, buf))
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, x => x.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, x => x.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, x => x.poll_shutdown(cx))
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        delegate!(self, x => x.start_seek(position))
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        delegate!(self, x => x.poll_complete(cx))
    }
}

/// Where the payload lies in the file at `path` (offset, length), its checksum checked if
/// asked: a pass over the file, holding none of it.
fn locate(path: &Path, how: Install) -> Result<(u64, u64)> {
    let mut file = open(path)?;
    let len = file
        .metadata()
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?
        .len();
    match how {
        Install::Raft => Ok((0, len)),
        Install::Restore { check_hash } => {
            crate::snapshot::locate_payload(&mut file, len, check_hash)
        }
    }
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
}

/// Reads the payload in `path` through, checking every part (records in strictly
/// ascending revision order, each within the payload's revision); with `engine`, also loads
/// it into an SST file at `sst` ([`Engine::write_state_file`]). Returns the position
/// it holds (cleared for a restore).
fn pass(
    path: &Path,
    (at, len): (u64, u64),
    how: Install,
    load_into: Option<(&Engine, &Path)>,
    mut index: Option<&mut Restorer>,
) -> Result<(StateMeta, Vec<(i64, i64)>)> {
    let mut file = open(path)?;
    file.seek(SeekFrom::Start(at))
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    let input = std::io::BufReader::with_capacity(1 << 20, file.take(len));
    let (mut reader, mut meta) = PayloadReader::new(input, len)?;
    check_meta(&meta)?;
    if let Install::Restore { .. } = how {
        meta.applied.clear();
        meta.membership.clear();
        meta.alarms.clear();
    }
    let mut kept_leases = Vec::new();
    let body = |put: &mut dyn FnMut(Revision, &[u8]) -> Result<()>| {
        let mut buf = Vec::new();
        let mut last = None;
        while let Some((main, sub)) = reader.next_record(&mut buf)? {
            check_record(&meta, main, sub)?;
            let rev = Revision::new(main, sub);
            if last.is_some_and(|l| l >= rev) {
                return Err(Error::InvalidArgument(format!(
                    "snapshot: record at revision {main}/{sub} out of order"
                )));
            }
            last = Some(rev);
            let rec = decode_record(&buf)?;
            put(rev, &buf)?;
            if let Some(ix) = index.as_deref_mut() {
                ix.add(rev, rec);
            }
        }
        let (leases, auth) = reader.finish()?;
        load_auth(&auth)?;
        let mut ids: Vec<i64> = leases.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument(format!(
                "snapshot: lease {:x} listed twice",
                w[0]
            )));
        }
        kept_leases = leases.clone();
        Ok((leases, auth))
    };
    match load_into {
        None => {
            body(&mut |_, _| Ok(()))?;
        }
        Some((engine, sst)) => engine.write_state_file(sst, &meta, body)?,
    }
    Ok((meta, kept_leases))
}

/// Checks the snapshot in `path` through without loading it; returns the position it holds.
pub fn check_file(path: &Path, how: Install) -> Result<StateMeta> {
    let (meta, _) = pass(path, locate(path, how)?, how, None, None)?;
    decode_position(&meta)?;
    Ok(meta)
}

/// Checks the snapshot in `path` through and writes it into an SST file in `snap_dir`,
/// touching nothing of the state machine: a bad snapshot changes nothing. Returns the
/// position it holds, the file, for [`commit`], and, with `min_lease_ttl`, the store's key
/// index built as the records went by (no second read of them).
fn prepare(
    engine: &Engine,
    snap_dir: &Path,
    path: &Path,
    how: Install,
    min_lease_ttl: Option<i64>,
) -> Result<(StateMeta, PathBuf, Option<MvccStore>)> {
    std::fs::create_dir_all(snap_dir)
        .map_err(|e| Error::Internal(format!("{}: {e}", snap_dir.display())))?;
    let sst = snap_dir.join(LOADING_SST);
    let mut index = min_lease_ttl.map(Restorer::new);
    let passed = pass(
        path,
        locate(path, how)?,
        how,
        Some((engine, &sst)),
        index.as_mut(),
    );
    let checked = passed.and_then(|(m, leases)| decode_position(&m).map(|_| (m, leases)));
    match checked {
        Ok((m, leases)) => {
            let store = index.map(|ix| {
                ix.finish(
                    leases.into_iter(),
                    m.revision,
                    m.compacted,
                    Engine::alarms_of(&m),
                )
            });
            Ok((m, sst, store))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&sst);
            Err(e)
        }
    }
}

/// Replaces `engine`'s state machine with a prepared SST file. The `INSTALLING` mark names
/// the snapshot file (relative to `snap_dir` when it is there) until the load is durable, so
/// that [`finish_interrupted_install`] can load it again after a crash.
fn commit(engine: &Engine, snap_dir: &Path, path: &Path, how: Install, sst: &Path) -> Result<()> {
    let how = match how {
        Install::Restore { .. } => Install::Restore { check_hash: false },
        raft => raft,
    };
    let mark = match path.strip_prefix(snap_dir) {
        Ok(name) => name.to_path_buf(),
        Err(_) => std::fs::canonicalize(path)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?,
    };
    engine.raft_put(INSTALLING, &(mark.to_string_lossy().into_owned(), how))?;
    let done = engine.ingest_state(sst);
    let _ = std::fs::remove_file(sst);
    done
}

/// At start: finishes loading a snapshot whose load a crash cut short (the state machine is
/// partly replaced until then). The file is kept until the load is durable.
pub fn finish_interrupted_install(engine: &Engine, snap_dir: &Path) -> Result<()> {
    match engine.raft_get::<(String, Install)>(INSTALLING)? {
        Some((name, how)) => {
            let path = snap_dir.join(name);
            if !path.exists() {
                return Err(Error::Internal(format!(
                    "a snapshot load was interrupted and its file {} is gone: this member's \
                     data is incomplete; remove the member and add it again with an empty \
                     data dir",
                    path.display()
                )));
            }
            tracing::warn!(file = %path.display(), "finishing an interrupted snapshot load");
            let (_, sst, _) = prepare(engine, snap_dir, &path, how, None)?;
            commit(engine, snap_dir, &path, how, &sst)?;
            engine.raft_delete(INSTALLING)?;
            let _ = std::fs::remove_file(&path);
        }
        // Loaded, and stopped before the files were removed; or stopped while preparing.
        None => {
            let _ = std::fs::remove_file(snap_dir.join(INSTALLING_FILE));
            let _ = std::fs::remove_file(snap_dir.join(LOADING_SST));
        }
    }
    // Transfers a stop cut short.
    if let Ok(entries) = std::fs::read_dir(snap_dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".part") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

impl KvState {
    /// Replaces the state machine with the snapshot in the file at `path`, which must stay
    /// there until this returns; with `expect`, the snapshot must hold that applied log id.
    /// The file is checked whole first; readers wait while it is loaded (the store lock is
    /// held). After an error the file is needed again if the `INSTALLING` mark is still set
    /// ([`Self::install_pending`]): a start then finishes the load.
    pub fn install_file(
        &self,
        path: &Path,
        how: Install,
        expect: Option<Option<super::LogId>>,
    ) -> Result<StateMeta> {
        // Checked and written into an SST file first, with nothing locked or replaced.
        let started = std::time::Instant::now();
        let (meta, sst, restored) = prepare(
            &self.engine,
            &self.snap_dir,
            path,
            how,
            Some(self.min_lease_ttl),
        )?;
        let prepared = started.elapsed();
        if let Some(want) = expect {
            let (got, _) = decode_position(&meta)?;
            if got != want {
                let _ = std::fs::remove_file(&sst);
                return Err(Error::InvalidArgument(format!(
                    "snapshot: holds log id {got:?}, announced as {want:?}"
                )));
            }
        }
        let mut store = self.store.write();
        // The old state's compaction stops before the new state comes in (its revisions
        // may name records of the new one).
        self.compactor.clear();
        commit(&self.engine, &self.snap_dir, path, how, &sst)?;
        let committed = started.elapsed();
        *store = restored.expect("built when asked for");
        tracing::info!(
            revision = meta.revision,
            check_write_and_index_ms = prepared.as_millis() as u64,
            ingest_ms = (committed - prepared).as_millis() as u64,
            "snapshot loaded"
        );
        self.compactor
            .submit(store.compacted(), store.compact_leftovers());
        *self.auth.store.write() = load_auth(&self.engine.auth_state()?)?;
        // Simple tokens name entries of the log this snapshot replaces.
        self.auth.tokens().clear();
        self.set_position_from(&meta)?;
        // Watchers registered before go on from the new history, replayed from storage (or
        // are told it is compacted): the events in between were never published here.
        self.hub.replace(store.revision(), store.compacted());
        self.lessor
            .reset_all(store.leases().map(|(id, l)| (id, l.ttl)));
        self.engine.raft_delete(INSTALLING)?;
        Ok(meta)
    }

    /// Whether a load was begun and not finished (its file must stay).
    pub fn install_pending(&self) -> bool {
        !matches!(
            self.engine.raft_get::<(String, Install)>(INSTALLING),
            Ok(None)
        )
    }

    /// Streams the snapshot file of the state machine at its applied position to `sink` in
    /// chunks of `chunk` bytes, holding neither the state nor the file in memory (see
    /// [`PayloadSource`]). `sink` gets each chunk, the bytes remaining and the revision the
    /// snapshot holds; it returns false to stop.
    pub fn stream_snapshot(
        &self,
        chunk: usize,
        mut sink: impl FnMut(&[u8], u64, i64) -> bool,
    ) -> Result<()> {
        let engine = self.engine.clone();
        let (view, meta, _) = self.view_at_applied(&engine);
        let revision = meta.revision;
        let mut source = PayloadSource::new(view, &meta)?;
        let len = source
            .byte_len(&|| true)?
            .ok_or_else(|| Error::Internal("snapshot: counting stopped".into()))?;
        let mut w = crate::snapshot::StreamWriter::new(len as usize, chunk, |b, left| {
            sink(b, left, revision)
        });
        source.emit(&|| true, |piece| {
            w.write(piece);
            !w.stopped()
        })?;
        w.finish()
    }
}

/// Reads what an [`Outgoing`] produces, whole (tests).
#[cfg(test)]
pub async fn read_all(mut out: Outgoing) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    out.read_to_end(&mut all).await?;
    Ok(all)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::mvcc::{Record, WriteSet};
    use crate::proto::mvccpb::KeyValue;
    use crate::snapshot::SnapshotPayload;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A member's state under `dir`: `n` keys with `size`-byte values, a lease, auth on, and
    /// an applied position at log index `index`.
    pub(crate) fn state_with(dir: &Path, n: i64, size: usize, index: u64) -> Arc<KvState> {
        let engine = Engine::open(&dir.join("member").join("cairn")).unwrap();
        let records = (0..n)
            .map(|i| {
                let kv = KeyValue {
                    key: format!("k{i:06}").into_bytes(),
                    value: vec![(i % 251) as u8; size],
                    create_revision: i + 2,
                    mod_revision: i + 2,
                    version: 1,
                    lease: 0,
                };
                let rec = Record {
                    kv,
                    tombstone: false,
                };
                (Revision::new(i + 2, 0), rec)
            })
            .collect();
        let ws = WriteSet {
            records,
            leases: vec![(7, Some(60))],
            ..Default::default()
        };
        let applied: Option<super::super::LogId> = Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(1, 1),
            index,
        ));
        let meta = StateMeta {
            applied: bincode::serialize(&applied).unwrap(),
            membership: vec![],
            revision: n + 1,
            compacted: 0,
            alarms: vec![],
        };
        let auth = crate::proto::raftpb::AuthState {
            enabled: true,
            revision: index,
            ..Default::default()
        };
        let auth = prost::Message::encode_to_vec(&auth);
        engine.write_state(&ws, &meta, Some(&auth)).unwrap();
        Arc::new(KvState::open(engine, 2, 1).unwrap())
    }

    /// The payload of `state` as `SnapshotPayload::encode` writes it, whole.
    pub(crate) fn payload_of(state: &KvState) -> Vec<u8> {
        let engine = state.engine.clone();
        let (view, meta, _) = state.view_at_applied(&engine);
        SnapshotPayload {
            meta,
            records: view.records().unwrap(),
            leases: view.leases().unwrap(),
            auth: view.auth_state().unwrap(),
        }
        .encode()
        .unwrap()
    }

    type Contents = (Vec<(i64, i64, Vec<u8>)>, Vec<(i64, i64)>, Vec<u8>, i64);

    fn contents(state: &KvState) -> Contents {
        let view = state.engine.view();
        (
            view.records().unwrap(),
            view.leases().unwrap(),
            view.auth_state().unwrap(),
            state.store.read().revision(),
        )
    }

    /// What a leader sends is the payload, byte for byte, however openraft reads it: whole,
    /// from its end backwards to a middle offset, or again from near the start (a retry).
    #[test]
    fn outgoing_bytes_are_the_payload_read_any_way() {
        let dir = tempfile::tempdir().unwrap();
        // About 3 MiB: several chunks.
        let a = state_with(dir.path(), 300, 10_000, 9);
        let want = payload_of(&a);
        let rt = rt();
        let (pos, out) = rt.block_on(Outgoing::start(a.clone())).unwrap();
        assert_eq!(pos, a.applied());
        assert_eq!(rt.block_on(read_all(out)).unwrap(), want);
        rt.block_on(async {
            let (_, mut out) = Outgoing::start(a.clone()).await.unwrap();
            let end = out.seek(SeekFrom::End(0)).await.unwrap();
            assert_eq!(end, want.len() as u64);
            for at in [2_500_000u64, 100, 1 << 20, end - 10] {
                out.seek(SeekFrom::Start(at)).await.unwrap();
                let mut got = vec![0u8; 1000.min((end - at) as usize)];
                out.read_exact(&mut got).await.unwrap();
                assert_eq!(got, want[at as usize..at as usize + got.len()], "at {at}");
            }
            let mut rest = Vec::new();
            out.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "nothing past the end");
        });
    }

    /// A snapshot received into a file replaces another member's whole state: records,
    /// leases, auth, revision and position.
    #[test]
    fn a_snapshot_moves_through_a_file() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = state_with(da.path(), 500, 3000, 40);
        let b = state_with(db.path(), 20, 10, 3);
        let rt = rt();
        let incoming = rt
            .block_on(async {
                let (_, out) = Outgoing::start(a.clone()).await.unwrap();
                Incoming::copy_of(out, &b.snap_dir).await
            })
            .unwrap();
        let meta = b.install_file(&incoming.path, Install::Raft, None).unwrap();
        assert_eq!(meta.revision, 501);
        assert_eq!(contents(&b), contents(&a));
        assert_eq!(b.applied(), a.applied());
        assert!(b.auth.enabled());
        assert_eq!(
            b.engine.raft_get::<(String, Install)>(INSTALLING).unwrap(),
            None
        );
        let path = incoming.path.clone();
        drop(incoming);
        assert!(!path.exists(), "the received file goes with its handle");
    }

    /// A transfer sent again from its first byte (same snapshot ID) with fewer bytes leaves
    /// no tail of the first attempt in the file handed over for loading.
    #[test]
    fn a_resent_transfer_is_cut_to_its_own_length() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let mut i = Incoming::create(dir.path()).await.unwrap();
            i.write_all(&[1u8; 100]).await.unwrap();
            i.seek(SeekFrom::Start(0)).await.unwrap();
            i.write_all(&[2u8; 10]).await.unwrap();
            let part = i.path.clone();
            let path = i.into_installing(dir.path()).await.unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), vec![2u8; 10]);
            assert!(!part.exists());
            let mut i = Incoming::create(dir.path()).await.unwrap();
            i.write_all(b"abandoned").await.unwrap();
            let part = i.path.clone();
            drop(i);
            assert!(!part.exists(), "an abandoned transfer is removed");
        });
    }

    /// A cut or damaged snapshot is refused whole, before anything of the state it would
    /// replace is touched.
    #[test]
    fn a_damaged_snapshot_changes_nothing() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = state_with(da.path(), 50, 100, 40);
        let b = state_with(db.path(), 20, 10, 3);
        let before = contents(&b);
        let good = payload_of(&a);
        // A record's length (after the meta and the count) made huge.
        let meta_len = bincode::serialize(&a.view_at_applied(&a.engine).1)
            .unwrap()
            .len();
        let mut huge = good.clone();
        huge[meta_len + 8 + 16..meta_len + 8 + 24].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut record_count = good.clone();
        record_count[meta_len..meta_len + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut flipped = good.clone();
        // The KeyValue's first tag made field 0, which protobuf has not.
        flipped[meta_len + 8 + 24 + 1] = 0;
        let cases = [
            ("cut", good[..good.len() - 1].to_vec()),
            ("huge record", huge),
            ("record count", record_count),
            ("bad record", flipped),
            ("junk after", [good.as_slice(), b"junk"].concat()),
            ("lease twice", {
                let mut p = SnapshotPayload::decode(&good).unwrap();
                p.leases = vec![(7, 60), (7, 30)];
                p.encode().unwrap()
            }),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in cases {
            let path = db.path().join("bad.part");
            std::fs::write(&path, &bytes).unwrap();
            assert!(
                b.install_file(&path, Install::Raft, None).is_err(),
                "{what}"
            );
            assert_eq!(contents(&b), before, "{what}");
            assert_eq!(
                b.engine.raft_get::<(String, Install)>(INSTALLING).unwrap(),
                None
            );
        }
    }

    /// A load that a crash cut short (the state half replaced, the mark set) is finished
    /// from the received file at the next start; stale transfers are cleaned up.
    #[test]
    fn an_interrupted_load_finishes_at_start() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = state_with(da.path(), 200, 5000, 40);
        let want = contents(&a);
        let b = state_with(db.path(), 20, 10, 3);
        let snap_dir = b.snap_dir.clone();
        std::fs::create_dir_all(&snap_dir).unwrap();
        let file = snap_dir.join(INSTALLING_FILE);
        std::fs::write(&file, payload_of(&a)).unwrap();
        let stale = snap_dir.join("incoming-1-2.part");
        std::fs::write(&stale, b"cut").unwrap();
        {
            // Half replaced: some of the old records gone, a record of neither state there.
            b.engine
                .delete_records(&[Revision::new(2, 0), Revision::new(3, 0)])
                .unwrap();
            let rec = Record {
                kv: KeyValue::default(),
                tombstone: false,
            };
            let ws = WriteSet {
                records: vec![(Revision::new(9999, 0), rec)],
                ..Default::default()
            };
            let meta = b.engine.state_meta().unwrap();
            b.engine.write_state(&ws, &meta, None).unwrap();
            let mark = (INSTALLING_FILE.to_string(), Install::Raft);
            b.engine.raft_put(INSTALLING, &mark).unwrap();
            b.engine.persist_state().unwrap();
        }
        let engine = b.engine.clone();
        drop(b);
        let b = KvState::open(engine, 2, 1).unwrap();
        assert_eq!(contents(&b), want);
        assert_eq!(b.applied(), a.applied());
        assert!(!file.exists() && !stale.exists());
        assert_eq!(
            b.engine.raft_get::<(String, Install)>(INSTALLING).unwrap(),
            None
        );
    }
}
