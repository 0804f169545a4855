//! The direct SSE path: a connection whose first request is a stream
//! subscription (`GET /v1/streams/{stream}/events` over HTTP/1.1, no body)
//! is answered here instead of by hyper, so that an idle subscriber costs
//! its socket, its hub feed and a few hundred bytes, not hyper's
//! per-connection state (an 8 KiB read buffer and an 8 KiB header write
//! buffer kept for the connection's whole life, plus its connection future).
//!
//! Shape: [`read_first`] reads the connection's first request head into a
//! small buffer and judges it with `httparse`; anything else (another
//! method or path, HTTP/1.0, a body, HTTP/2's preface, a head over
//! [`MAX_HEAD`] or one `httparse` refuses) goes to hyper through
//! [`Prefixed`], which replays the bytes read so far first, so hyper sees
//! the connection exactly as the client sent it. A subscription is turned
//! into an `http::Request` and [`respond`] calls the gateway's `Router`
//! with it, then writes the answer itself.
//!
//! Invariants:
//! - **one judge of requests**: the request goes through the same `Router`
//!   as any other (CORS, the edge's shedding, authentication, rate limit,
//!   `access_token`, metrics, then the route's handler with its
//!   registration, caps and filter checks); this module only chooses the
//!   connection path, so a request it misjudges is still answered right;
//! - **one request per connection**: every answer carries
//!   `connection: close` and the socket closes after it; a refusal (401,
//!   429, …) is sent with its `content-length`, a subscription as
//!   `transfer-encoding: chunked`;
//! - **no buffers while streaming**: the head buffer is dropped before the
//!   answer starts; the frames ready at once are written as one chunk by
//!   one vectored write of their own (shared, pre-encoded) bytes; the
//!   client side is watched for its close with a small stack scratch (bytes
//!   a client sends after its request are read and dropped; its EOF ends
//!   the subscription);
//! - the head must arrive within the connection's `header_timeout` (the
//!   caller's deadline); writes keep the socket's write deadline (the
//!   caller's `Watched` socket).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Response, Uri, Version, header, request};
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tower::ServiceExt as _;

/// Longest first request head judged here; a longer one goes to hyper.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers a subscription request may have (more: hyper answers).
const MAX_HEADERS: usize = 64;
/// Most frames gathered into one chunk (one vectored write).
const MAX_BATCH: usize = 64;
/// A gather stops once it holds this many bytes: what a connection holds
/// outside its subscriber queue while a write is pending is at most this
/// plus one frame (the hub's body chunks are up to 64 KiB each).
const MAX_GATHER_BYTES: usize = 64 * 1024;
/// What the head buffer starts with (a browser's subscription head is ~600 B).
const FIRST_READ: usize = 1024;

/// What the first request head of a connection turned out to be.
pub enum First {
    /// A stream subscription, for [`respond`].
    Subscription(Box<request::Parts>),
    /// Anything else: serve it with hyper, replaying the bytes read.
    Other,
    /// The client closed (or failed) before sending a whole head.
    Closed,
}

/// Read the first request head of a connection into `buf` and judge it.
/// Reads only until the judgement is certain: a connection whose first
/// bytes are not `GET ` is handed on after its first read.
pub async fn read_first<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut) -> First {
    loop {
        match judge(buf) {
            Judged::More => {}
            Judged::Other => return First::Other,
            Judged::Subscription(parts) => return First::Subscription(parts),
        }
        if buf.len() >= MAX_HEAD {
            return First::Other;
        }
        buf.reserve(FIRST_READ.min(MAX_HEAD - buf.len()));
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return First::Closed,
            Ok(_) => {}
        }
    }
}

enum Judged {
    More,
    Other,
    Subscription(Box<request::Parts>),
}

/// The judgement on the bytes of a head read so far.
fn judge(buf: &[u8]) -> Judged {
    const GET: &[u8] = b"GET /";
    let n = buf.len().min(GET.len());
    if buf[..n] != GET[..n] {
        return Judged::Other;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            // Once the request line is in, decide on its path.
            return match request_line(buf) {
                Some(path) if !is_subscription(path) => Judged::Other,
                _ => Judged::More,
            };
        }
        Err(_) => return Judged::Other,
    }
    match (req.version, req.path) {
        (Some(1), Some(path)) if is_subscription(path) => match parts(path, req.headers) {
            Some(parts) => Judged::Subscription(parts),
            None => Judged::Other,
        },
        _ => Judged::Other,
    }
}

/// The path of a complete request line, if the line is complete.
fn request_line(buf: &[u8]) -> Option<&str> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..end]).ok()?;
    line.split(' ').nth(1)
}

