//! Bearer-token authentication: `Authorization` header → [`Principal`].

use finmesh_core::{Error, ErrorKind, Result};

use crate::Principal;

/// Verifies bearer tokens. Cheap to clone; shared by every request.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    /// `--insecure-no-auth`: every request is an admin.
    Disabled,
}

impl Authenticator {
    /// No authentication: every request acts as an admin principal named
    /// `anonymous`. Only for `--insecure-no-auth` and tests that are not
    /// about auth.
    pub fn disabled() -> Self {
        Self { mode: Mode::Disabled }
    }

    /// Whether authentication is off.
    pub fn is_disabled(&self) -> bool {
        matches!(self.mode, Mode::Disabled)
    }

    /// Authenticate a request from its `Authorization` header value, if any.
    /// Errors are [`ErrorKind::Unauthorized`].
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal> {
        match self.mode {
            Mode::Disabled => {
                let _ = authorization;
                Ok(Principal::admin("anonymous"))
            }
        }
    }
}

#[allow(dead_code)]
fn unauthorized(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthorized, message)
}
