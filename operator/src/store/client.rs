//! The store server ([`super::server`]) as an `object_store::ObjectStore`, so that backups,
//! retention, restores and verifications use it as they use S3. Copies and conditional writes
//! are not offered (nothing here uses them).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, UploadPart,
};

use super::{check_key, encode_key, Complete, Listed};

/// The header with an object's last modification in milliseconds since the Unix epoch.
pub const MODIFIED_HEADER: &str = "x-cairn-modified-ms";
const STORE: &str = "cairn store";

/// A store server at a base URL, reached with a bearer token.
#[derive(Clone)]
pub struct PvcStore {
    inner: Arc<Inner>,
}

struct Inner {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl fmt::Debug for PvcStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.debug_struct("PvcStore")
            .field("base", &self.inner.base)
            .finish()
    }
}

impl fmt::Display for PvcStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cairn store at {}", self.inner.base)
    }
}

/// A failed request as object_store's error: a missing object is `NotFound`.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {status}: {message}")]
struct Refused {
    what: String,
    status: reqwest::StatusCode,
    message: String,
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

impl PvcStore {
    /// The store at `base` (`http://cairn-store-backups:8080`), asked with `token`.
    pub fn new(base: &str, token: &str) -> Result<Self, String> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!("store URL {base:?}: http:// or https://"));
        }
        if token.is_empty() {
            return Err("the store's token is empty".into());
        }
        // A server that stops answering mid-transfer fails the request after a minute
        // without a byte, rather than holding a reconcile or a Job for good.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PvcStore {
            inner: Arc::new(Inner {
                base: base.trim_end_matches('/').to_string(),
                token: token.to_string(),
                http,
            }),
        })
    }
}

impl Inner {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// Sends `req`; a status other than success is an error (`NotFound` for 404 on `key`).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
        key: Option<&str>,
    ) -> object_store::Result<reqwest::Response> {
        let resp = req.send().await.map_err(generic)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let message: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(512)
            .collect();
        let refused = Refused {
            what: what.to_string(),
            status,
            message,
        };
        Err(match (status, key) {
            (reqwest::StatusCode::NOT_FOUND, Some(k)) => object_store::Error::NotFound {
                path: k.to_string(),
                source: Box::new(refused),
            },
            _ => generic(refused),
        })
    }
}

fn key_of(location: &Path) -> object_store::Result<String> {
    let key = location.as_ref().to_string();
    check_key(&key).map_err(|m| generic(std::io::Error::other(m)))?;
    Ok(key)
}

fn body(payload: PutPayload) -> reqwest::Body {
    let chunks: Vec<Bytes> = payload.into_iter().collect();
    reqwest::Body::wrap_stream(futures::stream::iter(
        chunks.into_iter().map(Ok::<Bytes, std::io::Error>),
    ))
}

