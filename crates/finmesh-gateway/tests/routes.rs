//! The route access table (`ROUTE_ACCESS`) is the router: every listed
//! route is served, with a sample request that succeeds (the same samples
//! drive the auth matrix in `auth_matrix.rs`).

mod support;

use finmesh_gateway::{Need, ROUTE_ACCESS};
use support::auth::{is_sse, sample_request, seed};
use support::{Gw, Harness};

async fn every_route_in_the_table_is_served<H: Harness>() {
    let gw = Gw::start::<H>().await;
    seed(&gw, "").await;
    // Deletes last, so every other route still finds its resource.
    let mut table: Vec<_> = ROUTE_ACCESS.to_vec();
    table.sort_by_key(|(m, p, _)| (*m == "DELETE", std::cmp::Reverse(p.len())));
    for (method, path, need) in table {
        let (method, uri, body, want) = sample_request(method, path);
        if is_sse(path) {
            let mut sse = support::sse_oneshot(&gw, &uri, &[]).await;
            sse.hello().await;
            continue;
        }
        let r = gw.send(method.clone(), &uri, &[], body).await;
        assert_eq!(r.status.as_u16(), want, "{method} {uri} ({need:?}): {}", r.text());
    }
    assert!(ROUTE_ACCESS.iter().any(|r| r.2 == Need::StreamConsume));
}

per_engine!(every_route_in_the_table_is_served);
