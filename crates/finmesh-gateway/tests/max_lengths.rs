//! The limits sweep (issue 17): every name, key, subject, header and config
//! field at its maximum and at its maximum + 1, through HTTP, on both
//! engines. The answer is a 2xx or a 4xx `problem+json`, never a 5xx; where
//! the limit is finmesh's own, the maximum is accepted and maximum + 1 is
//! refused. (Regression: a key of 1,020–1,024 bytes answered 500, the
//! embedded engine panicking on the subject `$KV.<bucket>.<key>`.)

mod support;

use axum::http::Method;
use finmesh_core::config::MAX_PAYLOAD_LIMIT;
use finmesh_core::engine::{MAX_KEYS_PAGE, MAX_READ_LIMIT};
use finmesh_core::message::MAX_HEADER_NAME_LEN;
use finmesh_core::names::{MAX_BUCKET_NAME_LEN, MAX_CONSUMER_NAME_LEN, MAX_KEY_LEN, MAX_STREAM_NAME_LEN};
use finmesh_core::options::{MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN};
use finmesh_core::subject::MAX_SUBJECT_LEN;
use finmesh_gateway::consumers::{MAX_FETCH_BATCH, MAX_FETCH_WAIT};
use serde_json::{Value, json};
use support::{Gw, Harness, Res};

/// What a probe must answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// 2xx.
    Ok,
    /// A 4xx problem.
    Refused,
    /// Either, but never a 5xx (the engine or its server may set a lower
    /// limit than finmesh's, e.g. NATS's `max_payload` or single-server
    /// replicas).
    NoServerError,
}

/// Send one probe and check its answer against `want`.
async fn probe(
    gw: &Gw,
    what: &str,
    want: Want,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Res {
    let r = gw.send(method.clone(), uri, headers, body).await;
    let s = r.status.as_u16();
    let short = |u: &str| u.chars().take(120).collect::<String>();
    assert!(s < 500, "{what}: {method} {} answered {s}: {}", short(uri), r.text());
    if (400..500).contains(&s) {
        assert_eq!(r.header("content-type"), Some("application/problem+json"), "{what}: {}", r.text());
    }
    match want {
        Want::Ok => assert!((200..300).contains(&s), "{what}: {method} {} answered {s}: {}", short(uri), r.text()),
        Want::Refused => assert!((400..500).contains(&s), "{what}: {method} {} answered {s}", short(uri)),
        Want::NoServerError => {}
    }
    r
}

async fn put(gw: &Gw, what: &str, want: Want, uri: &str, body: Value) -> Res {
    probe(gw, what, want, Method::PUT, uri, &[], body.to_string()).await
}

fn x(n: usize) -> String {
    "x".repeat(n)
}

/// A subject of exactly `len` bytes under `prefix.` (tokens of ≤ 100 bytes).
fn subject_of(prefix: &str, len: usize) -> String {
    let mut s = prefix.to_owned();
    while s.len() < len {
        let room = len - s.len() - 1;
        s.push('.');
        s.push_str(&x(room.clamp(1, 100)));
    }
    assert_eq!(s.len(), len);
    s
}

async fn names_at_their_limits<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let subjects = json!({"subjects": ["sweep.>"]});
    put(&gw, "stream name max", Want::Ok, &format!("/v1/streams/{}", x(MAX_STREAM_NAME_LEN)), subjects.clone()).await;
    put(&gw, "stream name max+1", Want::Refused, &format!("/v1/streams/{}", x(MAX_STREAM_NAME_LEN + 1)), subjects)
        .await;
    put(&gw, "bucket name max", Want::Ok, &format!("/v1/kv/{}", x(MAX_BUCKET_NAME_LEN)), json!({})).await;
    put(&gw, "bucket name max+1", Want::Refused, &format!("/v1/kv/{}", x(MAX_BUCKET_NAME_LEN + 1)), json!({})).await;
    gw.stream("S", json!({"subjects": ["s.>"]})).await;
    let c = |n| format!("/v1/streams/S/consumers/{}", x(n));
    put(&gw, "consumer name max", Want::Ok, &c(MAX_CONSUMER_NAME_LEN), json!({})).await;
    put(&gw, "consumer name max+1", Want::Refused, &c(MAX_CONSUMER_NAME_LEN + 1), json!({})).await;
    let dlq = json!({"max_deliver": 1, "dead_letter": "d".repeat(MAX_STREAM_NAME_LEN)});
    put(&gw, "dead letter stream max", Want::Ok, &c(MAX_CONSUMER_NAME_LEN - 1), dlq).await;
    let dlq = json!({"max_deliver": 1, "dead_letter": "d".repeat(MAX_STREAM_NAME_LEN + 1)});
    put(&gw, "dead letter stream max+1", Want::Refused, &c(MAX_CONSUMER_NAME_LEN - 2), dlq).await;
}

