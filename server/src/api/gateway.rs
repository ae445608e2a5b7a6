//! etcd's HTTP/JSON gateway on the client port: `POST /v3/kv/put` and the
//! rest of the paths etcd's grpc-gateway serves, for curl and other HTTP
//! clients. The JSON body is read as the method's request message (proto3
//! JSON: the .proto's field names or their lowerCamel forms, 64-bit integers
//! as strings or numbers, bytes in base64, unknown fields ignored), the call
//! goes to the gRPC service in-process, and the answer comes back as etcd's
//! gateway writes it: the .proto's field names, 64-bit integers as strings,
//! default values left out. An error is `{"error","message","code"}` with
//! the HTTP status grpc-gateway gives its gRPC code.
//!
//! The streaming methods (watch, lease keep-alive, snapshot) take every
//! JSON object in the body as a request, in order, and answer with one line
//! per reply, `{"result":...}`, or `{"error":{...}}` if the stream fails; a
//! watch or keep-alive stays open until the HTTP client goes away.

use std::convert::Infallible;
use std::sync::LazyLock;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BytesMut};
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use tonic::service::Routes;
use tonic::{Code, Status};
use tower::ServiceExt;

/// Descriptors of cairn's .proto files (written by build.rs).
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(
        include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin")).as_ref(),
    )
    .expect("the descriptor set build.rs wrote decodes")
});

/// Paths under `/v3/` and the gRPC methods they call (etcd's
/// `google.api.http` annotations). `maintenance/hash` is Hash: etcd
/// annotates HashKV with it too, and its gateway serves the first.
const ROUTES: &[(&str, &str, &str)] = &[
    ("kv/range", "KV", "Range"),
    ("kv/put", "KV", "Put"),
    ("kv/deleterange", "KV", "DeleteRange"),
    ("kv/txn", "KV", "Txn"),
    ("kv/compaction", "KV", "Compact"),
    ("watch", "Watch", "Watch"),
    ("lease/grant", "Lease", "LeaseGrant"),
    ("lease/revoke", "Lease", "LeaseRevoke"),
    ("kv/lease/revoke", "Lease", "LeaseRevoke"),
    ("lease/keepalive", "Lease", "LeaseKeepAlive"),
    ("lease/timetolive", "Lease", "LeaseTimeToLive"),
    ("kv/lease/timetolive", "Lease", "LeaseTimeToLive"),
    ("lease/leases", "Lease", "LeaseLeases"),
    ("kv/lease/leases", "Lease", "LeaseLeases"),
    ("cluster/member/add", "Cluster", "MemberAdd"),
    ("cluster/member/remove", "Cluster", "MemberRemove"),
    ("cluster/member/update", "Cluster", "MemberUpdate"),
    ("cluster/member/list", "Cluster", "MemberList"),
    ("cluster/member/promote", "Cluster", "MemberPromote"),
    ("maintenance/alarm", "Maintenance", "Alarm"),
    ("maintenance/status", "Maintenance", "Status"),
    ("maintenance/defragment", "Maintenance", "Defragment"),
    ("maintenance/hash", "Maintenance", "Hash"),
    ("maintenance/snapshot", "Maintenance", "Snapshot"),
    (
        "maintenance/transfer-leadership",
        "Maintenance",
        "MoveLeader",
    ),
    ("auth/enable", "Auth", "AuthEnable"),
    ("auth/disable", "Auth", "AuthDisable"),
    ("auth/status", "Auth", "AuthStatus"),
    ("auth/authenticate", "Auth", "Authenticate"),
    ("auth/user/add", "Auth", "UserAdd"),
    ("auth/user/get", "Auth", "UserGet"),
    ("auth/user/list", "Auth", "UserList"),
    ("auth/user/delete", "Auth", "UserDelete"),
    ("auth/user/changepw", "Auth", "UserChangePassword"),
    ("auth/user/grant", "Auth", "UserGrantRole"),
    ("auth/user/revoke", "Auth", "UserRevokeRole"),
    ("auth/role/add", "Auth", "RoleAdd"),
    ("auth/role/get", "Auth", "RoleGet"),
    ("auth/role/list", "Auth", "RoleList"),
    ("auth/role/delete", "Auth", "RoleDelete"),
    ("auth/role/grant", "Auth", "RoleGrantPermission"),
    ("auth/role/revoke", "Auth", "RoleRevokePermission"),
];

