//! API keys with roles: who may call which route.
//!
//! A key is a bearer token the server knows only by its SHA-256 digest, with a set of
//! [`Role`]s. Every route of both protocols needs one role, or is open, as written in one
//! table per protocol ([`HTTP_ACCESS`], [`GRPC_ACCESS`]); a route missing from its table needs
//! `admin` (fail closed), and a test fails for every registered route the tables do not name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use userseg_domain::ErrorKind;

use crate::{ApiError, ApiState};

/// What a key may do. `admin` implies every other role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Push pairs: gRPC `Push`, `PushStream`, `POST /v1/pairs`.
    Ingest,
    /// Counts: estimates, count, overlap, history.
    Read,
    /// Personal data: a user's segments, a segment's members, the change feed.
    Members,
    /// Deleting users, and everything else.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Ingest, Role::Read, Role::Members, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Read => "read",
            Role::Members => "members",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn bit(self) -> u8 {
        match self {
            Role::Ingest => 1,
            Role::Read => 2,
            Role::Members => 4,
            Role::Admin => 8,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of roles.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn of(roles: &[Role]) -> Roles {
        Roles(roles.iter().fold(0, |acc, r| acc | r.bit()))
    }

    /// Whether a key with these roles may do what `role` guards (admin may do everything).
    pub fn allows(self, role: Role) -> bool {
        self.0 & (role.bit() | Role::Admin.bit()) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.0 & r.bit() != 0)
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No key needed (probes, metrics, the console's static page).
    Open,
    /// A key with this role (or admin).
    Needs(Role),
}

use Access::{Needs, Open};

/// Every HTTP route: method, path pattern (parameters written `{}`, a catch-all `{*}`), access.
/// `HEAD` is looked up as `GET`.
pub const HTTP_ACCESS: &[(&str, &str, Access)] = &[
    ("POST", "/v1/pairs", Needs(Role::Ingest)),
    ("GET", "/v1/segments", Needs(Role::Read)),
    ("GET", "/v1/segments/{}", Needs(Role::Read)),
    ("GET", "/v1/count", Needs(Role::Read)),
    ("GET", "/v1/overlap", Needs(Role::Read)),
    ("GET", "/v1/segments/{}/history", Needs(Role::Read)),
    ("GET", "/v1/users/{}/segments", Needs(Role::Members)),
    ("GET", "/v1/segments/{}/members", Needs(Role::Members)),
    ("GET", "/v1/changes", Needs(Role::Members)),
    // Between the ES of a sharded index (the answers may hold user ids).
    ("POST", "/internal/v1/shards", Needs(Role::Members)),
    ("POST", "/internal/v1/shards/members", Needs(Role::Members)),
    ("DELETE", "/v1/users/{}", Needs(Role::Admin)),
    ("POST", "/v1/users/delete", Needs(Role::Admin)),
    ("GET", "/healthz", Open),
    ("GET", "/readyz", Open),
    ("GET", "/metrics", Open),
    ("GET", "/openapi.json", Open),
    ("GET", "/ui", Open),
    ("GET", "/ui/", Open),
    ("GET", "/ui/{*}", Open),
];

/// Every gRPC method (`package.Service/Method`, or `package.Service/*` for all of a service's
/// methods) and its access.
pub const GRPC_ACCESS: &[(&str, Access)] = &[
    ("userseg.v1.Segments/Push", Needs(Role::Ingest)),
    ("userseg.v1.Segments/PushStream", Needs(Role::Ingest)),
    ("userseg.v1.Segments/Estimate", Needs(Role::Read)),
    ("userseg.v1.Segments/ListEstimates", Needs(Role::Read)),
    ("userseg.v1.Segments/Count", Needs(Role::Read)),
    ("userseg.v1.Segments/Overlap", Needs(Role::Read)),
    ("userseg.v1.Segments/History", Needs(Role::Read)),
    ("userseg.v1.Segments/GetUserSegments", Needs(Role::Members)),
    ("userseg.v1.Segments/ExportMembers", Needs(Role::Members)),
    ("userseg.v1.Segments/DeleteUsers", Needs(Role::Admin)),
    ("grpc.health.v1.Health/*", Open),
    ("grpc.reflection.v1.ServerReflection/*", Open),
    ("grpc.reflection.v1alpha.ServerReflection/*", Open),
];

/// A path pattern as registered with axum (`/v1/users/{user_id}`) in the tables' spelling
/// (`/v1/users/{}`).
pub fn normalize_pattern(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|seg| {
            if seg.starts_with("{*") && seg.ends_with('}') {
                "{*}"
            } else if seg.starts_with('{') && seg.ends_with('}') && !seg.starts_with("{{") {
                "{}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The access an HTTP route needs, `None` when the table does not name it.
pub fn http_access(method: &Method, pattern: &str) -> Option<Access> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let pattern = normalize_pattern(pattern);
    HTTP_ACCESS
        .iter()
        .find(|(m, p, _)| *m == method && *p == pattern)
        .map(|(_, _, a)| *a)
}

/// The access a gRPC method needs (`path` as in the request, `/package.Service/Method`),
/// `None` when the table does not name it.
pub fn grpc_access(path: &str) -> Option<Access> {
    let method = path.strip_prefix('/').unwrap_or(path);
    let service = method.split_once('/').map(|(s, _)| s);
    GRPC_ACCESS
        .iter()
        .find(|(m, _)| *m == method || (m.strip_suffix("/*").is_some_and(|s| Some(s) == service)))
        .map(|(_, a)| *a)
}

/// One key of the keys file.
#[derive(Clone)]
struct Key {
    name: String,
    digest: [u8; 32],
    roles: Roles,
}

/// The keys a server accepts, by digest.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.keys.iter().map(|k| (&k.name, k.roles)))
            .finish()
    }
}

/// A keys file that cannot be used; the message names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("API_KEYS_FILE: cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API_KEYS_FILE: {}: line {line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("API_KEYS_FILE: {} holds no [[key]]; add one (see `userseg keys new`)", path.display())]
    Empty { path: PathBuf },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    key: Vec<toml::Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: toml::Spanned<String>,
    sha256: toml::Spanned<String>,
    roles: toml::Spanned<Vec<toml::Spanned<String>>>,
}

/// Line (1-based) of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn parse_hex_digest(s: &str) -> Option<[u8; 32]> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The SHA-256 of a token, as the keys file writes it (lowercase hex).
pub fn token_sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a key name: what the logs and metrics show of a caller.
pub fn validate_key_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("name must be 1 to 128 bytes".into());
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("name contains the control character {c:?}"));
    }
    Ok(())
}

