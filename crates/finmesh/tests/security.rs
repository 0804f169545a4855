//! `[security]` at node start (issue 18): the node loads the master key
//! before it touches anything, keeps the key ring in the engine and serves
//! encrypted buckets through the encrypting wrapper; a wrong or missing
//! master key is a clear error, a non-zero exit, and changes nothing.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;
use support::{Engine, NodeSpec, WAIT, http};

/// Run `finmesh serve` with `spec`'s configuration, expecting it to exit by
/// itself (it must not start); returns the exit code and standard error.
fn serve_must_fail(spec: &NodeSpec) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&spec.config)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .args(&spec.engine_args)
        .env_remove("FINMESH_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start finmesh serve");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => {
            let out = out.expect("wait for serve");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(!stdout.contains("listening on"), "the node started: {stdout}");
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child, which the thread still waits for.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("serve did not exit within {WAIT:?}; it should have refused to start");
        }
    }
}

/// Everything the embedded engine in `dir` holds, as a comparable text:
/// every bucket's state, and every entry of every key (the key ring's
/// included); every stream's state. Opening an engine rewrites its own
/// bookkeeping files (journal, version records), so a refused start is
/// compared by what the engine holds, not byte for byte.
async fn engine_contents(dir: &Path) -> String {
    use finmesh_core::{KvEngine, StreamEngine};
    let engine = finmesh_embedded::EmbeddedEngine::open(dir).unwrap();
    let mut out = String::new();
    for b in engine.list_buckets().await.unwrap() {
        let info = engine.bucket_info(&b).await.unwrap();
        out += &format!("{b}: {info:?}\n");
        for k in engine.kv_keys(&b, "").await.unwrap() {
            out += &format!("  {k}: {:?}\n", engine.kv_history(&b, &k).await.unwrap());
        }
    }
    for s in engine.list_streams().await.unwrap() {
        out += &format!("{s}: {:?}\n", engine.stream_info(&s).await.unwrap());
    }
    engine.close().await.unwrap();
    out
}

fn config(key_file: &Path) -> String {
    format!("[security]\nmaster_key_file = {:?}\n", key_file.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_master_key_stops_the_node_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    let spec = NodeSpec::new(dir.path(), &config(&key_file), &Engine::Embedded);

    // Missing: refused before the data dir is even created.
    let (code, stderr) = serve_must_fail(&spec);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("master key") && stderr.contains(&key_file.display().to_string()), "{stderr}");
    assert!(!spec.data_dir.exists(), "nothing was created before the master key was checked");

    // The right key: the node starts, creates its ring and serves an
    // encrypted bucket.
    finmesh_crypto::FileKeyProvider::create(&key_file).unwrap();
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    let body = json!({"history": 2, "security": {"encryption": "aes256gcm", "key_hashing": "hmac-sha256"}});
    let res = http().put(node.url("/v1/kv/cards")).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let res =
        http().put(node.url("/v1/kv/cards/alice")).bearer_auth(&token).body("token-of-alice").send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let stderr = node.stop(libc::SIGTERM);
    assert!(stderr.contains("key ring loaded"), "{stderr}");
    let before = engine_contents(&spec.data_dir).await;
    assert!(before.contains("_finmesh_keys") && before.contains("cards"), "{before}");

    // A wrong key (valid, but not the one the ring was made with): a clear
    // error, exit 1, not one byte of the data dir changed.
    let right = std::fs::read(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    finmesh_crypto::FileKeyProvider::create(&key_file).unwrap();
    let (code, stderr) = serve_must_fail(&spec);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot load the key ring") && stderr.contains("nothing was changed"), "{stderr}");
    assert!(stderr.contains("is it the master key"), "{stderr}");
    assert_eq!(engine_contents(&spec.data_dir).await, before, "the engine changed after a refused start");

    // A key file others can read: refused too, naming the fix.
    std::fs::remove_file(&key_file).unwrap();
    std::fs::write(&key_file, &right).unwrap();
    let (code, stderr) = serve_must_fail(&spec);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert_eq!(engine_contents(&spec.data_dir).await, before, "the engine changed after a refused start");

    // The right key again: everything is there.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let node = spec.start("127.0.0.1:0");
    let res = http().get(node.url("/v1/kv/cards/alice")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "token-of-alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_security_encrypted_buckets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "", &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    let body = json!({"security": {"encryption": "aes256gcm"}});
    let res = http().put(node.url("/v1/kv/cards")).bearer_auth(&token).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let problem: serde_json::Value = res.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("encryption is not available on this node"), "{problem}");
}

#[test]
fn config_check_explains_security_problems() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("finmesh.toml");
    std::fs::write(&file, "[security]\nmaster_key_file = \"/k\"\nmaster_key_env = \"K\"\nring_replicas = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh")).args(["config", "check", "--config"]).arg(&file).output();
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not both") && stderr.contains("security.ring_replicas"), "{stderr}");
}

