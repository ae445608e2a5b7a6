//! `cairn-operator serve-store`: serves a directory (the mounted claim) with [`super`]'s
//! protocol. What it owns: the files below its root. What it must not do: hold an object or a
//! part in memory (bodies stream to and from disk), answer without the token, or let a key
//! reach outside the root.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{check_key, check_upload, decode_key, Complete, Listed, MAX_PARTS};

/// Below the root: the parts of uploads in progress, one directory per upload.
const UPLOADS: &str = ".uploads";
/// How long an upload's parts, or a write's temporary file, outlive a client that went away.
const ABANDONED: Duration = Duration::from_secs(24 * 3600);
/// The size of the chunks an object is sent in.
const CHUNK: usize = 64 << 10;
/// The shortest token accepted.
const MIN_TOKEN: usize = 16;

struct State {
    root: PathBuf,
    token: String,
}

/// A failed request: its status and message (sent as text).
type Failure = (StatusCode, String);

/// Serves `root` on `listener` until `shutdown` completes. Refuses a token shorter than 16
/// characters. Parts of uploads and temporary files abandoned for a day are removed at start
/// and hourly.
pub async fn serve(
    root: PathBuf,
    token: String,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    if token.len() < MIN_TOKEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the store's token must have at least {MIN_TOKEN} characters"),
        ));
    }
    tokio::fs::create_dir_all(root.join(UPLOADS)).await?;
    let state = Arc::new(State { root, token });
    let sweeper = {
        let root = state.root.clone();
        tokio::spawn(async move {
            loop {
                sweep(&root).await;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        })
    };
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let s = state.clone();
        async move { handle(&s, req).await }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    served
}

async fn handle(s: &State, req: Request<Body>) -> Response<Body> {
    if !authorized(&s.token, req.headers()) {
        return text(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required".into(),
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match route(s, &method, &path, req).await {
        Ok(r) => r,
        Err((code, msg)) => {
            if code.is_server_error() {
                tracing::warn!(%method, %path, status = %code, error = %msg, "store request failed");
            }
            text(code, msg)
        }
    }
}

fn authorized(token: &str, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compared in time independent of where they differ.
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn route(
    s: &State,
    method: &Method,
    path: &str,
    req: Request<Body>,
) -> Result<Response<Body>, Failure> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let not_allowed = || {
        Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} {path} is not served"),
        ))
    };
    if let Some(rest) = path.strip_prefix("/o/") {
        let key = decode_key(rest).map_err(bad)?;
        return match *method {
            Method::GET => get(&s.root, &key, req.headers(), false).await,
            Method::HEAD => get(&s.root, &key, req.headers(), true).await,
            Method::PUT => put(&s.root, &key, req.into_body()).await,
            Method::DELETE => delete(&s.root, &key).await,
            _ => not_allowed(),
        };
    }
    if path == "/list" || path.starts_with("/list/") {
        if *method != Method::GET {
            return not_allowed();
        }
        let prefix = match path.strip_prefix("/list/").map(|p| p.trim_end_matches('/')) {
            Some(p) if !p.is_empty() => Some(decode_key(p).map_err(bad)?),
            _ => None,
        };
        return list(&s.root, prefix).await;
    }
    if let Some(rest) = path.strip_prefix("/u/") {
        let (id, part) = match rest.split_once('/') {
            Some((id, part)) => (id, Some(part)),
            None => (rest, None),
        };
        if !check_upload(id) {
            return Err(bad(format!("{id:?} is not an upload id")));
        }
        let dir = s.root.join(UPLOADS).join(id);
        return match (method, part) {
            (&Method::PUT, Some(p)) => {
                let n = p
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PARTS).contains(n))
                    .ok_or_else(|| bad(format!("part {p:?}: a number from 1 to {MAX_PARTS}")))?;
                put_part(&dir, n, req.into_body()).await
            }
            (&Method::POST, None) => complete(&s.root, &dir, req.into_body()).await,
            (&Method::DELETE, None) => match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(empty(StatusCode::NO_CONTENT)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(empty(StatusCode::NO_CONTENT)),
                Err(e) => Err(failed(e)),
            },
            _ => not_allowed(),
        };
    }
    Err((StatusCode::NOT_FOUND, format!("no such path {path}")))
}

fn text(code: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Body::from(msg));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}