impl KeySet {
    /// One admin key (what `API_TOKEN` means).
    pub(crate) fn admin_token(name: &str, token: &str) -> KeySet {
        KeySet {
            keys: vec![Key {
                name: name.to_owned(),
                digest: Sha256::digest(token.as_bytes()).into(),
                roles: Roles::of(&[Role::Admin]),
            }],
        }
    }

    /// Parses a keys file's text; errors name `path` and the line.
    pub fn parse(path: &Path, text: &str) -> Result<KeySet, KeyFileError> {
        let invalid = |offset: usize, message: String| KeyFileError::Invalid {
            path: path.to_owned(),
            line: line_of(text, offset),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            invalid(offset, e.message().trim().to_string())
        })?;
        if raw.key.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_owned(),
            });
        }
        let mut keys: Vec<Key> = Vec::with_capacity(raw.key.len());
        for entry in raw.key {
            let k = entry.into_inner();
            validate_key_name(k.name.get_ref())
                .map_err(|m| invalid(k.name.span().start, format!("key {m}")))?;
            let name = k.name.get_ref().clone();
            if keys.iter().any(|other| other.name == name) {
                return Err(invalid(
                    k.name.span().start,
                    format!("a second key named {name:?}; names must be unique"),
                ));
            }
            let digest = parse_hex_digest(k.sha256.get_ref().trim()).ok_or_else(|| {
                invalid(
                    k.sha256.span().start,
                    format!(
                        "key {name:?}: sha256 must be 64 hex digits (the SHA-256 of the token, \
                         e.g. from `printf %s TOKEN | sha256sum`), not the token itself"
                    ),
                )
            })?;
            if let Some(other) = keys.iter().find(|o| o.digest == digest) {
                return Err(invalid(
                    k.sha256.span().start,
                    format!(
                        "key {name:?} has the same sha256 as key {:?}; each token must be distinct",
                        other.name
                    ),
                ));
            }
            if k.roles.get_ref().is_empty() {
                return Err(invalid(
                    k.roles.span().start,
                    format!("key {name:?}: roles is empty; give at least one of ingest, read, members, admin"),
                ));
            }
            let mut roles = Vec::new();
            for r in k.roles.get_ref() {
                let role = Role::parse(r.get_ref()).ok_or_else(|| {
                    invalid(
                        r.span().start,
                        format!(
                            "key {name:?}: unknown role {:?}; roles are ingest, read, members, admin",
                            r.get_ref()
                        ),
                    )
                })?;
                roles.push(role);
            }
            keys.push(Key {
                name,
                digest,
                roles: Roles::of(&roles),
            });
        }
        Ok(KeySet { keys })
    }

    /// Reads and parses a keys file.
    pub fn load(path: &Path) -> Result<KeySet, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        KeySet::parse(path, &text)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key of `token`: its name and roles. Takes the same time whichever key matches, and
    /// whether one does: every digest is compared in constant time.
    fn find(&self, token: &[u8]) -> Option<(&str, Roles)> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        let mut roles = 0u8;
        for (i, k) in self.keys.iter().enumerate() {
            let eq = digest.ct_eq(&k.digest);
            index.conditional_assign(&(i as u32), eq);
            roles.conditional_assign(&k.roles.0, eq);
            found |= eq;
        }
        if bool::from(found) {
            Some((self.keys[index as usize].name.as_str(), Roles(roles)))
        } else {
            None
        }
    }

    fn merged(mut self, other: KeySet) -> KeySet {
        self.keys.extend(other.keys);
        self
    }
}