/// A response's ETag, if it has one.
fn etag(h: &reqwest::header::HeaderMap) -> Option<String> {
    h.get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// What a PUT or an upload's completion answered.
fn put_result(resp: &reqwest::Response) -> PutResult {
    PutResult {
        e_tag: etag(resp.headers()),
        version: None,
        extensions: Default::default(),
    }
}

fn meta(l: Listed) -> object_store::Result<ObjectMeta> {
    Ok(ObjectMeta {
        location: Path::parse(&l.key)?,
        last_modified: chrono::DateTime::from_timestamp_millis(l.modified_ms).unwrap_or_default(),
        size: l.size,
        e_tag: Some(l.etag),
        version: None,
    })
}

#[async_trait]
impl ObjectStore for PvcStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if opts.mode != PutMode::Overwrite {
            return Err(object_store::Error::NotImplemented {
                operation: "a put other than an overwrite".into(),
                implementer: self.to_string(),
            });
        }
        let key = key_of(location)?;
        let len = payload.content_length();
        let req = self
            .inner
            .request(reqwest::Method::PUT, &format!("/o/{}", encode_key(&key)))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body(payload));
        let resp = self.inner.send(req, &format!("PUT {key}"), None).await?;
        Ok(put_result(&resp))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(Upload {
            inner: self.inner.clone(),
            to: key_of(location)?,
            id: format!("{:032x}", rand::random::<u128>()),
            parts: 0,
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let key = key_of(location)?;
        let method = if options.head {
            reqwest::Method::HEAD
        } else {
            reqwest::Method::GET
        };
        let mut req = self
            .inner
            .request(method, &format!("/o/{}", encode_key(&key)));
        if let Some(r) = &options.range {
            let header = match r {
                GetRange::Bounded(r) if r.start >= r.end => {
                    return Err(generic(std::io::Error::other(format!(
                        "GET {key}: empty range {r:?}"
                    ))))
                }
                GetRange::Bounded(r) => format!("bytes={}-{}", r.start, r.end - 1),
                GetRange::Offset(o) => format!("bytes={o}-"),
                GetRange::Suffix(n) => format!("bytes=-{n}"),
            };
            req = req.header(reqwest::header::RANGE, header);
        }
        let resp = self
            .inner
            .send(req, &format!("GET {key}"), Some(&key))
            .await?;
        let h = resp.headers();
        let num = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        let length = num(reqwest::header::CONTENT_LENGTH.as_str()).unwrap_or(0);
        // `bytes <start>-<last>/<size>` for a range, else the whole object.
        let (range, size) = match h
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split_once('/'))
            .and_then(|(span, size)| {
                let (a, b) = span.split_once('-')?;
                Some((
                    a.parse::<u64>().ok()?,
                    b.parse::<u64>().ok()?,
                    size.parse::<u64>().ok()?,
                ))
            }) {
            Some((a, b, size)) => (a..b.saturating_add(1), size),
            None => (0..length, length),
        };
        let meta = ObjectMeta {
            location: location.clone(),
            last_modified: h
                .get(MODIFIED_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(chrono::DateTime::from_timestamp_millis)
                .unwrap_or_default(),
            size,
            e_tag: etag(h),
            version: None,
        };
        let stream = if options.head {
            futures::stream::empty().boxed()
        } else {
            resp.bytes_stream().map_err(generic).boxed()
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(stream),
            meta,
            range,
            attributes: Attributes::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let inner = self.inner.clone();
        locations
            .map(move |location| {
                let inner = inner.clone();
                async move {
                    let location = location?;
                    let key = key_of(&location)?;
                    let req =
                        inner.request(reqwest::Method::DELETE, &format!("/o/{}", encode_key(&key)));
                    match inner.send(req, &format!("DELETE {key}"), Some(&key)).await {
                        // Already gone is gone, as on S3.
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(location),
                        Err(e) => Err(e),
                    }
                }
            })
            .buffered(4)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = self.inner.clone();
        let prefix = prefix.map(|p| p.as_ref().to_string());
        futures::stream::once(async move {
            let path = match prefix.as_deref().filter(|p| !p.is_empty()) {
                Some(p) => {
                    check_key(p).map_err(|m| generic(std::io::Error::other(m)))?;
                    format!("/list/{}", encode_key(p))
                }
                None => "/list".to_string(),
            };
            let req = inner.request(reqwest::Method::GET, &path);
            let resp = inner.send(req, "LIST", None).await?;
            let body = resp.bytes().await.map_err(generic)?;
            let listed: Vec<Listed> = serde_json::from_slice(&body).map_err(generic)?;
            let metas: Vec<object_store::Result<ObjectMeta>> =
                listed.into_iter().map(meta).collect();
            Ok::<_, object_store::Error>(futures::stream::iter(metas))
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let all: Vec<ObjectMeta> = self.list(prefix).try_collect().await?;
        let depth = prefix.map_or(0, |p| p.parts().count());
        let mut common_prefixes: Vec<Path> = Vec::new();
        let mut objects = Vec::new();
        for m in all {
            let parts: Vec<_> = m.location.parts().collect();
            if parts.len() == depth + 1 {
                objects.push(m);
            } else if parts.len() > depth + 1 {
                let p = Path::from_iter(parts.into_iter().take(depth + 1));
                if common_prefixes.last() != Some(&p) {
                    common_prefixes.push(p);
                }
            }
        }
        common_prefixes.dedup();
        Ok(ListResult {
            common_prefixes,
            objects,
            extensions: Default::default(),
        })
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _o: CopyOptions,
    ) -> object_store::Result<()> {
        Err(object_store::Error::NotImplemented {
            operation: "copy".into(),
            implementer: self.to_string(),
        })
    }
}

/// A multipart upload: parts sent as they come (in any order), joined on completion.
struct Upload {
    inner: Arc<Inner>,
    to: String,
    id: String,
    parts: usize,
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload")
            .field("to", &self.to)
            .field("id", &self.id)
            .field("parts", &self.parts)
            .finish()
    }
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.parts += 1;
        let n = self.parts;
        let inner = self.inner.clone();
        let id = self.id.clone();
        Box::pin(async move {
            let len = data.content_length();
            let req = inner
                .request(reqwest::Method::PUT, &format!("/u/{id}/{n}"))
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body(data));
            inner.send(req, &format!("part {n}"), None).await?;
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        let c = Complete {
            to: self.to.clone(),
            parts: self.parts,
        };
        let req = self
            .inner
            .request(reqwest::Method::POST, &format!("/u/{}", self.id))
            .body(serde_json::to_vec(&c).map_err(generic)?);
        let resp = self
            .inner
            .send(req, &format!("completing {}", self.to), None)
            .await?;
        Ok(put_result(&resp))
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let req = self
            .inner
            .request(reqwest::Method::DELETE, &format!("/u/{}", self.id));
        self.inner
            .send(req, &format!("aborting {}", self.to), None)
            .await?;
        Ok(())
    }
}
