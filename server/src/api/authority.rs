//! etcd 3.4's clientv3 (hence etcdctl) sends the endpoint it was given as
//! the HTTP/2 `:authority`, scheme included (`http://127.0.0.1:2379`) when
//! endpoints are written as URLs, as `--cluster` always does. etcd's Go
//! server ignores it; hyper's h2 refuses such a request with PROTOCOL_ERROR.
//!
//! [`FixAuthority`] sits between the socket and hyper. It reads the first
//! request's header block of each HTTP/2 connection: if its `:authority`
//! carries a scheme, every header block of the connection is decoded and
//! re-encoded with the scheme stripped (its own HPACK encoder then drives
//! hyper's decoder); otherwise, and for HTTP/1, it steps aside and bytes
//! pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// hyper's default SETTINGS_MAX_FRAME_SIZE: re-encoded blocks are split to it.
const MAX_FRAME: usize = 16_384;

enum Mode {
    /// Reading the connection preface.
    Preface,
    /// Inspecting frames; `rewrite` is decided by the first header block.
    Frames { rewrite: Option<bool> },
    /// Out of the way.
    Passthrough,
}

/// A header block being gathered: its HEADERS and CONTINUATION frames as
/// received, the block fragment, and the HEADERS frame's stream and flags.
struct Block {
    raw: BytesMut,
    fragment: BytesMut,
    stream: u32,
    flags: u8,
}