/// Why a request was refused (the `reason` label of `userseg_auth_failures_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A token no key has.
    Unknown,
    /// A known key without the role the route needs.
    Forbidden,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::Missing,
        Failure::Malformed,
        Failure::Unknown,
        Failure::Forbidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Unknown => "unknown",
            Failure::Forbidden => "forbidden",
        }
    }
}

/// The keys a server accepts, reloadable while it serves: `API_TOKEN` (one admin key) plus
/// the keys of `API_KEYS_FILE`.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<RwLock<Arc<KeySet>>>,
    token_key: Option<KeySet>,
    file: Option<PathBuf>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("file", &self.file)
            .field("keys", &self.current())
            .finish()
    }
}

impl Authenticator {
    /// Keys from `API_TOKEN` and `API_KEYS_FILE`; `None` when neither is set (the API is open).
    pub fn new(
        api_token: Option<&str>,
        keys_file: Option<&Path>,
    ) -> Result<Option<Authenticator>, KeyFileError> {
        if api_token.is_none() && keys_file.is_none() {
            return Ok(None);
        }
        let token_key = api_token.map(|t| KeySet::admin_token("API_TOKEN", t));
        let auth = Authenticator {
            keys: Arc::new(RwLock::new(Arc::new(KeySet::default()))),
            token_key,
            file: keys_file.map(Path::to_owned),
        };
        auth.reload()?;
        Ok(Some(auth))
    }

    /// Accepts exactly these keys (for tests and embedding).
    pub fn with_keys(keys: KeySet) -> Authenticator {
        Authenticator {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            token_key: None,
            file: None,
        }
    }

