//! The floor under the gateway's KV GET: axum and hyper alone, answering
//! `GET /kv/{key}` with a fixed 256-byte body, on the same runtime shape as
//! `finmesh serve` (multi-thread tokio, one worker per core, mimalloc), with
//! no auth, limits, metrics or engine. Compare it with nginx and the gateway
//! under the same `wrk` command to see how much of the gap is finmesh's own
//! per-request work:
//!
//! ```text
//! cargo run --release -p finmesh-gateway --example bare_axum -- 127.0.0.1:18080
//! wrk -t2 -c64 -d5s --latency http://127.0.0.1:18080/kv/k1
//! ```

use axum::Router;
use axum::body::Bytes;
use axum::routing::get;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18080".into());
    let body = Bytes::from(vec![b'x'; 256]);
    let app = Router::new().route("/kv/{key}", get(move || std::future::ready(body.clone())));
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}
