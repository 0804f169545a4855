//! Finding a server binary.
//!
//! Order: an explicit path given to a builder, then the environment variable
//! (`FINMESH_NATS_SERVER`, `FINMESH_REDIS_SERVER`), then the directories of
//! `PATH`. A variable that is set but names no executable file is an error,
//! not a reason to fall back to `PATH`: it was set on purpose.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Environment variable naming the `nats-server` binary.
pub const NATS_SERVER_ENV: &str = "FINMESH_NATS_SERVER";

/// Environment variable naming the `redis-server` binary.
pub const REDIS_SERVER_ENV: &str = "FINMESH_REDIS_SERVER";

/// Find `program`: `explicit` if given, else `$env_var`, else `PATH`.
/// `install_hint` is appended to the error message.
pub fn find_binary(
    program: &'static str,
    explicit: Option<&Path>,
    env_var: &str,
    install_hint: &str,
) -> Result<PathBuf> {
    find_in(program, explicit, std::env::var_os(env_var), env_var, std::env::var_os("PATH"), install_hint)
}

fn find_in(
    program: &'static str,
    explicit: Option<&Path>,
    env_value: Option<OsString>,
    env_var: &str,
    path_var: Option<OsString>,
    install_hint: &str,
) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(Error::BinaryNotFound {
                program,
                hint: format!("the given path {p:?} is not an executable file; {install_hint}"),
            })
        };
    }
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(Error::BinaryNotFound {
                program,
                hint: format!("{env_var}={p:?} is not an executable file; {install_hint}"),
            })
        };
    }
    if let Some(path) = path_var {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(program);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(Error::BinaryNotFound { program, hint: format!("set {env_var} to its path or put it on PATH; {install_hint}") })
}

fn is_executable(p: &Path) -> bool {
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_var_wins_over_path_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();

        let found =
            find_in("fake-server", None, Some(bin.clone().into()), "X", Some("/nonexistent".into()), "").unwrap();
        assert_eq!(found, bin);

        let err = find_in("fake-server", None, Some("/no/such/bin".into()), "X", Some(dir.path().into()), "hint")
            .unwrap_err();
        assert!(err.to_string().contains("X=\"/no/such/bin\" is not an executable"), "{err}");
    }

    #[test]
    fn searches_path_and_explains_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-server");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths(["/nonexistent".into(), dir.path().to_path_buf()]).unwrap();
        assert_eq!(find_in("fake-server", None, None, "X", Some(path), "").unwrap(), bin);

        // Not executable: skipped.
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = find_in("fake-server", None, None, "X", Some(dir.path().into()), "install it").unwrap_err();
        assert!(matches!(err, Error::BinaryNotFound { .. }));
        assert!(err.to_string().contains("set X to its path or put it on PATH; install it"), "{err}");
    }
}
