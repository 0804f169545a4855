//! finmesh-auth: who is calling, and what may they do.
//!
//! The gateway asks two questions of this crate and nothing else:
//!
//! 1. [`Authenticator::authenticate`]: turn the `Authorization` header of a
//!    request into a [`Principal`] (or an `Unauthorized` error);
//! 2. [`Principal::allows`]: may this principal perform this [`Access`]?
//!    (`false` becomes a `Forbidden` answer).
//!
//! Scopes are strings carried in the token, one capability each:
//!
//! | scope | grants |
//! |---|---|
//! | `admin` | everything |
//! | `kv:read:<bucket>` | get, history, keys, watch |
//! | `kv:write:<bucket>` | put, create, update, delete, purge |
//! | `kv:admin:<bucket>` | create, update, delete the bucket |
//! | `stream:publish:<stream>[:<subject pattern>]` | publish |
//! | `stream:subscribe:<stream>[:<subject pattern>]` | read, SSE, WebSocket |
//! | `stream:consume:<stream>` | fetch and ack on durable consumers |
//! | `stream:admin:<stream>` | create, update, delete the stream and its consumers |
//!
//! `<bucket>` and `<stream>` may be `*` for every name. A scope with a
//! subject pattern grants only subjects (or filters) that pattern covers.
//!
//! Invariant: authentication never panics on hostile input; every failure is
//! an [`ErrorKind::Unauthorized`](finmesh_core::ErrorKind::Unauthorized) error
//! whose message says why without echoing the token.

mod access;
mod authenticator;

pub use access::{Access, Principal};
pub use authenticator::Authenticator;