/// `POST /v3/{path}` for every path in [`ROUTES`], calling `grpc`, whose
/// requests may be up to `max_request` bytes.
pub fn router(grpc: Routes, max_request: usize) -> axum::Router {
    axum::Router::new()
        .route("/v3/{*path}", axum::routing::post(call))
        // Room for the largest request in base64 and JSON, so that one
        // over the limit meets etcd's error in the gRPC service rather
        // than an HTTP 413 here.
        .layer(axum::extract::DefaultBodyLimit::max(
            2 * max_request + (64 << 10),
        ))
        .with_state(grpc)
}

/// grpc-gateway's HTTP status for a gRPC code (its `HTTPStatusFromCode`).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A JSON string.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// An error as etcd's gateway writes it (its field order).
fn error(status: Status) -> Response {
    let m = quoted(status.message());
    let body = format!(
        r#"{{"error":{m},"message":{m},"code":{}}}"#,
        status.code() as i32
    );
    (
        http_status(status.code()),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A stream's failure, as the line etcd's gateway ends the stream with.
fn stream_error(status: &Status) -> Bytes {
    let http = http_status(status.code());
    Bytes::from(format!(
        r#"{{"error":{{"grpc_code":{},"http_code":{},"message":{},"http_status":{}}}}}"#,
        status.code() as i32,
        http.as_u16(),
        quoted(status.message()),
        quoted(http.canonical_reason().unwrap_or_default()),
    ))
}

/// Reads a request message from JSON and encodes it.
fn from_json<'de, D: serde::Deserializer<'de>>(
    desc: MessageDescriptor,
    json: D,
) -> Result<Vec<u8>, Status> {
    DynamicMessage::deserialize_with_options(
        desc,
        json,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .map(|m| m.encode_to_vec())
    .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Writes an encoded reply message as JSON.
fn to_json(desc: MessageDescriptor, bytes: &[u8]) -> Result<Vec<u8>, Status> {
    let reply = DynamicMessage::decode(desc, bytes).map_err(|e| Status::internal(e.to_string()))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    reply
        .serialize_with_options(
            &mut out,
            &SerializeOptions::new().use_proto_field_name(true),
        )
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(out.into_inner())
}

/// A gRPC message frame: the 5-byte prefix (uncompressed, length), then `msg`.
fn frame(msg: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(msg.len() + 5);
    f.push(0);
    f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    f.extend_from_slice(msg);
    Bytes::from(f)
}

/// Takes the first whole message off `buf`, if it holds one.
fn next_frame(buf: &mut BytesMut) -> Option<Result<Bytes, Status>> {
    if buf.len() < 5 {
        return None;
    }
    if buf[0] != 0 {
        return Some(Err(Status::internal("compressed gRPC reply")));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(Ok(buf.split_to(len).freeze()))
}

/// The failure a header map reports, if any (`grpc-status` other than 0).
fn failed(headers: &HeaderMap) -> Option<Status> {
    Status::from_header_map(headers).filter(|s| s.code() != Code::Ok)
}

/// Calls the gRPC method at `path` with `body`: the reply's body, or the
/// call's failure.
/// The HTTP `Authorization` header goes along as `authorization` metadata,
/// as etcd's gateway passes a token; nothing of the connection does (its
/// client certificate never names a user here, as in etcd).
async fn invoke(
    grpc: Routes,
    path: &str,
    body: tonic::body::Body,
    token: Option<&http::HeaderValue>,
) -> Result<tonic::body::Body, Status> {
    let mut req = http::Request::post(path)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers");
    if let Some(token) = token {
        req = req.header("authorization", token);
    }
    let req = req
        .body(body)
        .map_err(|e| Status::internal(e.to_string()))?;
    let resp = grpc
        .oneshot(req)
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    match failed(&parts.headers) {
        Some(status) => Err(status),
        None => Ok(body),
    }
}

async fn call(
    State(grpc): State<Routes>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = headers.get(header::AUTHORIZATION);
    let Some(&(_, service, method)) = ROUTES.iter().find(|(p, _, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "Not Found\n").into_response();
    };
    let full = format!("etcdserverpb.{service}");
    let Some(desc) = POOL
        .get_service_by_name(&full)
        .and_then(|s| s.methods().find(|m| m.name() == method))
    else {
        return error(Status::unimplemented(format!("unknown service {full}")));
    };
    let path = format!("/{full}/{method}");
    if desc.is_client_streaming() || desc.is_server_streaming() {
        return stream(grpc, &path, desc, body, token).await;
    }
    let reply = async {
        let mut json = serde_json::Deserializer::from_slice(&body);
        let request = from_json(desc.input(), &mut json)?;
        json.end()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let body = tonic::body::Body::new(Full::new(frame(&request)));
        let collected = invoke(grpc, &path, body, token)
            .await?
            .collect()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if let Some(status) = collected.trailers().and_then(failed) {
            return Err(status);
        }
        let mut data = BytesMut::from(collected.to_bytes());
        let msg =
            next_frame(&mut data).unwrap_or_else(|| Err(Status::internal("no gRPC reply")))?;
        to_json(desc.output(), &msg)
    };
    match reply.await {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(status) => error(status),
    }
}

/// A streaming method: every JSON object in `body` is a request; each reply
/// is a line. A client stream stays open (the server keeps answering, as
/// etcd's does after a client's half-close) until the HTTP client leaves.
async fn stream(
    grpc: Routes,
    path: &str,
    desc: MethodDescriptor,
    body: Bytes,
    token: Option<&http::HeaderValue>,
) -> Response {
    let mut requests = Vec::new();
    for value in serde_json::Deserializer::from_slice(&body).into_iter::<serde_json::Value>() {
        match value
            .map_err(|e| Status::invalid_argument(e.to_string()))
            .and_then(|v| from_json(desc.input(), v))
        {
            Ok(m) => requests.push(Ok::<_, Infallible>(http_body::Frame::data(frame(&m)))),
            Err(status) => return error(status),
        }
    }
    let sent = futures::stream::iter(requests);
    let body = if desc.is_client_streaming() {
        tonic::body::Body::new(StreamBody::new(sent.chain(futures::stream::pending())))
    } else {
        tonic::body::Body::new(StreamBody::new(sent))
    };
    let body = match invoke(grpc, path, body, token).await {
        Ok(body) => body,
        Err(status) => return error(status),
    };
    let output = desc.output();
    // State: the reply body and the bytes not yet making a whole message;
    // None once the stream has ended with an error.
    let lines = futures::stream::unfold(Some((body, BytesMut::new())), move |state| {
        let output = output.clone();
        async move {
            let (mut body, mut buf) = state?;
            loop {
                if let Some(msg) = next_frame(&mut buf) {
                    return Some(match msg.and_then(|m| to_json(output, &m)) {
                        Ok(json) => {
                            let mut line = b"{\"result\":".to_vec();
                            line.extend_from_slice(&json);
                            line.extend_from_slice(b"}\n");
                            (Ok::<_, Infallible>(Bytes::from(line)), Some((body, buf)))
                        }
                        Err(status) => (Ok(stream_error(&status)), None),
                    });
                }
                match body.frame().await? {
                    Ok(f) => match f.into_data() {
                        Ok(data) => buf.extend_from_slice(&data),
                        Err(f) => {
                            let status = f.trailers_ref().and_then(failed)?;
                            return Some((Ok(stream_error(&status)), None));
                        }
                    },
                    Err(e) => {
                        return Some((Ok(stream_error(&Status::internal(e.to_string()))), None))
                    }
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}
