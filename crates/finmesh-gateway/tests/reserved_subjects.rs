//! Regression (issue 21): a `stream:admin` token could create a stream whose
//! subjects are `_INBOX.>`, `$KV.<other bucket>.>`, `$JS.API.>` or `$SYS.>`
//! and so capture other tenants' replies and values. Such a stream config is
//! a 400 problem on both engines, at creation and by an update, and nothing
//! is created.

mod support;

use axum::http::Method;
use serde_json::json;
use support::auth::{AuthKit, bearer};
use support::{Gw, Harness};

async fn reserved_subjects_are_a_400_problem<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let admin = bearer(&kit.token("root", "admin"));
    let r = gw.send(Method::PUT, "/v1/kv/other", &[("authorization", &admin)], "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let spy = bearer(&kit.token("tenant", "stream:admin:SPY"));
    let auth = [("authorization", spy.as_str())];
    let ok = gw.send(Method::PUT, "/v1/streams/SPY", &auth, json!({"subjects": ["spy.>"]}).to_string()).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    for bad in ["_INBOX.>", "$KV.other.>", "$JS.API.>", "$SYS.>", ">", "*.*.>"] {
        let body = json!({"subjects": ["spy.>", bad]}).to_string();
        let p = gw.send(Method::PUT, "/v1/streams/SPY", &auth, body).await.assert_problem(400, "invalid");
        assert!(p["detail"].as_str().unwrap().contains(&format!("subject `{bad}`")), "{p}");
        let body = json!({"subjects": [bad]}).to_string();
        gw.send(Method::PUT, "/v1/streams/SPY2", &[("authorization", &admin)], body)
            .await
            .assert_problem(400, "invalid");
    }
    gw.send(Method::GET, "/v1/streams/SPY2", &[("authorization", &admin)], "").await.assert_problem(404, "not-found");
    let info = gw.send(Method::GET, "/v1/streams/SPY", &[("authorization", &admin)], "").await;
    assert_eq!(info.json()["config"]["subjects"], json!(["spy.>"]));
}

per_engine!(reserved_subjects_are_a_400_problem);
