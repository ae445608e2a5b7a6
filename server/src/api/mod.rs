//! The client-facing API: one module per etcd gRPC service, plus the HTTP
//! endpoints (`/health`, `/livez`, `/readyz`, `/metrics`, `/version`) on the
//! same port, as etcd serves them.

pub mod auth;
mod authority;
pub mod cluster;
pub mod gateway;
mod incoming;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod peer;

pub mod watch;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::try_join_all;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpSocket};
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tracing::info;

use crate::error::{Error, Result};
use crate::proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use crate::server::{EtcdServer, ETCD_CLUSTER_VERSION, ETCD_VERSION};

/// Who makes `req`: the token it carries (etcd's `token` metadata, or
/// `authorization` as etcd's gateway passes it) or the common name of its
/// connection's client certificate (see [`EtcdServer::caller`]).
pub(crate) async fn caller<T>(
    s: &EtcdServer,
    req: &tonic::Request<T>,
) -> Result<Option<crate::auth::AuthInfo>, tonic::Status> {
    let token = token_of(req.metadata())?;
    let cn = req
        .extensions()
        .get::<authority::ClientConn>()
        .and_then(|c| c.common_name.as_deref());
    Ok(s.caller(token, cn).await?)
}

/// The token in a request's metadata; one that is not text is invalid (it
/// does not fall back to the certificate's user).
pub(crate) fn token_of(md: &tonic::metadata::MetadataMap) -> Result<Option<&str>, tonic::Status> {
    match md.get("token").or_else(|| md.get("authorization")) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| Error::InvalidAuthToken.into()),
    }
}

/// gRPC allows this much above `--max-request-bytes` (etcd's `grpcOverheadBytes`).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

async fn health(State(s): State<Arc<EtcdServer>>) -> impl IntoResponse {
    let (code, body) = if s.raft_stopped().is_some() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"health":"false","reason":"RAFT STOPPED"}"#,
        )
    } else if s.leader() == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"health":"false","reason":"RAFT NO LEADER"}"#,
        )
    } else if !s.alarms().is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"health":"false","reason":"ALARM ACTIVE"}"#,
        )
    } else {
        (StatusCode::OK, r#"{"health":"true","reason":""}"#)
    };
    (code, [("content-type", "application/json")], body)
}

async fn livez(State(s): State<Arc<EtcdServer>>) -> impl IntoResponse {
    match s.raft_stopped() {
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]raft failed: raft stopped\n",
        ),
        None => (StatusCode::OK, "ok\n"),
    }
}

/// etcd's `/readyz`; with the query `voter` (`/readyz?voter`, cairn's own) also
/// "a voter that has caught up" (see [`EtcdServer::not_caught_up`]), for the
/// readiness probe of members behind a Service: a learner then gets no client
/// traffic. A query, not a path, so that releases before it (which ignore the
/// query) keep answering a probe configured with it.
async fn readyz(
    State(s): State<Arc<EtcdServer>>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    // `voter`, `voter=true` or `voter=1` (as Go reads a boolean query); `voter=false` is off.
    let voter = query.as_deref().is_some_and(|q| {
        q.split('&').any(|kv| match kv.split_once('=') {
            None => kv == "voter",
            Some((k, v)) => {
                k == "voter" && !matches!(v, "false" | "0" | "f" | "F" | "FALSE" | "False")
            }
        })
    });
    let plain = etcd_readyz(&s);
    if voter && plain.0 == StatusCode::OK {
        if let Some(why) = s.not_caught_up().await {
            return (StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        }
    }
    plain.into_response()
}

fn etcd_readyz(s: &EtcdServer) -> (StatusCode, &'static str) {
    if s.raft_stopped().is_some() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]raft failed: raft stopped\n",
        )
    } else if s.leader() == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "[-]serializable_read failed: no leader\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn metrics(State(s): State<Arc<EtcdServer>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// etcd's two fields, and cairn's own: its release and the data format it keeps its data
/// directory in (see [`crate::storage::DATA_FORMAT`]), which the operator reads before and
/// after upgrading a member.
async fn version() -> impl IntoResponse {
    (
        [("content-type", "application/json")],
        format!(
            r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}","cairnserver":"{}","cairndataformat":"{}"}}"#,
            env!("CARGO_PKG_VERSION"),
            crate::storage::DATA_FORMAT
        ),
    )
}