/// An I/O error as a response: a missing file is 404, a full volume 507.
fn failed(e: io::Error) -> Failure {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
        io::ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        // `a/b` where `a` is an object: no such object.
        io::ErrorKind::NotADirectory => StatusCode::NOT_FOUND,
        io::ErrorKind::IsADirectory => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, e.to_string())
}

fn modified_ms(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map_or(0, |t| t.as_millisecond())
}

fn etag(m: &std::fs::Metadata) -> String {
    let nanos = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("\"{nanos:x}-{:x}\"", m.len())
}

/// A `Range` header of one range against an object of `size` bytes: the bytes `[start, end)`.
fn parse_range(v: &str, size: u64) -> Result<(u64, u64), Failure> {
    let unsatisfiable = || {
        Err((
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("range {v:?} of {size} bytes"),
        ))
    };
    let spec = v
        .strip_prefix("bytes=")
        .filter(|s| !s.contains(','))
        .ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("range {v:?}: one byte range"),
            )
        })?;
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| (StatusCode::BAD_REQUEST, format!("range {v:?}")))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| (StatusCode::BAD_REQUEST, format!("range {v:?}")))
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // The last n bytes.
        (true, false) => {
            let n = num(b)?;
            if n == 0 || size == 0 {
                return unsatisfiable();
            }
            Ok((size - n.min(size), size))
        }
        (false, true) => {
            let start = num(a)?;
            if start >= size {
                return unsatisfiable();
            }
            Ok((start, size))
        }
        (false, false) => {
            let (start, last) = (num(a)?, num(b)?);
            if start > last || start >= size {
                return unsatisfiable();
            }
            // `start < size`, so `size - 1` does not wrap, nor does the `+ 1`.
            Ok((start, last.min(size - 1) + 1))
        }
        (true, true) => Err((StatusCode::BAD_REQUEST, format!("range {v:?}"))),
    }
}

async fn get(
    root: &Path,
    key: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response<Body>, Failure> {
    let file = root.join(key);
    no_symlinks(root, key).await?;
    // Opened first, its metadata from the handle: the length, ETag and bytes are of one
    // version even if a PUT replaces the object meanwhile.
    let mut f = tokio::fs::File::open(&file).await.map_err(failed)?;
    let meta = f.metadata().await.map_err(failed)?;
    if !meta.is_file() {
        return Err((StatusCode::NOT_FOUND, "no such object".into()));
    }
    let size = meta.len();
    let range = match headers.get(header::RANGE) {
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| (StatusCode::BAD_REQUEST, "range: not text".to_string()))?;
            match parse_range(v, size) {
                Ok(r) => Some(r),
                Err((StatusCode::RANGE_NOT_SATISFIABLE, msg)) => {
                    let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, msg);
                    if let Ok(v) = format!("bytes */{size}").parse() {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(r);
                }
                Err(e) => return Err(e),
            }
        }
        None => None,
    };
    let (start, end) = range.unwrap_or((0, size));
    let modified = modified_ms(&meta);
    let mut b = Response::builder()
        .header(header::CONTENT_LENGTH, end - start)
        .header(header::ETAG, etag(&meta))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(super::client::MODIFIED_HEADER, modified)
        .header(
            header::LAST_MODIFIED,
            jiff::Timestamp::from_millisecond(modified)
                .unwrap_or_default()
                .strftime("%a, %d %b %Y %H:%M:%S GMT")
                .to_string(),
        );
    b = match range {
        Some(_) => b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        ),
        None => b.status(StatusCode::OK),
    };
    let body = if head {
        Body::empty()
    } else {
        f.seek(io::SeekFrom::Start(start)).await.map_err(failed)?;
        Body::from_stream(futures::stream::unfold(
            (f, end - start),
            |(mut f, left)| async move {
                if left == 0 {
                    return None;
                }
                let mut buf = vec![0u8; CHUNK.min(left as usize)];
                match f.read(&mut buf).await {
                    Ok(0) => Some((
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the object shrank while it was read",
                        )),
                        (f, 0),
                    )),
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(bytes::Bytes::from(buf)), (f, left - n as u64)))
                    }
                    Err(e) => Some((Err(e), (f, 0))),
                }
            },
        ))
    };
    b.body(body)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Refuses a key any of whose existing components (directories, the object) is a symbolic