async fn keys_at_their_limit<H: Harness>() {
    let gw = Gw::start::<H>().await;
    // The longest key in the longest bucket is the longest subject.
    for bucket in [x(MAX_BUCKET_NAME_LEN), "b".to_owned()] {
        put(&gw, "bucket", Want::Ok, &format!("/v1/kv/{bucket}"), json!({"history": 2})).await;
        for (n, want) in [(MAX_KEY_LEN, Want::Ok), (MAX_KEY_LEN + 1, Want::Refused)] {
            let k = format!("/v1/kv/{bucket}/{}", "k".repeat(n));
            for (method, what) in [
                (Method::PUT, "put key"),
                (Method::GET, "get key"),
                (Method::PUT, "put key again"),
                (Method::DELETE, "delete key"),
            ] {
                probe(&gw, &format!("{what} of {n} bytes"), want, method, &k, &[], "v".to_owned()).await;
            }
            probe(&gw, "history", want, Method::GET, &format!("{k}/history"), &[], String::new()).await;
            let cas = [("if-none-match", "*")];
            probe(&gw, "create-only", want, Method::PUT, &k, &cas, "v".to_owned()).await;
            let cas = [("if-match", "\"18446744073709551615\"")];
            let r =
                probe(&gw, "update at the largest revision", Want::Refused, Method::PUT, &k, &cas, "v".into()).await;
            if want == Want::Ok {
                assert_eq!(r.status, 412, "{}", r.text());
            }
        }
        let prefix = "k".repeat(MAX_KEY_LEN + 1);
        let r = probe(
            &gw,
            "keys by long prefix",
            Want::Ok,
            Method::GET,
            &format!("/v1/kv/{bucket}/keys?prefix={prefix}"),
            &[],
            String::new(),
        )
        .await;
        assert_eq!(r.json()["keys"], json!([]));
        // Key listing pages: the cursor is a key, the limit a page size.
        let keys = format!("/v1/kv/{bucket}/keys");
        for (q, want) in [
            (format!("after={}", "k".repeat(MAX_KEY_LEN)), Want::Ok),
            (format!("after={}", "k".repeat(MAX_KEY_LEN + 1)), Want::Refused),
            (format!("limit={MAX_KEYS_PAGE}"), Want::Ok),
            (format!("limit={}", MAX_KEYS_PAGE + 1), Want::Refused),
            ("limit=18446744073709551616".to_owned(), Want::Refused),
        ] {
            probe(
                &gw,
                &format!("keys page {}", &q[..q.len().min(40)]),
                want,
                Method::GET,
                &format!("{keys}?{q}"),
                &[],
                String::new(),
            )
            .await;
        }
    }
}

