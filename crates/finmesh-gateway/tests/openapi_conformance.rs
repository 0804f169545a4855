//! The OpenAPI document describes what the server really answers: one
//! regression case per finding of `scripts/fuzz-api` (schemathesis), each
//! named after the bug. A real request is sent and its status and media type
//! must be documented for that operation (`assert_documented`).

mod support;

use std::time::Duration;

use axum::http::Method;
use finmesh_auth::{Scope, bootstrap_node_auth};
use serde_json::{Value, json};
use support::{Gw, Harness, Res};
use utoipa::OpenApi;

fn doc() -> Value {
    serde_json::to_value(finmesh_gateway::openapi::ApiDoc::openapi()).expect("document as JSON")
}

/// Every operation as (method, path template, operation object).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            out.push((method.to_uppercase(), path.clone(), op.clone()));
        }
    }
    out
}

fn is_public(op: &Value) -> bool {
    op.get("security").is_some()
}

/// `res` (an answer of `method template`) has a documented status, and a
/// body of a documented media type.
fn assert_documented(doc: &Value, method: &str, template: &str, res: &Res) {
    let status = res.status.as_u16().to_string();
    let op = &doc["paths"][template][method.to_lowercase()];
    assert!(op.is_object(), "{method} {template} is not in the document");
    let response = &op["responses"][&status];
    assert!(
        response.is_object(),
        "{method} {template} answered {status}, documented are {:?}: {}",
        op["responses"].as_object().map(|r| r.keys().collect::<Vec<_>>()),
        res.text()
    );
    if !res.body.is_empty() {
        let media = res.header("content-type").unwrap_or_default().split(';').next().unwrap_or_default().trim();
        assert!(
            response["content"].get(media).is_some(),
            "{method} {template} answered {status} as {media}, documented: {}",
            response["content"]
        );
    }
}

/// The path template with every parameter replaced by `value`.
fn fill(template: &str, value: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map_or(rest.len(), |e| start + e + 1);
        out.push_str(value);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[test]
fn problem_bodies_were_documented_as_application_json() {
    let doc = doc();
    let mut problems = 0;
    for (method, path, op) in operations(&doc) {
        for (status, response) in op["responses"].as_object().expect("responses") {
            for (media, content) in response["content"].as_object().into_iter().flatten() {
                if content["schema"]["$ref"] == "#/components/schemas/Problem" {
                    assert_eq!(media, "application/problem+json", "{method} {path} {status}");
                    problems += 1;
                }
            }
        }
    }
    assert!(problems > 100, "only {problems} problem responses documented");
}

/// With auth on: no token answers 401, a token without the scope 403, on
/// every authenticated operation, and both are documented.
async fn auth_401_and_403_were_undocumented<H: Harness>() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = bootstrap_node_auth(&dir.path().join("secret"), Duration::from_secs(600)).expect("node auth");
    let scope: Scope = "kv:read:other".parse().expect("scope");
    let weak = node.issuer.issue("weak", &[scope], None).expect("token").token;
    let weak = format!("Bearer {weak}");
    let gw = Gw::with_auth::<H>(node.authenticator, None).await;
    let doc = doc();
    let mut checked = 0;
    for (method, template, op) in operations(&doc) {
        if is_public(&op) {
            continue;
        }
        let mut uri = fill(&template, "fuzz");
        if template.ends_with("/messages") {
            uri.push_str("?subject=fuzz.a"); // publish checks the subject's scope
        }
        if template.ends_with("/files") {
            uri.push_str("?run=r&slice=s&file=f"); // an upload checks its subject's scope
        }
        let m = Method::from_bytes(method.as_bytes()).expect("method");
        let res = gw.send(m.clone(), &uri, &[], "").await;
        assert_eq!(res.status, 401, "{method} {uri} without a token: {}", res.text());
        assert_documented(&doc, &method, &template, &res);
        let res = gw.send(m, &uri, &[("authorization", &weak)], "").await;
        assert_eq!(res.status, 403, "{method} {uri} without the scope: {}", res.text());
        assert_documented(&doc, &method, &template, &res);
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} authenticated operations");
}

/// A name that breaks the name rules answers 400 on every operation that
/// takes one, and that is documented.
async fn invalid_name_400_was_undocumented<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let doc = doc();
    let mut checked = 0;
    for (method, template, _) in operations(&doc) {
        if !template.contains('{') {
            continue;
        }
        let uri = fill(&template, "a%23b");
        let res = gw.send(Method::from_bytes(method.as_bytes()).expect("method"), &uri, &[], "").await;
        assert_eq!(res.status, 400, "{method} {uri}: {}", res.text());
        assert_documented(&doc, &method, &template, &res);
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} operations with names");
}