/// Whether `path` (origin form, with its query) is `/v1/streams/{stream}/events`.
fn is_subscription(path: &str) -> bool {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    path.strip_prefix("/v1/streams/")
        .and_then(|rest| rest.strip_suffix("/events"))
        .is_some_and(|stream| !stream.is_empty() && !stream.contains('/'))
}

/// The request's parts, or `None` for what hyper should answer (a body,
/// an `Expect`, a header the `http` types refuse).
fn parts(path: &str, headers: &[httparse::Header<'_>]) -> Option<Box<request::Parts>> {
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = Uri::try_from(path).ok()?;
    let map = req.headers_mut();
    map.reserve(headers.len());
    for h in headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let body = name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || (name == header::CONTENT_LENGTH && h.value != b"0");
        if body {
            return None;
        }
        map.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    Some(Box::new(req.into_parts().0))
}

/// Answer `req` with `app` on `io`, then end the connection (see the
/// module doc). `Err` when the client went away or the write deadline passed.
pub async fn respond<I: AsyncRead + AsyncWrite + Unpin>(io: &mut I, req: Request<Body>, app: Router) -> io::Result<()> {
    let res = match app.oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let streaming = res.body().size_hint().exact().is_none();
    let (head, mut body) = head(res, streaming);
    if !streaming {
        let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(io::Error::other)?;
        write_all(io, &[&head, &bytes]).await?;
        return finish(io).await;
    }
    write_all(io, &[&head]).await?;
    io.flush().await?;
    drop(head);
    loop {
        let (frames, ended) = match next_frames(io, &mut body).await? {
            Next::Frames { frames, ended } => (frames, ended),
            Next::ClientClosed => return Ok(()),
        };
        let len: usize = frames.iter().map(Bytes::len).sum();
        let size = format!("{len:x}\r\n");
        let mut pieces: Vec<&[u8]> = Vec::with_capacity(frames.len() + 3);
        if len > 0 {
            pieces.push(size.as_bytes());
            pieces.extend(frames.iter().map(|f| &f[..]));
            pieces.push(b"\r\n");
        }
        if ended {
            pieces.push(b"0\r\n\r\n");
        }
        write_all(io, &pieces).await?;
        io.flush().await?;
        if ended {
            return finish(io).await;
        }
    }
}

/// The response head (status line, headers, framing) and the body.
fn head(res: Response<Body>, streaming: bool) -> (Vec<u8>, Body) {
    let (parts, body) = res.into_parts();
    let mut out = Vec::with_capacity(256);
    let reason = parts.status.canonical_reason().unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", parts.status.as_str()).as_bytes());
    for (name, value) in &parts.headers {
        let framing = name == header::CONNECTION
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name.as_str() == "keep-alive";
        if framing {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(format!("date: {}\r\n", http_date(time::OffsetDateTime::now_utc())).as_bytes());
    }
    if streaming {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    } else {
        let len = body.size_hint().exact().unwrap_or(0);
        out.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    (out, body)
}

/// An IMF-fixdate (RFC 9110 §5.6.7), as hyper writes `date`.
fn http_date(t: time::OffsetDateTime) -> String {
    let (weekday, month) = (t.weekday().to_string(), t.month().to_string());
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        &weekday[..3],
        t.day(),
        &month[..3],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

enum Next {
    /// Data frames ready now (possibly none), and whether the body ended.
    Frames { frames: Vec<Bytes>, ended: bool },
    /// The client closed its side (or its socket failed).
    ClientClosed,
}

/// Wait for the body's next frames, gathering every frame ready at once,
/// while watching the client's side for its close.
async fn next_frames<I: AsyncRead + Unpin>(io: &mut I, body: &mut Body) -> io::Result<Next> {
    poll_fn(|cx| poll_next_frames(cx, io, body)).await
}

fn poll_next_frames<I: AsyncRead + Unpin>(cx: &mut Context<'_>, io: &mut I, body: &mut Body) -> Poll<io::Result<Next>> {
    let (mut frames, mut bytes) = (Vec::new(), 0);
    while frames.len() < MAX_BATCH && bytes < MAX_GATHER_BYTES {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    bytes += data.len();
                    frames.push(data);
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
            Poll::Ready(None) => return Poll::Ready(Ok(Next::Frames { frames, ended: true })),
            Poll::Pending => break,
        }
    }
    if !frames.is_empty() {
        return Poll::Ready(Ok(Next::Frames { frames, ended: false }));
    }
    // Nothing to send: read what the client sends (dropped) until it closes.
    loop {
        let mut scratch = [0u8; 64];
        let mut read = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(Next::ClientClosed)),
            Poll::Ready(Ok(())) => continue,
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(Next::ClientClosed)),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Write every piece, in order, with as few (vectored) writes as the socket allows.
async fn write_all<I: AsyncWrite + Unpin>(io: &mut I, pieces: &[&[u8]]) -> io::Result<()> {
    let (mut at, mut offset) = (0, 0);
    loop {
        while at < pieces.len() && offset == pieces[at].len() {
            at += 1;
            offset = 0;
        }
        if at == pieces.len() {
            return Ok(());
        }
        let mut slices = Vec::with_capacity(pieces.len() - at);
        slices.push(IoSlice::new(&pieces[at][offset..]));
        slices.extend(pieces[at + 1..].iter().map(|p| IoSlice::new(p)));
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = pieces[at].len() - offset;
            if n < left {
                offset += n;
                break;
            }
            n -= left;
            at += 1;
            offset = 0;
        }
    }
}

async fn finish<I: AsyncWrite + Unpin>(io: &mut I) -> io::Result<()> {
    io.flush().await?;
    io.shutdown().await
}

/// A socket whose first bytes were already read: they are read again first.
pub struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    pub fn new(io: I, prefix: Bytes) -> Self {
        Prefixed { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Free the head buffer now, not with the connection.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(head: &str) -> &'static str {
        match judge(head.as_bytes()) {
            Judged::More => "more",
            Judged::Other => "other",
            Judged::Subscription(_) => "subscription",
        }
    }

    #[test]
    fn only_a_bodyless_http11_get_of_a_stream_events_path_is_a_subscription() {
        let sub = "GET /v1/streams/md/events?subject=md.A HTTP/1.1\r\nhost: x\r\nlast-event-id: 4\r\n\r\n";
        assert_eq!(judged(sub), "subscription");
        // Decided as early as the bytes allow.
        assert_eq!(judged("G"), "more");
        assert_eq!(judged("POST /v1/streams/md/events HTTP/1.1\r\n"), "other");
        assert_eq!(judged("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "other");
        assert_eq!(judged("GET /v1/streams/md/events HTTP/1.1\r\nhost"), "more");
        assert_eq!(judged("GET /v1/kv/b/k HTTP/1.1\r\nhost"), "other", "the path decides before the headers end");
        for other in [
            "GET /v1/streams/md/events HTTP/1.0\r\n\r\n",
            "GET /v1/streams/md/ws HTTP/1.1\r\n\r\n",
            "GET /v1/streams//events HTTP/1.1\r\n\r\n",
            "GET /v1/streams/a/b/events HTTP/1.1\r\n\r\n",
            "GET /v1/streams/md/events HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc",
            "GET /v1/streams/md/events HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /v1/streams/md/events HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert_eq!(judged(other), "other", "{other:?}");
        }
        let Judged::Subscription(parts) = judge(sub.as_bytes()) else { unreachable!() };
        assert_eq!(parts.uri, "/v1/streams/md/events?subject=md.A");
        assert_eq!(parts.headers["last-event-id"], "4");
    }

    #[test]
    fn vectored_writes_resume_inside_a_piece() {
        // A writer taking at most 3 bytes per call.
        struct Trickle(Vec<u8>);
        impl AsyncWrite for Trickle {
            fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                let n = buf.len().min(3);
                self.0.extend_from_slice(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let mut w = Trickle(Vec::new());
        let pieces: [&[u8]; 4] = [b"abcd", b"", b"e", b"fghij"];
        futures::executor::block_on(write_all(&mut w, &pieces)).unwrap();
        assert_eq!(w.0, b"abcdefghij");
    }

    #[test]
    fn a_gather_stops_at_its_byte_budget() {
        let chunks = (0..100).map(|_| Ok::<_, std::convert::Infallible>(Bytes::from(vec![b'x'; 4096])));
        let mut body = Body::from_stream(futures::stream::iter(chunks));
        let mut io = tokio::io::empty();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Ok(Next::Frames { frames, ended: false })) = poll_next_frames(&mut cx, &mut io, &mut body)
        else {
            panic!("frames were ready")
        };
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        assert!((MAX_GATHER_BYTES..MAX_GATHER_BYTES + 4096).contains(&bytes), "{bytes} bytes gathered");
    }

    #[test]
    fn dates_are_imf_fixdates() {
        let t = time::OffsetDateTime::from_unix_timestamp(784_111_777).unwrap();
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