/// link: the server reads and writes below its root only, even on a claim others write to.
async fn no_symlinks(root: &Path, key: &str) -> Result<(), Failure> {
    let mut path = root.to_path_buf();
    for seg in key.split('/') {
        path.push(seg);
        match tokio::fs::symlink_metadata(&path).await {
            Ok(m) if m.file_type().is_symlink() => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("key {key:?}: a symbolic link is in its way"),
                ))
            }
            Ok(_) => {}
            // The rest does not exist yet (a PUT makes it).
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// A temporary file next to `file` (its name starts with `.`: never addressed or listed).
fn temporary(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.with_file_name(format!(".{name}.{:032x}", rand::random::<u128>()))
}

/// Writes `body` to `path`, fsynced if `sync`. Returns its length.
async fn write_body(path: &Path, body: Body, sync: bool) -> io::Result<u64> {
    let mut f = tokio::fs::File::create(path).await?;
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(io::Error::other)?;
        f.write_all(&chunk).await?;
        n += chunk.len() as u64;
    }
    if sync {
        f.sync_all().await?;
    }
    Ok(n)
}

/// Renames the written `tmp` to `file` and fsyncs their directory: the object is then whole
/// and durable, and before it was absent (or the old one).
async fn install(tmp: &Path, file: &Path) -> io::Result<()> {
    tokio::fs::rename(tmp, file).await?;
    let dir = file.parent().unwrap_or(Path::new("/"));
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// The directory an object goes in, made if missing; an object where a directory of the key
/// is (or the other way round) is a conflict.
async fn prepare(file: &Path) -> Result<(), Failure> {
    if tokio::fs::metadata(file).await.is_ok_and(|m| m.is_dir()) {
        return Err((
            StatusCode::CONFLICT,
            "a key below this one exists".to_string(),
        ));
    }
    let dir = file.parent().unwrap_or(Path::new("/"));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => (
                StatusCode::CONFLICT,
                "an object is where a directory of the key would be".to_string(),
            ),
            _ => failed(e),
        })
}

fn stored(file: &Path) -> Result<Response<Body>, Failure> {
    let meta = std::fs::metadata(file).map_err(failed)?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::ETAG, etag(&meta))
        .body(Body::empty())
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn put(root: &Path, key: &str, body: Body) -> Result<Response<Body>, Failure> {
    no_symlinks(root, key).await?;
    let file = &root.join(key);
    prepare(file).await?;
    let tmp = temporary(file);
    let written = async {
        write_body(&tmp, body, true).await?;
        install(&tmp, file).await
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(failed(e));
    }
    stored(file)
}