/// Operations on a child of a missing bucket or stream answer 404, which six
/// operations did not document.
async fn missing_parent_404_was_undocumented<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let doc = doc();
    let cases: [(&str, &str, &str, &str); 6] = [
        ("GET", "/v1/kv/{bucket}/keys", "/v1/kv/none/keys", ""),
        ("PUT", "/v1/kv/{bucket}/{key}", "/v1/kv/none/k", "v"),
        ("POST", "/v1/streams/{stream}/messages", "/v1/streams/NONE/messages?subject=none.a", "1"),
        ("GET", "/v1/streams/{stream}/consumers", "/v1/streams/NONE/consumers", ""),
        ("PUT", "/v1/streams/{stream}/consumers/{name}", "/v1/streams/NONE/consumers/c", ""),
        (
            "POST",
            "/v1/streams/{stream}/consumers/{name}/ack",
            "/v1/streams/NONE/consumers/c/ack",
            r#"{"token":"x","kind":"ack"}"#,
        ),
    ];
    for (method, template, uri, body) in cases {
        let headers: &[(&str, &str)] =
            if body.starts_with('{') { &[("content-type", "application/json")] } else { &[] };
        let res = gw.send(Method::from_bytes(method.as_bytes()).expect("method"), uri, headers, body).await;
        res.assert_problem(404, "not-found");
        assert_documented(&doc, method, template, &res);
    }
}

/// Bodies that are not the JSON an operation takes, and `If-None-Match`
/// other than `*`, answer 400 problem+json, which was undocumented (or
/// documented as application/json).
async fn bad_body_and_header_400_was_undocumented<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("fuzz", json!({"subjects": ["fuzz.>"]})).await;
    gw.put("/v1/streams/fuzz/consumers/fuzz", "").await;
    gw.put("/v1/kv/fuzz", "").await;
    let doc = doc();
    let json_ct = [("content-type", "application/json")];
    for (method, template) in [
        ("PUT", "/v1/kv/{bucket}"),
        ("PUT", "/v1/streams/{stream}"),
        ("PUT", "/v1/streams/{stream}/consumers/{name}"),
        ("POST", "/v1/streams/{stream}/consumers/{name}/fetch"),
        ("POST", "/v1/streams/{stream}/consumers/{name}/ack"),
    ] {
        let uri = fill(template, "fuzz");
        let res = gw.send(Method::from_bytes(method.as_bytes()).expect("method"), &uri, &json_ct, "\0").await;
        res.assert_problem(400, "invalid");
        assert_documented(&doc, method, template, &res);
    }
    let res = gw.send(Method::PUT, "/v1/kv/fuzz/k", &[("if-none-match", "null")], "v").await;
    res.assert_problem(400, "invalid");
    assert_documented(&doc, "PUT", "/v1/kv/{bucket}/{key}", &res);
}

/// The `maximum` of a schema property or parameter, from the document.
fn maximum(schema: &Value, what: &str) -> u64 {
    schema["maximum"].as_u64().unwrap_or_else(|| panic!("{what} has no maximum in the document: {schema}"))
}

/// `scripts/fuzz-api` once sent `wait_ms: 12233` (the document allowed any
/// u64) and timed out after its own 10 s. The document now bounds the fetch
/// body and the read limit with exactly what the server enforces: the
/// maxima are accepted, one more is 400 (and 0 where the minimum is 1).
async fn fetch_wait_ms_had_no_maximum_in_the_document<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("fuzz", json!({"subjects": ["fuzz.>"]})).await;
    gw.put("/v1/streams/fuzz/consumers/fuzz", "").await;
    let doc = doc();
    let fetch = &doc["components"]["schemas"]["FetchBody"]["properties"];
    let (max_wait, max_batch) = (maximum(&fetch["wait_ms"], "wait_ms"), maximum(&fetch["batch"], "batch"));
    let uri = "/v1/streams/fuzz/consumers/fuzz/fetch";
    let template = "/v1/streams/{stream}/consumers/{name}/fetch";
    // A ready message makes the longest allowed wait return at once.
    gw.publish_n("fuzz", "fuzz.a", 1).await;
    let res = gw.post(uri, json!({"batch": max_batch, "wait_ms": max_wait}).to_string()).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["messages"].as_array().map(Vec::len), Some(1));
    assert_documented(&doc, "POST", template, &res);
    for body in [json!({"wait_ms": max_wait + 1}), json!({"batch": max_batch + 1}), json!({"batch": 0})] {
        let res = gw.post(uri, body.to_string()).await;
        res.assert_problem(400, "invalid");
        assert_documented(&doc, "POST", template, &res);
    }

    let params = doc["paths"]["/v1/streams/{stream}/messages"]["get"]["parameters"].as_array().expect("params");
    let limit = params.iter().find(|p| p["name"] == "limit").expect("limit parameter");
    let max_limit = maximum(&limit["schema"], "limit");
    let res = gw.get(&format!("/v1/streams/fuzz/messages?limit={max_limit}")).await;
    assert_eq!(res.status, 200, "{}", res.text());
    for bad in [max_limit + 1, 0] {
        let res = gw.get(&format!("/v1/streams/fuzz/messages?limit={bad}")).await;
        res.assert_problem(400, "invalid");
        assert_documented(&doc, "GET", "/v1/streams/{stream}/messages", &res);
    }
}

