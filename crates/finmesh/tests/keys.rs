//! `finmesh keys …` and `finmesh kv reencrypt` end to end against a spawned
//! node (issue 18, item 7): `init` offline refuses to clobber a ring,
//! `list` shows no key material, a retirement is refused with the count
//! until `kv reencrypt` moved the values, and then succeeds.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use support::{Engine, NodeSpec};

/// The CLI with `env` set: (exit code, stdout, stderr); `stdin` is fed.
fn finmesh(args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_finmesh"));
    cmd.args(args).env_remove("FINMESH_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn init(spec: &NodeSpec) -> (Option<i32>, String, String) {
    let config = spec.config.display().to_string();
    let data = spec.data_dir.display().to_string();
    finmesh(&["keys", "init", "--node-config", &config, "--data-dir", &data], &[], b"")
}

fn config(key_file: &Path) -> String {
    format!("[security]\nmaster_key_file = {:?}\n", key_file.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_commands_rotate_reencrypt_and_retire() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.key");
    finmesh_crypto::FileKeyProvider::create(&key_file).unwrap();
    let spec = NodeSpec::new(dir.path(), &config(&key_file), &Engine::Embedded);

    // init: offline, once.
    let (code, out, err) = init(&spec);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("key ring created: encryption key 1 and hashing key 2 active"), "{out}");
    let (code, _, err) = init(&spec);
    assert_eq!(code, Some(1), "a second init must fail");
    assert!(err.contains("a key ring already exists") && err.contains("not replacing it"), "{err}");

    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    let url = node.url("");
    let env = [("FINMESH_SERVER", url.as_str()), ("FINMESH_TOKEN", token.as_str())];
    // A second init while the node runs is refused too (the data dir is
    // locked, or the ring exists): never a new ring.
    assert_eq!(init(&spec).0, Some(1));

    let (code, _, err) = finmesh(&["kv", "create", "cards", "--encrypt"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    for key in ["alice", "bob"] {
        let (code, _, err) = finmesh(&["kv", "put", "cards", key, "-"], &env, format!("token-of-{key}").as_bytes());
        assert_eq!(code, Some(0), "{err}");
    }

    let (code, list, err) = finmesh(&["keys", "list"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    let rows: Vec<Vec<&str>> = list.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0][..3], ["1", "encryption", "active"], "{list}");
    assert_eq!(rows[1][..3], ["2", "hashing", "active"], "{list}");
    let (code, json, _) = finmesh(&["keys", "list", "--json"], &env, b"");
    assert_eq!(code, Some(0));
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    for key in json["keys"].as_array().unwrap() {
        let mut fields: Vec<&String> = key.as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(fields, ["created", "id", "purpose", "state"], "no field carries key material: {key}");
    }
    for text in [&list, &json.to_string()] {
        let longest = text.split(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '/').map(str::len).max();
        assert!(longest.unwrap_or(0) < 40, "nothing long enough to be key material: {text}");
    }

    let (code, out, err) = finmesh(&["keys", "rotate"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "key 3: encryption active");

    let (code, _, err) = finmesh(&["keys", "retire", "1"], &env, b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("key 1 still protects 2 values (bucket `cards`: 2 values)"), "{err}");
    assert!(err.contains("HTTP 409"), "{err}");

    // Not a terminal: no bar, one summary line.
    let (code, out, err) = finmesh(&["kv", "reencrypt", "cards"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("2 keys examined, 2 rewritten under key 3"), "{out}");
    let (code, out, err) = finmesh(&["kv", "reencrypt", "cards", "--json", "--batch", "1"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true, "{out}");
    assert_eq!(last["total"]["current"], 2, "nothing left to rewrite: {out}");
    let (code, _, err) = finmesh(&["kv", "reencrypt", "nope"], &env, b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("HTTP 404"), "{err}");

    let (code, out, err) = finmesh(&["keys", "retire", "1"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "key 1: encryption retired");
    let (code, out, _) = finmesh(&["kv", "get", "cards", "alice"], &env, b"");
    assert_eq!(code, Some(0));
    assert_eq!(out.trim_end(), "token-of-alice");
    drop(node);
}

/// A master-key change: `keys rewrap` (offline) stores the ring wrapped by
/// a new key it creates; the node then starts only with the new key and
/// serves every value written before; a second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rewrap_changes_the_master_key_and_keeps_every_value() {
    let dir = tempfile::tempdir().unwrap();
    let old_key = dir.path().join("master.key");
    finmesh_crypto::FileKeyProvider::create(&old_key).unwrap();
    let spec = NodeSpec::new(dir.path(), &config(&old_key), &Engine::Embedded);
    assert_eq!(init(&spec).0, Some(0));
    let (config_arg, data) = (spec.config.display().to_string(), spec.data_dir.display().to_string());
    let new_key = dir.path().join("new.key");
    let new_arg = new_key.display().to_string();
    let rewrap = |extra: &[&str]| {
        let mut args = vec!["keys", "rewrap", "--node-config", &config_arg, "--data-dir", &data];
        args.extend_from_slice(extra);
        finmesh(&args, &[], b"")
    };

    let node = spec.start("127.0.0.1:0");
    let (token, url) = (spec.admin_token(), node.url(""));
    let env = [("FINMESH_SERVER", url.as_str()), ("FINMESH_TOKEN", token.as_str())];
    assert_eq!(finmesh(&["kv", "create", "cards", "--encrypt"], &env, b"").0, Some(0));
    let (code, _, err) = finmesh(&["kv", "put", "cards", "alice", "-"], &env, b"token-of-alice");
    assert_eq!(code, Some(0), "{err}");
    // While the node holds the data dir, nothing is changed, and the key
    // file this run created is not left behind.
    let (code, _, err) = rewrap(&["--new-master-key-file", &new_arg, "--create"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!new_key.exists(), "a key file wrapping nothing was left: {err}");
    drop(node);

    let (code, out, err) = rewrap(&["--new-master-key-file", &new_arg, "--create"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("key ring rewrapped") && out.contains(&new_arg), "{out}");
    let (code, out, err) = rewrap(&["--new-master-key-file", &new_arg]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("already; nothing changed"), "{out}");
    let (code, _, err) = rewrap(&["--new-master-key-file", &new_arg, "--create"]);
    assert_eq!(code, Some(1), "an existing key file is never overwritten: {err}");
    assert!(err.contains("cannot create master key file"), "{err}");

    // The old key no longer starts the node; the new one does, same values.
    let (code, _, err) =
        finmesh(&["serve", "--listen", "127.0.0.1:0", "--config", &config_arg, "--data-dir", &data], &[], b"");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot load the key ring"), "{err}");
    std::fs::write(&spec.config, config(&new_key)).unwrap();
    let node = spec.start("127.0.0.1:0");
    let url = node.url("");
    let env = [("FINMESH_SERVER", url.as_str()), ("FINMESH_TOKEN", token.as_str())];
    let (code, out, err) = finmesh(&["kv", "get", "cards", "alice"], &env, b"");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim_end(), "token-of-alice");
    let (code, list, _) = finmesh(&["keys", "list"], &env, b"");
    assert_eq!(code, Some(0));
    assert_eq!(list.lines().count(), 3, "the same two keys: {list}");
    drop(node);
}
