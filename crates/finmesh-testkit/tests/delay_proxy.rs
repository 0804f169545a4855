//! `DelayProxy` against a plain TCP echo server: the delay is really added
//! (round trip ≥ 2 × one-way delay), large payloads arrive whole and in
//! order at many MB/s despite the delay, and cut / restore / drop do what
//! they say.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use finmesh_testkit::DelayProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP echo server on a free loopback port; runs until the test ends.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Time of one 1-byte round trip on `s`.
async fn round_trip(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"x");
    started.elapsed()
}

/// Does `s` get closed (EOF or error) within 5 s?
async fn closed_soon(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn round_trip_takes_twice_the_delay_and_the_delay_changes_at_run_time() {
    let echo = echo_server().await;
    let delay = Duration::from_millis(100);
    let proxy = DelayProxy::start(echo, delay).await.unwrap();
    assert_eq!(proxy.delay(), delay);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    for _ in 0..3 {
        let rtt = round_trip(&mut s).await;
        assert!(rtt >= 2 * delay, "round trip {rtt:?} shorter than 2 × {delay:?}");
        assert!(rtt < 2 * delay + Duration::from_secs(2), "round trip {rtt:?}");
    }
    // Lowering the delay applies to the same connection from now on.
    proxy.set_delay(Duration::ZERO);
    let rtt = round_trip(&mut s).await;
    assert!(rtt < 2 * delay, "round trip {rtt:?} after the delay was removed");
    proxy.set_delay(Duration::from_millis(60));
    assert!(round_trip(&mut s).await >= Duration::from_millis(120));
}

#[tokio::test]
async fn large_payload_arrives_whole_in_order_and_fast_through_a_jittery_40ms_link() {
    let echo = echo_server().await;
    let proxy = DelayProxy::builder(echo)
        .delay(Duration::from_millis(40))
        .jitter(Duration::from_millis(10))
        .start()
        .await
        .unwrap();
    assert_eq!(proxy.jitter(), Duration::from_millis(10));
    let payload: Vec<u8> = (0..16 * 1024 * 1024).map(|_| fastrand::u8(..)).collect();
    let s = TcpStream::connect(proxy.addr()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        // Uneven writes, so chunks of many sizes queue up with jittered times.
        let mut at = 0;
        let mut size = 1;
        while at < to_send.len() {
            let end = (at + size).min(to_send.len());
            w.write_all(&to_send[at..end]).await.unwrap();
            at = end;
            size = size * 7 % 100_003 + 1;
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    r.read_to_end(&mut back).await.unwrap(); // EOF travels through after the data
    writer.await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "payload reordered or corrupted");
    let mb_per_s = 2.0 * payload.len() as f64 / 1e6 / elapsed.as_secs_f64();
    println!("16 MiB echoed through a 40 ± 10 ms proxy in {elapsed:?}: {mb_per_s:.0} MB/s through the proxy");
    // A proxy that slept per chunk would manage ~1.6 MB/s per direction.
    assert!(elapsed < Duration::from_secs(8), "16 MiB round trip took {elapsed:?}");
}

#[tokio::test]
async fn cut_closes_connections_and_refuses_new_ones_until_restore() {
    let echo = echo_server().await;
    let proxy = DelayProxy::start(echo, Duration::from_millis(5)).await.unwrap();
    let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut a).await;
    round_trip(&mut b).await;
    assert_eq!(proxy.open_connections(), 2);

    proxy.cut().await;
    assert!(proxy.is_cut());
    assert_eq!(proxy.open_connections(), 0);
    assert!(closed_soon(&mut a).await, "connection a survived the cut");
    assert!(closed_soon(&mut b).await, "connection b survived the cut");
    let refused = TcpStream::connect(proxy.addr()).await;
    assert!(refused.is_err(), "connect succeeded while the link is cut");
    proxy.cut().await; // idempotent

    proxy.restore().await.unwrap();
    assert!(!proxy.is_cut());
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(round_trip(&mut c).await >= Duration::from_millis(10));
    proxy.restore().await.unwrap(); // idempotent
    round_trip(&mut c).await;
}

#[tokio::test]
async fn falls_over_to_the_next_target_and_drop_closes_everything() {
    let echo = echo_server().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], finmesh_testkit::ports::free_port().unwrap()));
    let proxy = DelayProxy::builder(dead).target(echo).start().await.unwrap();
    assert_eq!(proxy.targets(), &[dead, echo]);
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut s).await;

    let addr = proxy.addr();
    drop(proxy);
    assert!(closed_soon(&mut s).await, "connection outlived the proxy");
    // Aborted tasks are dropped by the runtime a moment later: a connect
    // racing with that may still land in the old backlog, but is closed.
    if let Ok(mut late) = TcpStream::connect(addr).await {
        assert!(closed_soon(&mut late).await, "proxy port still serves after drop");
    }
}