    /// The keys file, when there is one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Re-reads the keys file. On error the keys in use stay as they were. Returns how many
    /// keys are now accepted.
    pub fn reload(&self) -> Result<usize, KeyFileError> {
        let from_file = match &self.file {
            Some(path) => KeySet::load(path)?,
            None => KeySet::default(),
        };
        let keys = match &self.token_key {
            Some(t) => t.clone().merged(from_file),
            None => from_file,
        };
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks the `Authorization` header against what the route needs. Returns the key's name.
    pub fn authorize(
        &self,
        authorization: Option<&HeaderValue>,
        needs: Role,
    ) -> Result<String, (Failure, ApiError)> {
        let Some(value) = authorization else {
            return Err((
                Failure::Missing,
                ApiError::new(
                    ErrorKind::Unauthenticated,
                    format!(
                        "missing bearer token: send Authorization: Bearer <token> of a key with the {needs} role"
                    ),
                ),
            ));
        };
        let bytes = value.as_bytes();
        let token = match bytes.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest,
            _ => {
                return Err((
                    Failure::Malformed,
                    ApiError::new(
                        ErrorKind::Unauthenticated,
                        "the Authorization header must be: Bearer <token>",
                    ),
                ))
            }
        };
        let keys = self.current();
        let Some((name, roles)) = keys.find(token) else {
            return Err((
                Failure::Unknown,
                ApiError::new(ErrorKind::Unauthenticated, "unknown bearer token"),
            ));
        };
        if !roles.allows(needs) {
            return Err((
                Failure::Forbidden,
                ApiError::new(
                    ErrorKind::PermissionDenied,
                    format!("key {name:?} lacks the {needs} role this call needs"),
                ),
            ));
        }
        Ok(name.to_owned())
    }
}

/// The HTTP routes registered in `router`: (method, pattern as registered). axum has no API
/// that lists routes, so this reads them from the router's `Debug` output; the test that
/// every route has a role uses it, and fails when it finds none.
#[doc(hidden)]
pub fn registered_http_routes(router: &axum::Router) -> Vec<(String, String)> {
    let text = format!("{router:?}");
    // Only the path router, not the fallback router.
    let text = text.split(", fallback_router:").next().unwrap_or("");
    let (routes, paths) = match text.split_once("node: Node { paths: {") {
        Some(x) => x,
        None => return Vec::new(),
    };
    let mut path_of = std::collections::HashMap::new();
    for piece in paths.split("RouteId(").skip(1) {
        let Some((id, rest)) = piece.split_once("): \"") else {
            continue;
        };
        let Some(end) = rest.find('"') else { continue };
        path_of.insert(id.to_owned(), rest[..end].to_owned());
    }
    let mut out = Vec::new();
    for piece in routes.split("RouteId(").skip(1) {
        let Some((id, rest)) = piece.split_once("): ") else {
            continue;
        };
        let Some(path) = path_of.get(id) else {
            continue;
        };
        // A method router names its methods in its Allow header; a nested service answers GET.
        let methods = rest
            .split_once("allow_header: Bytes(b\"")
            .and_then(|(_, a)| a.split_once('"'))
            .map_or("GET", |(m, _)| m);
        for m in methods.split(',').filter(|m| *m != "HEAD" && !m.is_empty()) {
            out.push((m.to_owned(), path.clone()));
        }
    }
    out.sort();
    out
}