/// The key listing's page size and cursor are bounded in the document by
/// exactly what the server enforces: the maximum page and the longest key
/// are accepted, one more is 400 (and a limit of 0).
async fn keys_page_bounds_are_in_the_document<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/fuzz", "").await;
    gw.put("/v1/kv/fuzz/k1", "v").await;
    let doc = doc();
    let template = "/v1/kv/{bucket}/keys";
    let params = doc["paths"][template]["get"]["parameters"].as_array().expect("params").clone();
    let param = |name: &str| params.iter().find(|p| p["name"] == name).expect("parameter")["schema"].clone();
    let max_limit = maximum(&param("limit"), "limit");
    assert_eq!(max_limit, finmesh_core::engine::MAX_KEYS_PAGE as u64);
    let max_after = param("after")["maxLength"].as_u64().expect("after has a maxLength") as usize;
    assert_eq!(max_after, finmesh_core::names::MAX_KEY_LEN);
    for q in [format!("limit={max_limit}"), format!("after={}", "k".repeat(max_after))] {
        let res = gw.get(&format!("/v1/kv/fuzz/keys?{q}")).await;
        assert_eq!(res.status, 200, "{}", res.text());
        assert_documented(&doc, "GET", template, &res);
    }
    for q in [format!("limit={}", max_limit + 1), "limit=0".to_owned(), format!("after={}", "k".repeat(max_after + 1))]
    {
        let res = gw.get(&format!("/v1/kv/fuzz/keys?{q}")).await;
        res.assert_problem(400, "invalid");
        assert_documented(&doc, "GET", template, &res);
    }
}

/// `If-Match` was any string in the document, so the fuzzer's values were
/// nearly all 400. The document now gives the form the server parses (a
/// revision, quoted or not); values of that form are parsed (200 or 412),
/// others are 400, and `If-None-Match` is `*` only.
async fn if_match_had_no_pattern_in_the_document<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/fuzz", "").await;
    let rev = gw.put("/v1/kv/fuzz/k", "v").await.json()["revision"].as_u64().expect("revision");
    let doc = doc();
    let header = |method: &str, name: &str| {
        let params = doc["paths"]["/v1/kv/{bucket}/{key}"][method]["parameters"].as_array().expect("params").clone();
        let p = params.into_iter().find(|p| p["name"] == name).expect("header parameter");
        p["schema"]["pattern"].as_str().expect("a pattern").to_owned()
    };
    let revision = r#"^("[0-9]{1,19}"|[0-9]{1,19})$"#;
    assert_eq!(header("put", "If-Match"), revision);
    assert_eq!(header("delete", "If-Match"), revision);
    assert_eq!(header("put", "If-None-Match"), r"^\*$");
    let stale = (rev + 100).to_string();
    for value in [format!("\"{stale}\""), stale] {
        let res = gw.send(Method::PUT, "/v1/kv/fuzz/k", &[("if-match", &value)], "v").await;
        res.assert_problem(412, "wrong-revision");
    }
    let res = gw.send(Method::PUT, "/v1/kv/fuzz/k", &[("if-match", &format!("W/\"{rev}\""))], "v").await;
    res.assert_problem(400, "invalid");
    let res = gw.send(Method::PUT, "/v1/kv/fuzz/new", &[("if-none-match", "*")], "v").await;
    assert_eq!(res.status, 200, "{}", res.text());
    let res = gw.send(Method::DELETE, "/v1/kv/fuzz/new", &[("if-match", "\"1\"")], "").await;
    res.assert_problem(412, "wrong-revision");
    assert_documented(&doc, "DELETE", "/v1/kv/{bucket}/{key}", &res);
}

per_engine!(
    keys_page_bounds_are_in_the_document,
    if_match_had_no_pattern_in_the_document,
    fetch_wait_ms_had_no_maximum_in_the_document,
    auth_401_and_403_were_undocumented,
    invalid_name_400_was_undocumented,
    missing_parent_404_was_undocumented,
    bad_body_and_header_400_was_undocumented
);