fn http_router(s: Arc<EtcdServer>) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .with_state(s)
}

/// A path nothing here serves: a gRPC call gets gRPC's Unimplemented with
/// the message etcd's Go gRPC server gives (`unknown service ...`), not an
/// HTTP 404 the client can only report as a transport error; anything else
/// gets Go's plain 404.
async fn not_served(req: axum::extract::Request) -> axum::response::Response {
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
    }
    let service = req.uri().path().trim_start_matches('/');
    let service = service.split('/').next().unwrap_or_default();
    let (parts, ()) = tonic::Status::unimplemented(format!("unknown service {service}"))
        .into_http::<()>()
        .into_parts();
    axum::response::Response::from_parts(parts, axum::body::Body::empty())
}

/// The client port: gRPC, etcd's HTTP/JSON gateway, health and metrics.
fn client_routes(s: Arc<EtcdServer>) -> Routes {
    let max_recv = s.cfg.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let grpc = grpc_routes(s.clone(), max_recv);
    let http = http_router(s).merge(gateway::router(grpc.clone(), max_recv));
    Routes::from(grpc.into_axum_router().merge(http))
}

/// Every gRPC service of the client port, receiving messages of up to
/// `max_recv` bytes, and [`not_served`] for the rest.
fn grpc_routes(s: Arc<EtcdServer>, max_recv: usize) -> Routes {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Serving as soon as the listeners are up (requests wait for a leader); not serving once
    // the Raft core stopped.
    let mut raft = s.raft.metrics();
    tokio::spawn(async move {
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        if raft.wait_for(|m| m.running_state.is_err()).await.is_ok() {
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    });
    Routes::from(axum::Router::new().fallback(not_served))
        .add_service(
            KvServer::new(kv::KvService::new(s.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            WatchServer::new(watch::WatchService::new(s.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            LeaseServer::new(Arc::new(lease::LeaseService::new(s.clone())))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            ClusterServer::new(cluster::ClusterService::new(s.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            MaintenanceServer::new(maintenance::MaintenanceService::new(s.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            AuthServer::new(auth::AuthService::new(s.clone()))
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(health_service)
}

/// A listener other threads may bind too (SO_REUSEPORT): the kernel
/// spreads connections over the client threads.
fn bind_shared(addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    let err = |e: std::io::Error| Error::Internal(format!("listen tcp {addr}: bind: {e}"));
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)?.into_std().map_err(err)
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("listen tcp {addr}: bind: {e}")))
}

/// Serves gRPC and HTTP on `listener` (registered with the current
/// runtime) until `stop` turns true; over TLS with `tls`.
async fn serve_listener(
    routes: Routes,
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(Error::internal)?;
    let listener = TcpListener::from_std(listener)
        .map_err(|e| Error::Internal(format!("listen tcp {addr}: {e}")))?;
    let server = Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(7200)))
        .add_routes(routes);
    let mut until = stop.clone();
    let stopped = async move {
        let _ = until.wait_for(|v| *v).await;
    };
    let result = match tls {
        None => {
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|conn| conn.map(authority::FixAuthority::new));
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
        Some(config) => {
            let incoming = incoming::tls_incoming(listener, config, false, stop);
            server.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    result.map_err(|e| Error::Internal(format!("client server: {e}")))
}

/// Serves members on every `--listen-peer-urls` address and clients as
/// [`serve_clients`] does, until `shutdown`.
pub async fn serve(
    s: Arc<EtcdServer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut peers = Vec::new();
    // One service for every peer address: what it tracks (the snapshot being received)
    // is the member's, whichever address a peer used.
    let service = peer::PeerService::new(s.clone());
    for (i, addr) in s.cfg.listen_peer.clone().into_iter().enumerate() {
        let listener = bind(addr).await?;
        let tls = s
            .tls
            .peer
            .clone()
            .filter(|_| s.cfg.listen_peer_tls.get(i).copied().unwrap_or(false));
        let plaintext_too = s.cfg.peer_accept_plaintext;
        info!(%addr, tls = tls.is_some(), "serving peer traffic");
        if tls.is_some() && plaintext_too {
            tracing::warn!(
                %addr,
                "the peer port serves plaintext too (--experimental-peer-accept-plaintext): peers that connect in plaintext are not authenticated, as on an http:// peer URL; turn it off once every member's peer URL is https://"
            );
        }
        let svc = crate::proto::peerpb::peer_server::PeerServer::new(service.clone())
            .max_decoding_message_size(crate::raft::MAX_PEER_MESSAGE)
            .max_encoding_message_size(crate::raft::MAX_PEER_MESSAGE);
        let mut stop = stop_rx.clone();
        let stopping = stop_rx.clone();
        peers.push(tokio::spawn(async move {
            let server = Server::builder()
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(32 << 20))
                .add_service(svc);
            let stopped = async move {
                let _ = stop.wait_for(|v| *v).await;
            };
            let result = match tls {
                None => {
                    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                    server.serve_with_incoming_shutdown(incoming, stopped).await
                }
                Some(config) => {
                    let incoming =
                        incoming::tls_incoming(listener, config, plaintext_too, stopping);
                    server.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
            result.map_err(|e| Error::Internal(format!("peer server: {e}")))
        }));
    }
    // As etcd: clients are served once this member is part of the cluster
    // (at once when bootstrapping; a joining member first receives the log
    // or a snapshot that has it in the membership).
    s.wait_joined().await;
    let result = serve_clients(s, shutdown).await;
    let _ = stop_tx.send(true);
    for p in peers {
        p.await.map_err(Error::internal)??;
    }
    result
}

/// Serves clients on every `--listen-client-urls` address (gRPC and HTTP)
/// and metrics on every `--listen-metrics-urls` address until `shutdown`.
///
/// The calling runtime serves every client address; each further client
/// thread (`--experimental-client-io-threads`) runs its own single-threaded
/// runtime on listeners bound to the same addresses. A request then stays
/// on one thread from socket to response.
pub async fn serve_clients(
    s: Arc<EtcdServer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut tasks = Vec::new();
    let routes = client_routes(s.clone());
    let mut extra = Vec::new();
    for (i, addr) in s.cfg.listen_client.clone().into_iter().enumerate() {
        let listener = bind_shared(addr)?;
        let tls = s
            .tls
            .client
            .clone()
            .filter(|_| s.cfg.listen_client_tls.get(i).copied().unwrap_or(false));
        info!(%addr, threads = s.cfg.client_io_threads, tls = tls.is_some(), "serving client traffic");
        tasks.push(tokio::spawn(serve_listener(
            routes.clone(),
            listener,
            tls.clone(),
            stop_rx.clone(),
        )));
        for _ in 1..s.cfg.client_io_threads {
            extra.push((bind_shared(addr)?, tls.clone()));
        }
    }
    let mut threads = Vec::new();
    for (i, (listener, tls)) in extra.into_iter().enumerate() {
        let routes = routes.clone();
        let stop = stop_rx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("cairn-client-{i}"))
            .spawn(move || -> Result<()> {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(Error::internal)?
                    .block_on(serve_listener(routes, listener, tls, stop))
            })
            .map_err(Error::internal)?;
        threads.push(thread);
    }
    for (i, addr) in s.cfg.listen_metrics.clone().into_iter().enumerate() {
        let tls = s
            .tls
            .client
            .clone()
            .filter(|_| s.cfg.listen_metrics_tls.get(i).copied().unwrap_or(false));
        if let Some(tls) = tls {
            // An https:// metrics URL serves with the client port's certificate, as etcd's.
            info!(%addr, tls = true, "serving metrics");
            let routes = Routes::from(http_router(s.clone()));
            // Not shared: a metrics URL on a taken address fails, as etcd's.
            let listener = bind(addr).await?.into_std().map_err(Error::internal)?;
            tasks.push(tokio::spawn(serve_listener(
                routes,
                listener,
                Some(tls),
                stop_rx.clone(),
            )));
            continue;
        }
        let listener = bind(addr).await?;
        info!(%addr, "serving metrics");
        let app = http_router(s.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await
                .map_err(|e| Error::Internal(format!("metrics server: {e}")))
        }));
    }
    let results = try_join_all(tasks).await.map_err(Error::internal)?;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    for t in threads {
        t.join()
            .map_err(|_| Error::Internal("client thread panicked".into()))??;
    }
    Ok(())
}
