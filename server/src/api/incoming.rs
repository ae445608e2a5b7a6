//! Connections accepted on a TLS listener: each handshake runs on its own task (a slow client
//! holds up no other), and the connection joins the server once it completes. With
//! `plaintext_too` (the peer port's `--experimental-peer-accept-plaintext`) a connection whose
//! first byte does not start a TLS record is served as it is, in plaintext: what lets a live
//! cluster move its peer traffic to or from TLS one member at a time.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::authority::FixAuthority;

/// Most time a client has to finish its TLS handshake (or, where plaintext is served too, to
/// send its first byte).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS record carrying a handshake message (a ClientHello); plaintext
/// HTTP/2 starts with `PRI * HTTP/2.0`, HTTP/1 with a method name.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection accepted on a TLS listener: over TLS, or in plaintext where that is served too.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// The TLS session, for a connection over TLS.
    pub fn tls(&self) -> Option<&rustls::ServerConnection> {
        match self {
            Conn::Plain(_) => None,
            Conn::Tls(t) => Some(t.get_ref().1),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One accepted connection, ready to serve: `None` when it closed, timed out or failed its
/// handshake (logged at debug level: a port scan is no news).
async fn ready(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    plaintext_too: bool,
) -> Option<Conn> {
    let work = async move {
        if plaintext_too {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(0) => return Err("closed before sending anything".to_string()),
                Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => return Ok(Conn::Plain(tcp)),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the first byte: {e}")),
            }
        }
        acceptor
            .accept(tcp)
            .await
            .map(|s| Conn::Tls(Box::new(s)))
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, work).await {
        Ok(Ok(conn)) => Some(conn),
        Ok(Err(e)) => {
            tracing::debug!(%peer, "{e}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The connections of a TLS `listener` (see the module doc), until `stop` turns true.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    plaintext_too: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = io::Result<FixAuthority<Conn>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        continue;
                    }
                },
                _ = stop.wait_for(|v| *v) => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = ready(tcp, peer, acceptor, plaintext_too).await {
                    let _ = tx.send(Ok(FixAuthority::new(conn))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