/// Bucket and stream metadata: entries, key length and value length at
/// their maximum and one past it.
async fn metadata_at_its_limits<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let entries = |n: usize| -> Value {
        (0..n).map(|i| (format!("k{i}"), Value::String("v".into()))).collect::<serde_json::Map<_, _>>().into()
    };
    let cases = [
        ("entries", entries(MAX_METADATA_ENTRIES), Want::Ok),
        ("entries", entries(MAX_METADATA_ENTRIES + 1), Want::Refused),
        ("key length", json!({ x(MAX_METADATA_KEY_LEN): "v" }), Want::Ok),
        ("key length", json!({ x(MAX_METADATA_KEY_LEN + 1): "v" }), Want::Refused),
        ("value length", json!({ "k": x(MAX_METADATA_VALUE_LEN) }), Want::Ok),
        ("value length", json!({ "k": x(MAX_METADATA_VALUE_LEN + 1) }), Want::Refused),
    ];
    for (i, (what, metadata, want)) in cases.into_iter().enumerate() {
        let r =
            put(&gw, &format!("bucket metadata {what}"), want, &format!("/v1/kv/m{i}"), json!({"metadata": metadata}))
                .await;
        if want == Want::Ok {
            assert_eq!(r.json()["config"]["metadata"], metadata);
        }
        let body = json!({"subjects": [format!("m{i}.>")], "metadata": metadata});
        put(&gw, &format!("stream metadata {what}"), want, &format!("/v1/streams/M{i}"), body).await;
    }
}

async fn subjects_and_headers_at_their_limits<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("S", json!({"subjects": ["sweep.>"]})).await;
    for (n, want) in [(MAX_SUBJECT_LEN, Want::Ok), (MAX_SUBJECT_LEN + 1, Want::Refused)] {
        let subject = subject_of("sweep", n);
        let what = format!("subject of {n} bytes");
        let uri = format!("/v1/streams/S/messages?subject={subject}");
        probe(&gw, &what, want, Method::POST, &uri, &[], "p".to_owned()).await;
        let h = [("finmesh-subject", subject.as_str())];
        probe(&gw, &what, want, Method::POST, "/v1/streams/S/messages", &h, "p".to_owned()).await;
        let line = json!({"subject": subject, "payload": 1}).to_string();
        let nd = [("content-type", "application/x-ndjson")];
        probe(&gw, &what, want, Method::POST, "/v1/streams/S/messages", &nd, line).await;
        let uri = format!("/v1/streams/S/messages?subject={subject}");
        probe(&gw, &what, want, Method::GET, &uri, &[], String::new()).await;
        let pattern = subject_of("sweep", n - 2) + ".>";
        let uri = format!("/v1/streams/S/messages?subject={}", pattern.replace('>', "%3E"));
        probe(&gw, &what, want, Method::GET, &uri, &[], String::new()).await;
        let name = format!("F{n}");
        put(&gw, &what, want, &format!("/v1/streams/S/consumers/{name}"), json!({"filter": pattern})).await;
        let own = subject_of("own", n);
        put(&gw, &what, want, &format!("/v1/streams/P{n}"), json!({"subjects": [own]})).await;
    }
    let nd = [("content-type", "application/x-ndjson")];
    for (n, want) in [(MAX_HEADER_NAME_LEN, Want::Ok), (MAX_HEADER_NAME_LEN + 1, Want::Refused)] {
        let line = json!({"subject": "sweep.h", "headers": {x(n): "v"}}).to_string();
        probe(&gw, &format!("header name of {n} bytes"), want, Method::POST, "/v1/streams/S/messages", &nd, line).await;
    }
    for (n, want) in [(256, Want::Ok), (257, Want::Refused)] {
        let id = x(n);
        let what = format!("message id of {n} bytes");
        let h = [("msg-id", id.as_str())];
        probe(&gw, &what, want, Method::POST, "/v1/streams/S/messages?subject=sweep.id", &h, "p".into()).await;
        let line = json!({"subject": "sweep.id", "msg_id": id}).to_string();
        probe(&gw, &what, want, Method::POST, "/v1/streams/S/messages", &nd, line).await;
    }
    // A header value is bounded by the message size: subject + headers + payload.
    gw.stream("SMALL", json!({"subjects": ["small"], "max_msg_size": 100})).await;
    for (n, want) in [(100, Want::Ok), (101, Want::Refused)] {
        let value = x(n - "small".len() - "h".len() - 4);
        let line = json!({"subject": "small", "headers": {"h": value}}).to_string();
        let r =
            probe(&gw, &format!("message of {n} bytes"), want, Method::POST, "/v1/streams/SMALL/messages", &nd, line)
                .await;
        if want == Want::Refused {
            assert_eq!(r.status, 413);
        }
    }
    let limit = MAX_PAYLOAD_LIMIT as usize;
    put(&gw, "bucket", Want::Ok, "/v1/kv/big", json!({})).await;
    for (n, want) in [(limit, Want::NoServerError), (limit + 1, Want::Refused)] {
        let payload = x(n - "sweep.big".len());
        probe(
            &gw,
            &format!("message of {n} bytes"),
            want,
            Method::POST,
            "/v1/streams/S/messages?subject=sweep.big",
            &[],
            payload,
        )
        .await;
        probe(&gw, &format!("value of {n} bytes"), want, Method::PUT, "/v1/kv/big/k", &[], x(n)).await;
    }
}