/// Registers the authentication metrics at zero.
pub(crate) fn describe_metrics() {
    for f in Failure::ALL {
        metrics::counter!("userseg_auth_failures_total", "reason" => f.as_str()).absolute(0);
    }
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The access a request needs, from the tables. A route the tables do not name needs admin;
/// a path no route matches (a 404) needs nothing.
fn access_of(req: &Request) -> (Access, String) {
    if let Some(matched) = req.extensions().get::<MatchedPath>() {
        let pattern = matched.as_str();
        let access = http_access(req.method(), pattern).unwrap_or(Needs(Role::Admin));
        return (access, format!("{} {pattern}", req.method()));
    }
    let path = req.uri().path();
    if is_grpc(req) {
        return (
            grpc_access(path).unwrap_or(Needs(Role::Admin)),
            path.to_owned(),
        );
    }
    (Open, path.to_owned())
}

/// The middleware in front of every route: checks the bearer token against the route's role.
pub(crate) async fn middleware(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(auth) = state.auth.as_ref() else {
        return next.run(req).await;
    };
    let (access, route) = access_of(&req);
    let Needs(role) = access else {
        return next.run(req).await;
    };
    match auth.authorize(req.headers().get(header::AUTHORIZATION), role) {
        Ok(_key) => next.run(req).await,
        Err((failure, error)) => {
            metrics::counter!("userseg_auth_failures_total", "reason" => failure.as_str())
                .increment(1);
            tracing::debug!(reason = failure.as_str(), %route, needs = role.as_str(), "request refused");
            if is_grpc(&req) {
                tonic::Status::from(error)
                    .into_http::<Body>()
                    .into_response()
            } else {
                error.into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret-token-of-the-reader";

    fn file(text: &str) -> Result<KeySet, KeyFileError> {
        KeySet::parse(Path::new("keys.toml"), text)
    }

    fn block(name: &str, token: &str, roles: &str) -> String {
        format!(
            "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [{roles}]\n",
            token_sha256_hex(token)
        )
    }

    #[test]
    fn admin_implies_every_role() {
        let admin = Roles::of(&[Role::Admin]);
        assert!(Role::ALL.iter().all(|r| admin.allows(*r)));
        let read = Roles::of(&[Role::Read]);
        assert!(read.allows(Role::Read));
        assert!(!read.allows(Role::Ingest));
        assert!(!read.allows(Role::Members));
        assert!(!read.allows(Role::Admin));
    }

    #[test]
    fn parses_keys_and_finds_them_by_token() {
        let text = format!(
            "# producers\n{}\n{}",
            block("reader", TOKEN, "\"read\""),
            block("ops", "another-token-entirely", "\"ingest\", \"members\"")
        );
        let keys = file(&text).unwrap();
        assert_eq!(keys.len(), 2);
        let (name, roles) = keys.find(TOKEN.as_bytes()).unwrap();
        assert_eq!(name, "reader");
        assert_eq!(roles, Roles::of(&[Role::Read]));
        let (name, roles) = keys.find(b"another-token-entirely").unwrap();
        assert_eq!(name, "ops");
        assert!(roles.allows(Role::Members) && roles.allows(Role::Ingest));
        assert!(!roles.allows(Role::Read));
        assert!(keys.find(b"not-a-key").is_none());
        assert!(keys.find(b"").is_none());
    }

    #[test]
    fn errors_name_the_line() {
        let good = block("a", "token-a-token-a", "\"read\"");
        let cases: Vec<(String, usize, &str)> = vec![
            (format!("{good}\n[[key]]\nname = \"b\"\nsha256 = \"abc\"\nroles = [\"read\"]\n"), 8, "64 hex digits"),
            (format!("{good}\n[[key]]\nname = \"b\"\nsha256 = \"{}\"\nroles = [\"read\", \"write\"]\n", token_sha256_hex("b")), 9, "unknown role \"write\""),
            (format!("{good}\n[[key]]\nname = \"a\"\nsha256 = \"{}\"\nroles = [\"read\"]\n", token_sha256_hex("b")), 7, "unique"),
            (format!("{good}{}", block("b", "token-a-token-a", "\"read\"")), 7, "same sha256"),
            (format!("{good}\n[[key]]\nname = \"b\"\nsha256 = \"{}\"\nroles = []\n", token_sha256_hex("b")), 9, "roles is empty"),
            (format!("{good}\n[[key]]\nname = \"b\"\nsha256 = \"{}\"\nrole = [\"read\"]\n", token_sha256_hex("b")), 9, "unknown field"),
            (format!("{good}\n[[key]\n"), 6, ""),
            (format!("{good}\n[[key]]\nname = \"\"\nsha256 = \"{}\"\nroles = [\"read\"]\n", token_sha256_hex("b")), 7, "key name must be 1 to 128 bytes"),
            (format!("{good}\n[[key]]\nname = \"b\"\nroles = [\"read\"]\n"), 6, "sha256"),
        ];
        for (text, line, needle) in cases {
            let err = file(&text).map(|_| ()).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, KeyFileError::Invalid { line: l, .. } if l == line),
                "expected line {line}: {msg}\n---\n{text}"
            );
            assert!(msg.starts_with("API_KEYS_FILE: keys.toml: line "), "{msg}");
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        assert!(matches!(
            file("# nothing\n"),
            Err(KeyFileError::Empty { .. })
        ));
    }

    #[test]
    fn authorize_distinguishes_missing_unknown_and_forbidden() {
        let keys = file(&block("reader", TOKEN, "\"read\"")).unwrap();
        let auth = Authenticator::with_keys(keys);
        let header = |s: &str| HeaderValue::from_str(s).unwrap();
        let fail = |h: Option<HeaderValue>, role| {
            auth.authorize(h.as_ref(), role).map(|_| ()).unwrap_err()
        };
        let (f, e) = fail(None, Role::Read);
        assert_eq!((f, e.kind), (Failure::Missing, ErrorKind::Unauthenticated));
        let (f, e) = fail(Some(header("Basic abc")), Role::Read);
        assert_eq!(
            (f, e.kind),
            (Failure::Malformed, ErrorKind::Unauthenticated)
        );
        let (f, e) = fail(Some(header("Bearer nope")), Role::Read);
        assert_eq!((f, e.kind), (Failure::Unknown, ErrorKind::Unauthenticated));
        assert!(!e.message.contains("nope"));
        let (f, e) = fail(Some(header(&format!("Bearer {TOKEN}"))), Role::Members);
        assert_eq!(
            (f, e.kind),
            (Failure::Forbidden, ErrorKind::PermissionDenied)
        );
        assert!(e.message.contains("members"), "{}", e.message);
        assert!(!e.message.contains(TOKEN));
        let name = auth
            .authorize(Some(&header(&format!("bearer {TOKEN}"))), Role::Read)
            .unwrap();
        assert_eq!(name, "reader");
    }

    #[test]
    fn patterns_normalize() {
        assert_eq!(
            normalize_pattern("/v1/users/{user_id}/segments"),
            "/v1/users/{}/segments"
        );
        assert_eq!(normalize_pattern("/ui/{*path}"), "/ui/{*}");
        assert_eq!(
            http_access(&Method::HEAD, "/v1/segments/{segment}"),
            Some(Needs(Role::Read))
        );
        assert_eq!(http_access(&Method::PUT, "/v1/segments"), None);
        assert_eq!(
            grpc_access("/userseg.v1.Segments/Push"),
            Some(Needs(Role::Ingest))
        );
        assert_eq!(grpc_access("/grpc.health.v1.Health/Watch"), Some(Open));
        assert_eq!(grpc_access("/userseg.v1.Segments/Nope"), None);
        assert_eq!(grpc_access("/other.Service/Push"), None);
    }

    #[tokio::test]
    async fn every_registered_http_route_has_a_role() {
        let router = crate::router(crate::ApiState::new(None, None));
        let routes = registered_http_routes(&router);
        assert!(
            routes.contains(&("POST".into(), "/v1/pairs".into()))
                && routes.contains(&("GET".into(), "/v1/segments/{segment}".into())),
            "could not read the routes from the router: {routes:?}"
        );
        let missing: Vec<_> = routes
            .iter()
            .filter(|(m, p)| http_access(&m.parse().unwrap(), p).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "routes without a role; add them to auth::HTTP_ACCESS: {missing:?}"
        );
    }

    #[test]
    fn every_table_entry_is_written_once() {
        for (i, (m, p, _)) in HTTP_ACCESS.iter().enumerate() {
            assert_eq!(normalize_pattern(p), *p, "{p} is not in normal form");
            assert!(
                !HTTP_ACCESS[i + 1..]
                    .iter()
                    .any(|(m2, p2, _)| m2 == m && p2 == p),
                "{m} {p} twice"
            );
        }
        for (i, (m, _)) in GRPC_ACCESS.iter().enumerate() {
            assert!(
                !GRPC_ACCESS[i + 1..].iter().any(|(m2, _)| m2 == m),
                "{m} twice"
            );
        }
    }
}
