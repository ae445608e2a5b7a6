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
//!
//! It holds at most one frame of [`MAX_FRAME`] bytes and one header block of
//! [`MAX_HEADER_BLOCK`] bytes per connection. Whatever it cannot judge (a
//! larger frame, a longer block, a malformed HPACK block) it hands to hyper
//! as it came and steps aside: hyper closes the connection with the
//! protocol error. A block is checked to be well-formed HPACK before the
//! `hpack` crate decodes it, which panics on some truncated blocks.

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
/// hyper's default SETTINGS_MAX_FRAME_SIZE: re-encoded blocks are split to it, and a larger
/// frame from the client is a protocol error hyper answers.
const MAX_FRAME: usize = 16_384;
/// Most bytes of one header block gathered here (HEADERS and CONTINUATION frames).
const MAX_HEADER_BLOCK: usize = 256 << 10;

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
                    if len > MAX_FRAME {
                        self.step_aside();
                        continue;
                    }
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
                            if b.raw.len() > MAX_HEADER_BLOCK {
                                self.step_aside();
                                continue;
                            }
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

    /// Hands everything gathered and everything that follows to hyper unchanged.
    fn step_aside(&mut self) {
        if let Some(b) = self.block.take() {
            self.output.extend_from_slice(&b.raw);
        }
        self.mode = Mode::Passthrough;
    }

    /// Forwards a complete header block, rewritten if the connection needs it.
    fn finish(&mut self, block: Block, rewrite: Option<bool>) -> io::Result<()> {
        if !hpack_well_formed(&block.fragment) {
            self.output.extend_from_slice(&block.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
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

/// hyper's SETTINGS_HEADER_TABLE_SIZE (h2's default): the largest dynamic table a client may
/// ask the decoder for.
const MAX_TABLE_SIZE: u64 = 4096;

/// Whether `block` is a sequence of whole HPACK field representations (RFC 7541 section 6):
/// every integer and string ends inside it, integers take at most the four continuation
/// octets the `hpack` crate reads (it panics on a table size update it cannot read), and
/// table size updates stay within [`MAX_TABLE_SIZE`]. Says nothing of table indexes or
/// Huffman codes, which the decoder reports as errors.
fn hpack_well_formed(block: &[u8]) -> bool {
    /// An integer with an `prefix`-bit prefix at `b[*at]` (section 5.1).
    fn int(b: &[u8], at: &mut usize, prefix: u32) -> Option<u64> {
        let max = (1u64 << prefix) - 1;
        let v = (*b.get(*at)? as u64) & max;
        *at += 1;
        if v < max {
            return Some(v);
        }
        let mut v = v;
        for shift in (0..28).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v += ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// A string literal at `b[*at]` (section 5.2).
    fn string(b: &[u8], at: &mut usize) -> Option<()> {
        let len = int(b, at, 7)? as usize;
        *at = at.checked_add(len).filter(|end| *end <= b.len())?;
        Some(())
    }
    fn walk(b: &[u8]) -> Option<()> {
        let mut at = 0;
        while at < b.len() {
            let first = b[at];
            if first & 0x80 != 0 {
                int(b, &mut at, 7)?;
            } else if first & 0x20 != 0 && first & 0x40 == 0 {
                // Dynamic table size update.
                if int(b, &mut at, 5)? > MAX_TABLE_SIZE {
                    return None;
                }
            } else {
                // Literal with incremental indexing (6-bit index), without indexing or never
                // indexed (4-bit index); index 0: the name follows as a string.
                let prefix = if first & 0x40 != 0 { 6 } else { 4 };
                if int(b, &mut at, prefix)? == 0 {
                    string(b, &mut at)?;
                }
                string(b, &mut at)?;
            }
        }
        Some(())
    }
    walk(block).is_some()
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

/// What every request on a client connection carries in its extensions:
/// over TLS, the common name of the client certificate
/// (verified against `--trusted-ca-file` in the handshake), which etcd takes
/// as the user when `--client-cert-auth` is set and no token is sent.
#[derive(Debug, Clone)]
pub struct ClientConn {
    pub common_name: Option<std::sync::Arc<str>>,
}

impl tonic::transport::server::Connected for FixAuthority<tokio::net::TcpStream> {
    type ConnectInfo = ClientConn;

    fn connect_info(&self) -> Self::ConnectInfo {
        ClientConn { common_name: None }
    }
}

impl tonic::transport::server::Connected for FixAuthority<super::incoming::Conn> {
    type ConnectInfo = ClientConn;

    fn connect_info(&self) -> Self::ConnectInfo {
        let common_name = self
            .inner
            .tls()
            .and_then(|tls| tls.peer_certificates())
            .and_then(|chain| chain.first())
            .and_then(|cert| crate::tls::common_name(cert.as_ref()))
            .map(Into::into);
        ClientConn { common_name }
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

    #[test]
    fn hpack_blocks_are_checked_before_decoding() {
        let mut enc = hpack::Encoder::new();
        let good = enc.encode(vec![
            (&b":authority"[..], &b"http://127.0.0.1:2379"[..]),
            (b"x-long", &[b'v'; 300][..]),
        ]);
        assert!(hpack_well_formed(&good));
        // Every truncation of a good block is caught (the hpack crate panics on some).
        for n in 1..good.len() {
            let cut = &good[..n];
            if !hpack_well_formed(cut) {
                continue;
            }
            // What passes must decode without a panic.
            let _ = hpack::Decoder::new().decode(cut);
        }
        // A table size update cut short (the crate's panic), one in five continuation octets
        // (the crate reads four, then panics), one over the table size hyper advertises, a
        // string past the end, an integer of more than 32 bits.
        for bad in [
            &[0x3f][..],
            &[0x3f, 0x80, 0x80, 0x80, 0x80, 0x00],
            &[0x3f, 0xe2, 0x1f],
            &[0x40, 0x05, b'a'],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            assert!(!hpack_well_formed(bad), "{bad:?}");
        }
        // A size update within the table size is fine, and decodes.
        assert!(hpack_well_formed(&[0x3f, 0xe1, 0x1f]), "exactly 4096");
        assert!(hpack_well_formed(&[0x3f, 0xe1, 0x0f]));
        assert!(hpack::Decoder::new().decode(&[0x3f, 0xe1, 0x0f]).is_ok());
    }

    #[tokio::test]
    async fn hostile_frames_are_handed_to_hyper_unchanged_and_nothing_piles_up() {
        let mut prefix = PREFACE.to_vec();
        prefix.extend(frame(0x4, 0, 0, &[]));
        // A one-byte 0x3f header block.
        let mut input = prefix.clone();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f]));
        assert_eq!(through(input.clone()).await, input);
        // A frame over the maximum size: passed on from its header, not gathered.
        let mut input = prefix.clone();
        input.extend_from_slice(&[0x10, 0x00, 0x00, HEADERS, 0, 0, 0, 0, 1]);
        input.extend_from_slice(&[0u8; 100]);
        let mut f = FixAuthority::new(&input[..]);
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        // CONTINUATION frames without end: gathered up to the bound, then passed on.
        let mut input = prefix.clone();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..100 {
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; 8192]));
        }
        let mut f = FixAuthority::new(&input[..]);
        let mut out = Vec::new();
        f.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert!(f.block.is_none() && matches!(f.mode, Mode::Passthrough));
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
