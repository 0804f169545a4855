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

per_engine!(
    auth_401_and_403_were_undocumented,
    invalid_name_400_was_undocumented,
    missing_parent_404_was_undocumented,
    bad_body_and_header_400_was_undocumented
);