/// The CLI, for `node`: returns (exit code, stdout, stderr); `stdin` is fed
/// to the process.
fn cli(node: &support::Node, token: &str, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env("FINMESH_SERVER", node.url(""))
        .env("FINMESH_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Values of an encrypted or hashed bucket are refused as a CLI argument
/// (shell history) and taken from stdin or --file; a plain bucket still
/// takes them as an argument. Problem bodies name a refused card number
/// masked, and a PAN bucket's 400 names the rule, not the number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_problems_keep_card_numbers_out_of_sight() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    finmesh_crypto::FileKeyProvider::create(&key_file).unwrap();
    let spec = NodeSpec::new(dir.path(), &config(&key_file), &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let t = spec.admin_token();
    let (code, _, err) = cli(&node, &t, &["kv", "create", "cards", "--encrypt", "--hash-keys", "--pan-keys"], b"");
    assert_eq!(code, Some(0), "{err}");
    let pan = "4111111111111111";
    let (code, _, err) = cli(&node, &t, &["kv", "put", "cards", pan, "secret-token"], b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("stdin") && err.contains("shell history"), "{err}");
    let (code, out, err) = cli(&node, &t, &["kv", "put", "cards", pan, "-"], b"from-stdin");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("revision 1"), "{out}");
    let value_file = dir.path().join("value");
    std::fs::write(&value_file, "from-file").unwrap();
    let (code, _, err) = cli(&node, &t, &["kv", "put", "cards", pan, "--file", value_file.to_str().unwrap()], b"");
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cli(&node, &t, &["kv", "get", "cards", pan], b"");
    assert_eq!(out, "from-file");
    let (code, _, err) = cli(&node, &t, &["kv", "create", "plain"], b"");
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cli(&node, &t, &["kv", "put", "plain", "k", "v"], b"");
    assert_eq!(code, Some(0), "a plain bucket takes an argument: {err}");

    // 400s and 404s over HTTP: the rule, never the number.
    let bad_luhn = "4111111111111112";
    for (path, status) in [
        (format!("/v1/kv/cards/{bad_luhn}"), 400),
        ("/v1/kv/cards/4111%201111%201111%201111".to_owned(), 400),
        ("/v1/kv/cards/5500005555555559".to_owned(), 404),
    ] {
        let res = http().get(node.url(&path)).bearer_auth(&t).send().await.unwrap();
        assert_eq!(res.status(), status, "{path}");
        let body = res.text().await.unwrap();
        for digits in ["411111111111", "4111 1111", "550000555555"] {
            assert!(!body.contains(digits), "{path}: {body}");
        }
    }
    let res = http().put(node.url(&format!("/v1/kv/cards/{bad_luhn}"))).bearer_auth(&t).body("v").send().await;
    let p: serde_json::Value = res.unwrap().json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("Luhn"), "{p}");
    let stderr = node.stop(libc::SIGTERM);
    for digits in ["411111111111", "550000555555", "secret-token", "from-stdin", "from-file"] {
        assert!(!stderr.contains(digits), "the log shows {digits}: {stderr}");
    }
}