pub struct FixAuthority<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the socket, not yet processed.
    input: BytesMut,
    /// Processed bytes for hyper.
    output: BytesMut,
    block: Option<Block>,
    decoder: hpack::Decoder<'static>,
    encoder: hpack::Encoder<'static>,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Preface,
            input: BytesMut::new(),
            output: BytesMut::new(),
            block: None,
            decoder: hpack::Decoder::new(),
            encoder: hpack::Encoder::new(),
        }
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Passthrough => {
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                    return Ok(());
                }
                Mode::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        // HTTP/1 (the /health, /metrics endpoints).
                        self.mode = Mode::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    let p = self.input.split_to(PREFACE.len());
                    self.output.extend_from_slice(&p);
                    self.mode = Mode::Frames { rewrite: None };
                }
                Mode::Frames { rewrite } => {
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let len = u32::from_be_bytes([0, self.input[0], self.input[1], self.input[2]])
                        as usize;
                    if self.input.len() < FRAME_HEADER + len {
                        return Ok(());
                    }
                    let kind = self.input[3];
                    let flags = self.input[4];
                    let stream = u32::from_be_bytes([
                        self.input[5],
                        self.input[6],
                        self.input[7],
                        self.input[8],
                    ]) & 0x7fff_ffff;
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    match kind {
                        HEADERS if self.block.is_none() => {
                            let mut payload = &frame[FRAME_HEADER..];
                            let mut pad = 0;
                            if flags & PADDED != 0 && !payload.is_empty() {
                                pad = payload[0] as usize;
                                payload = &payload[1..];
                            }
                            if flags & PRIORITY != 0 && payload.len() >= 5 {
                                payload = &payload[5..];
                            }
                            let payload = &payload[..payload.len().saturating_sub(pad)];
                            self.block = Some(Block {
                                raw: BytesMut::from(&frame[..]),
                                fragment: BytesMut::from(payload),
                                stream,
                                flags,
                            });
                        }
                        CONTINUATION if self.block.is_some() => {
                            let b = self.block.as_mut().expect("checked");
                            b.raw.extend_from_slice(&frame);
                            b.fragment.extend_from_slice(&frame[FRAME_HEADER..]);
                        }
                        _ => {
                            // Anything else (or a protocol error hyper will
                            // report itself) goes through as it came.
                            if let Some(b) = self.block.take() {
                                self.output.extend_from_slice(&b.raw);
                            }
                            self.output.extend_from_slice(&frame);
                            continue;
                        }
                    }
                    if flags & END_HEADERS != 0 {
                        let block = self.block.take().expect("a block is open");
                        self.finish(block, rewrite)?;
                    }
                }
            }
        }
    }

    /// Forwards a complete header block, rewritten if the connection needs it.
    fn finish(&mut self, block: Block, rewrite: Option<bool>) -> io::Result<()> {
        let headers = match self.decoder.decode(&block.fragment) {
            Ok(h) => h,
            Err(_) => {
                // Not ours to judge: hyper answers the malformed block.
                self.output.extend_from_slice(&block.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
        };
        let rewrite = rewrite.unwrap_or_else(|| {
            headers
                .iter()
                .any(|(k, v)| k == b":authority" && v.windows(3).any(|w| w == b"://"))
        });
        if !rewrite {
            self.output.extend_from_slice(&block.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        self.mode = Mode::Frames {
            rewrite: Some(true),
        };
        let fixed: Vec<(Vec<u8>, Vec<u8>)> = headers
            .into_iter()
            .map(|(k, v)| {
                if k == b":authority" {
                    let v = match v.windows(3).position(|w| w == b"://") {
                        Some(i) => v[i + 3..].to_vec(),
                        None => v,
                    };
                    (k, v)
                } else {
                    (k, v)
                }
            })
            .collect();
        let encoded = self
            .encoder
            .encode(fixed.iter().map(|(k, v)| (&k[..], &v[..])));
        let mut rest = &encoded[..];
        let mut first = true;
        loop {
            let n = rest.len().min(MAX_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let last = tail.is_empty();
            let (kind, mut flags) = if first {
                (HEADERS, block.flags & END_STREAM)
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            self.output.put_uint(n as u64, 3);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(block.stream);
            self.output.extend_from_slice(chunk);
            first = false;
            rest = tail;
            if last {
                return Ok(());
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Passthrough) && this.input.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        // EOF: hand over whatever is left, then EOF.
                        let rest = this.input.split();
                        if rest.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        this.output.extend_from_slice(&rest);
                        continue;
                    }
                    this.input.extend_from_slice(rb.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for FixAuthority<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = BytesMut::new();
        f.put_uint(payload.len() as u64, 3);
        f.put_u8(kind);
        f.put_u8(flags);
        f.put_u32(stream);
        f.extend_from_slice(payload);
        f.to_vec()
    }

    async fn through(input: Vec<u8>) -> Vec<u8> {
        let mut f = FixAuthority::new(&input[..]);
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        out
    }

    fn headers_of(out: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut dec = hpack::Decoder::new();
        let mut rest = &out[PREFACE.len()..];
        let mut blocks = Vec::new();
        while rest.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if rest[3] == HEADERS {
                blocks.push(dec.decode(&rest[FRAME_HEADER..FRAME_HEADER + len]).unwrap());
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        blocks
    }

    #[tokio::test]
    async fn a_scheme_in_the_authority_is_stripped_on_every_request() {
        let mut enc = hpack::Encoder::new();
        let h: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/etcdserverpb.KV/Range"),
            (b":authority", b"http://127.0.0.1:2379"),
        ];
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &enc.encode(h.clone())));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &enc.encode(h)));
        let out = through(input).await;
        let blocks = headers_of(&out);
        assert_eq!(blocks.len(), 2);
        for b in blocks {
            let auth = b.iter().find(|(k, _)| k == b":authority").unwrap();
            assert_eq!(auth.1, b"127.0.0.1:2379");
            assert_eq!(b.len(), 4);
        }
        assert!(out.windows(4).any(|w| w == b"data"));
    }

    #[tokio::test]
    async fn other_connections_pass_unchanged() {
        let mut enc = hpack::Encoder::new();
        let h: Vec<(&[u8], &[u8])> = vec![(b":authority", b"127.0.0.1:2379")];
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &enc.encode(h)));
        input.extend(frame(0x0, END_STREAM, 1, b"data"));
        assert_eq!(through(input.clone()).await, input);
        let http1 = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(http1.clone()).await, http1);
    }
}