async fn delete(root: &Path, key: &str) -> Result<Response<Body>, Failure> {
    no_symlinks(root, key).await?;
    let file = &root.join(key);
    if tokio::fs::metadata(file).await.is_ok_and(|m| m.is_dir()) {
        return Err((StatusCode::NOT_FOUND, "no such object".into()));
    }
    tokio::fs::remove_file(file).await.map_err(failed)?;
    let dir = file.parent().unwrap_or(Path::new("/"));
    tokio::fs::File::open(dir)
        .await
        .map_err(failed)?
        .sync_all()
        .await
        .map_err(failed)?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// Every object below `prefix` (all of them with none), sorted by key.
async fn list(root: &Path, prefix: Option<String>) -> Result<Response<Body>, Failure> {
    let start = prefix.as_ref().map_or(root.to_path_buf(), |p| root.join(p));
    let mut out = Vec::new();
    let mut stack = vec![(start, prefix.unwrap_or_default())];
    while let Some((dir, key)) = stack.pop() {
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(rd) => rd,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(e) => return Err(failed(e)),
        };
        while let Some(entry) = entries.next_entry().await.map_err(failed)? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let child = if key.is_empty() {
                name.to_string()
            } else {
                format!("{key}/{name}")
            };
            // A name no key could have (put there by something else) is not listed.
            if check_key(&child).is_err() {
                continue;
            }
            // Symbolic links are neither followed nor listed.
            let kind = match entry.file_type().await {
                Ok(k) => k,
                // Deleted since it was read (retention running): not listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed(e)),
            };
            if kind.is_dir() {
                stack.push((entry.path(), child));
            } else if kind.is_file() {
                let m = match entry.metadata().await {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(failed(e)),
                };
                out.push(Listed {
                    key: child,
                    size: m.len(),
                    modified_ms: modified_ms(&m),
                    etag: etag(&m),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    let body =
        serde_json::to_vec(&out).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

async fn put_part(dir: &Path, n: usize, body: Body) -> Result<Response<Body>, Failure> {
    tokio::fs::create_dir_all(dir).await.map_err(failed)?;
    let part = dir.join(n.to_string());
    let tmp = temporary(&part);
    // Not fsynced: the completion fsyncs the object the parts are joined into.
    let written = async {
        write_body(&tmp, body, false).await?;
        tokio::fs::rename(&tmp, &part).await
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(failed(e));
    }
    Ok(empty(StatusCode::OK))
}

async fn complete(root: &Path, dir: &Path, body: Body) -> Result<Response<Body>, Failure> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let body = axum::body::to_bytes(body, 4096)
        .await
        .map_err(|e| bad(e.to_string()))?;
    let c: Complete = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    check_key(&c.to).map_err(bad)?;
    // No parts: an empty object (object_store's contract).
    if c.parts > MAX_PARTS {
        return Err(bad(format!("{} parts: at most {MAX_PARTS}", c.parts)));
    }
    no_symlinks(root, &c.to).await?;
    let file = root.join(&c.to);
    prepare(&file).await?;
    let tmp = temporary(&file);
    let joined = async {
        let mut out = tokio::fs::File::create(&tmp).await.map_err(failed)?;
        for n in 1..=c.parts {
            let mut part = match tokio::fs::File::open(dir.join(n.to_string())).await {
                Ok(p) => p,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err((
                        StatusCode::CONFLICT,
                        format!("part {n} of {} was not uploaded", c.parts),
                    ))
                }
                Err(e) => return Err(failed(e)),
            };
            tokio::io::copy(&mut part, &mut out).await.map_err(failed)?;
        }
        out.sync_all().await.map_err(failed)?;
        install(&tmp, &file).await.map_err(failed)
    }
    .await;
    if let Err(e) = joined {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    let _ = tokio::fs::remove_dir_all(dir).await;
    stored(&file)
}

/// Removes uploads and temporary files abandoned for longer than [`ABANDONED`].
async fn sweep(root: &Path) {
    let old = |m: &std::fs::Metadata| {
        m.modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ABANDONED)
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
            continue;
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let Ok(m) = entry.metadata().await else {
                continue;
            };
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if path == root.join(UPLOADS) {
                let Ok(mut uploads) = tokio::fs::read_dir(&path).await else {
                    continue;
                };
                while let Ok(Some(u)) = uploads.next_entry().await {
                    if u.metadata().await.is_ok_and(|m| old(&m)) {
                        let _ = tokio::fs::remove_dir_all(u.path()).await;
                    }
                }
            } else if m.is_dir() {
                stack.push(path);
            } else if hidden && m.is_file() && old(&m) {
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let ok = |v: &str, size| parse_range(v, size).unwrap();
        let code = |v: &str, size| parse_range(v, size).unwrap_err().0;
        assert_eq!(ok("bytes=0-9", 100), (0, 10));
        assert_eq!(ok("bytes=90-200", 100), (90, 100));
        assert_eq!(ok("bytes=10-", 100), (10, 100));
        assert_eq!(ok("bytes=-10", 100), (90, 100));
        assert_eq!(ok("bytes=-200", 100), (0, 100));
        assert_eq!(ok(&format!("bytes=0-{}", u64::MAX), 100), (0, 100));
        assert_eq!(ok(&format!("bytes=99-{}", u64::MAX), 100), (99, 100));
        assert_eq!(code("bytes=0-0", 0), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(code("bytes=100-", 100), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(code("bytes=5-4", 100), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(code("bytes=-0", 100), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(code("bytes=0-1,3-4", 100), StatusCode::BAD_REQUEST);
        assert_eq!(code("bytes=-", 100), StatusCode::BAD_REQUEST);
        assert_eq!(code("bytes=a-b", 100), StatusCode::BAD_REQUEST);
        assert_eq!(code("items=0-1", 100), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_token_must_match_exactly() {
        let mut h = HeaderMap::new();
        let token = "0123456789abcdef";
        assert!(!authorized(token, &h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdeX".parse().unwrap(),
        );
        assert!(!authorized(token, &h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcde".parse().unwrap(),
        );
        assert!(!authorized(token, &h));
        h.insert(
            header::AUTHORIZATION,
            "Basic 0123456789abcdef".parse().unwrap(),
        );
        assert!(!authorized(token, &h));
        h.insert(
            header::AUTHORIZATION,
            "Bearer 0123456789abcdef".parse().unwrap(),
        );
        assert!(authorized(token, &h));
    }
}