async fn config_fields_at_their_limits<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let max = u64::MAX;
    let over = "18446744073709551616";
    let raw = |uri: &str, body: String| (uri.to_owned(), body);
    // Stream config: every numeric field at its maximum, then one past it.
    let mut n = 0;
    let mut stream = |field: &str, value: Value, want: Want| {
        n += 1;
        let mut body = json!({"subjects": [format!("f{n}.>")]});
        body[field] = value;
        (format!("/v1/streams/F{n}"), body, want, field.to_owned())
    };
    let streams = [
        stream("max_msgs", json!(max), Want::Ok),
        // NATS reserves max_bytes of its storage: more than it has is a 400.
        stream("max_bytes", json!(max), Want::NoServerError),
        stream("max_msgs_per_subject", json!(max), Want::Ok),
        stream("max_age", json!(max), Want::Ok),
        stream("duplicate_window", json!(max), Want::NoServerError),
        stream("max_msg_size", json!(MAX_PAYLOAD_LIMIT), Want::Ok),
        stream("max_msg_size", json!(MAX_PAYLOAD_LIMIT as u64 + 1), Want::Refused),
        stream("replicas", json!(5), Want::NoServerError),
        stream("replicas", json!(6), Want::Refused),
        stream("sync", json!({"interval": {"ms": max}}), Want::Ok),
    ];
    for (uri, body, want, field) in streams {
        put(&gw, &format!("stream {field} = {}", body[&field]), want, &uri, body).await;
    }
    // A write to the stream with the longest sync interval (it used to
    // overflow the writer's clock and kill it).
    let sync_stream = "/v1/streams/F10/messages?subject=f10.x";
    probe(&gw, "publish with sync interval max", Want::Ok, Method::POST, sync_stream, &[], "p".into()).await;
    probe(&gw, "publish after it", Want::Ok, Method::POST, "/v1/streams/F1/messages?subject=f1.x", &[], "p".into())
        .await;
    for field in ["max_msgs", "max_bytes", "max_msgs_per_subject", "max_age", "duplicate_window", "max_msg_size"] {
        let (uri, body) = raw("/v1/streams/OVER", format!(r#"{{"subjects":["over.>"],"{field}":{over}}}"#));
        probe(&gw, &format!("stream {field} over u64"), Want::Refused, Method::PUT, &uri, &[], body).await;
    }
    // Bucket config.
    let buckets = [
        ("history", json!(64), Want::Ok),
        ("history", json!(65), Want::Refused),
        ("ttl", json!(max), Want::Ok),
        ("max_value_size", json!(MAX_PAYLOAD_LIMIT), Want::Ok),
        ("max_value_size", json!(MAX_PAYLOAD_LIMIT as u64 + 1), Want::Refused),
        ("max_bytes", json!(max), Want::NoServerError),
        ("replicas", json!(5), Want::NoServerError),
        ("replicas", json!(6), Want::Refused),
        ("sync", json!({"interval": {"ms": max}}), Want::Ok),
    ];
    for (i, (field, value, want)) in buckets.into_iter().enumerate() {
        put(&gw, &format!("bucket {field} = {value}"), want, &format!("/v1/kv/b{i}"), json!({ field: value })).await;
        if want == Want::Ok {
            probe(
                &gw,
                &format!("put in bucket {field} = {value}"),
                Want::Ok,
                Method::PUT,
                &format!("/v1/kv/b{i}/k"),
                &[],
                "v".into(),
            )
            .await;
        }
    }
    // Consumer config and the consumer calls.
    gw.stream("S", json!({"subjects": ["s.>"]})).await;
    gw.publish_n("S", "s.a", 2).await;
    let consumers = [
        ("ack_wait", json!(max), Want::Ok),
        ("max_deliver", json!(u32::MAX), Want::Ok),
        ("max_deliver", json!(u32::MAX as u64 + 1), Want::Refused),
        ("max_ack_pending", json!(u32::MAX), Want::Ok),
        ("max_ack_pending", json!(u32::MAX as u64 + 1), Want::Refused),
        ("deliver", json!({"policy": "from_seq", "seq": max}), Want::Ok),
        ("deliver", json!({"policy": "from_time", "time": max}), Want::Ok),
    ];
    for (i, (field, value, want)) in consumers.into_iter().enumerate() {
        let uri = format!("/v1/streams/S/consumers/c{i}");
        put(&gw, &format!("consumer {field} = {value}"), want, &uri, json!({ field: value })).await;
    }
    let fetch = "/v1/streams/S/consumers/c0/fetch";
    let wait = MAX_FETCH_WAIT.as_millis() as u64;
    for (body, want) in [
        (json!({"batch": MAX_FETCH_BATCH}), Want::Ok),
        (json!({"batch": MAX_FETCH_BATCH + 1}), Want::Refused),
        (json!({"batch": 1, "wait_ms": wait + 1}), Want::Refused),
    ] {
        probe(&gw, &format!("fetch {body}"), want, Method::POST, fetch, &[], body.to_string()).await;
    }
    // c0 has a huge ack_wait: its deliveries stay pending, so nak them.
    put(&gw, "consumer", Want::Ok, "/v1/streams/S/consumers/n", json!({})).await;
    let r = probe(
        &gw,
        "fetch",
        Want::Ok,
        Method::POST,
        "/v1/streams/S/consumers/n/fetch",
        &[],
        json!({"batch": 2, "wait_ms": wait}).to_string(),
    )
    .await;
    let tokens: Vec<String> =
        r.json()["messages"].as_array().unwrap().iter().map(|m| m["token"].as_str().unwrap().to_owned()).collect();
    assert_eq!(tokens.len(), 2);
    let ack = "/v1/streams/S/consumers/n/ack";
    let nak = json!({"token": tokens[0], "kind": "nak", "delay": max}).to_string();
    probe(&gw, "nak with the longest delay", Want::Ok, Method::POST, ack, &[], nak).await;
    let nak = format!(r#"{{"token":"{}","kind":"nak","delay":{over}}}"#, tokens[1]);
    probe(&gw, "nak delay over u64", Want::Refused, Method::POST, ack, &[], nak).await;
    let in_progress = json!({"token": tokens[1], "kind": "in_progress"}).to_string();
    probe(&gw, "in progress", Want::Ok, Method::POST, ack, &[], in_progress).await;
    // Range reads.
    for (q, want) in [
        (format!("limit={MAX_READ_LIMIT}"), Want::Ok),
        (format!("limit={}", MAX_READ_LIMIT + 1), Want::Refused),
        (format!("from_seq={max}"), Want::Ok),
        (format!("from_seq={over}"), Want::Refused),
    ] {
        probe(&gw, &format!("read {q}"), want, Method::GET, &format!("/v1/streams/S/messages?{q}"), &[], String::new())
            .await;
    }
}

per_engine!(
    names_at_their_limits,
    keys_at_their_limit,
    metadata_at_its_limits,
    subjects_and_headers_at_their_limits,
    config_fields_at_their_limits
);
