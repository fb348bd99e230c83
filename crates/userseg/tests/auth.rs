//! API keys with roles, end to end in process (standalone mode through the wiring library): every registered route of both protocols
//! against a key of every role, no key and an unknown key (401 / 403 naming the role / let
//! through), the named policy of the routes, open probes, and the failure counter.

mod support;

use userseg_testkit::keys::{keys_toml, sha256_hex, Key};

use serde_json::Value;
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::prost::Message;
use userseg_api::auth::{
    grpc_access, http_access, registered_http_routes, token_sha256_hex, Access,
};
use userseg_api::{ApiState, Authenticator, KeySet, Role};
use userseg_testkit::metrics::value;

const KEYS: [(&str, &str); 5] = [
    ("ingest", "token-of-the-ingest-key"),
    ("read", "token-of-the-read-key"),
    ("members", "token-of-the-members-key"),
    ("admin", "token-of-the-admin-key"),
    ("ingest+read", "token-of-the-ingest-read-key"),
];

fn keys_file() -> String {
    let roles: Vec<Vec<&str>> = KEYS
        .iter()
        .map(|(name, _)| name.split('+').collect())
        .collect();
    let keys: Vec<Key<'_>> = KEYS
        .iter()
        .zip(&roles)
        .map(|((name, token), roles)| Key { name, roles, token })
        .collect();
    // The tests' keys files hash tokens as the server does.
    assert_eq!(sha256_hex(KEYS[0].1), token_sha256_hex(KEYS[0].1));
    keys_toml(&keys)
}

fn authenticator() -> Authenticator {
    let keys = KeySet::parse(std::path::Path::new("keys.toml"), &keys_file()).unwrap();
    Authenticator::with_keys(keys)
}

/// Standalone mode guarded by the API keys of KEYS.
async fn start_with_keys() -> support::Server {
    support::start_with(&[], |config, _| config.service.auth = Some(authenticator())).await
}

/// Who calls: no header, an unknown token, or one of KEYS.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Nobody,
    Stranger,
    Key(&'static str, &'static str),
}

fn callers() -> Vec<Caller> {
    let mut v = vec![Caller::Nobody, Caller::Stranger];
    v.extend(KEYS.iter().map(|(n, t)| Caller::Key(n, t)));
    v
}

impl Caller {
    fn token(self) -> Option<&'static str> {
        match self {
            Caller::Nobody => None,
            Caller::Stranger => Some("a-token-nobody-issued"),
            Caller::Key(_, t) => Some(t),
        }
    }

    /// What the caller should get for a route needing `role`: None = let through.
    fn expected(self, role: Role) -> Option<&'static str> {
        match self {
            Caller::Nobody | Caller::Stranger => Some("unauthenticated"),
            Caller::Key(name, _) => {
                let has = name.split('+').any(|r| r == "admin" || r == role.as_str());
                if has {
                    None
                } else {
                    Some("permission_denied")
                }
            }
        }
    }
}

/// A concrete path for a route pattern.
fn concrete(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// A body that passes validation for the routes that take one.
fn body_for(path: &str) -> Option<Value> {
    match path {
        "/v1/pairs" => Some(serde_json::json!({"pairs": [{"user_id": "u", "segment": "s"}]})),
        "/v1/users/delete" => Some(serde_json::json!({"user_ids": ["u"]})),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_route_and_every_caller() {
    let metrics = support::metrics();
    let server = start_with_keys().await;
    let routes = registered_http_routes(&userseg_api::router(ApiState::new(None, None)));
    assert!(routes.len() >= 6, "{routes:?}");
    let http = reqwest::Client::new();
    let mut checked = 0;
    for (method, pattern) in &routes {
        let method: reqwest::Method = method.parse().unwrap();
        let access = http_access(&method, pattern)
            .unwrap_or_else(|| panic!("{method} {pattern} has no role in auth::HTTP_ACCESS"));
        let path = concrete(pattern);
        for caller in callers() {
            let mut req = http.request(method.clone(), format!("{}{path}", server.http()));
            if let Some(b) = body_for(&path) {
                req = req.json(&b);
            }
            if let Some(t) = caller.token() {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            // Only refusals are read: a granted stream (member export, change feed) may not end.
            let body: Value = if status == 401 || status == 403 {
                r.json().await.unwrap_or(Value::Null)
            } else {
                Value::Null
            };
            let expected = match access {
                Access::Open => None,
                Access::Needs(role) => caller.expected(role),
            };
            let what = format!("{method} {path} as {caller:?}: {status} {body}");
            match expected {
                Some("unauthenticated") => {
                    assert_eq!(status, 401, "{what}");
                    assert_eq!(body["error"]["code"], "unauthenticated", "{what}");
                }
                Some(_) => {
                    let Access::Needs(role) = access else {
                        unreachable!()
                    };
                    assert_eq!(status, 403, "{what}");
                    assert_eq!(body["error"]["code"], "permission_denied", "{what}");
                    let msg = body["error"]["message"].as_str().unwrap_or_default();
                    assert!(msg.contains(&format!("the {role} role")), "{what}");
                }
                None => {
                    assert!(status != 401 && status != 403, "{what}");
                    // The routes on main answer 200 to a valid request.
                    if matches!(
                        path.as_str(),
                        "/v1/pairs" | "/v1/segments" | "/v1/segments/x" | "/healthz" | "/readyz"
                    ) {
                        assert_eq!(status, 200, "{what}");
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 6 * callers().len());
    // Failures are counted by reason; tokens never show.
    let text = metrics.render();
    for reason in ["missing", "unknown", "forbidden"] {
        let n = value(&text, "userseg_auth_failures_total", &[("reason", reason)]);
        assert!(n >= 1.0, "no {reason} failure counted in\n{text}");
    }
    for (_, token) in KEYS {
        assert!(!text.contains(token));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_authorization_is_unauthenticated() {
    let server = start_with_keys().await;
    let r = reqwest::Client::new()
        .get(format!("{}/v1/segments", server.http()))
        .header("authorization", format!("Basic {}", KEYS[1].1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Bearer"));
}

/// The methods of `userseg.v1.Segments` in the descriptor the server registers:
/// (path, client streaming, server streaming).
fn segments_methods() -> Vec<(String, bool, bool)> {
    let set = prost_types::FileDescriptorSet::decode(userseg_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            for m in &service.method {
                out.push((
                    format!("/{full}/{}", m.name()),
                    m.client_streaming(),
                    m.server_streaming(),
                ));
            }
        }
    }
    out
}

/// Calls a gRPC method with an empty message, whatever its types; returns the status code.
async fn call_empty(
    channel: tonic::transport::Channel,
    path: &str,
    client_streaming: bool,
    server_streaming: bool,
    token: Option<&str>,
) -> (tonic::Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::try_from(path).unwrap();
    let auth = |md: &mut tonic::metadata::MetadataMap| {
        if let Some(t) = token {
            md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
    };
    let result: Result<(), tonic::Status> = match (client_streaming, server_streaming) {
        (false, false) => {
            let mut req = tonic::Request::new(());
            auth(req.metadata_mut());
            grpc.unary(req, path, codec).await.map(|_| ())
        }
        (true, false) => {
            let mut req = tonic::Request::new(futures::stream::iter(vec![()]));
            auth(req.metadata_mut());
            grpc.client_streaming(req, path, codec).await.map(|_| ())
        }
        (false, true) => {
            let mut req = tonic::Request::new(());
            auth(req.metadata_mut());
            match grpc.server_streaming(req, path, codec).await {
                Ok(r) => {
                    let mut s = r.into_inner();
                    s.message().await.map(|_| ())
                }
                Err(e) => Err(e),
            }
        }
        (true, true) => {
            let mut req = tonic::Request::new(futures::stream::iter(vec![()]));
            auth(req.metadata_mut());
            match grpc.streaming(req, path, codec).await {
                Ok(r) => {
                    let mut s = r.into_inner();
                    s.message().await.map(|_| ())
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => (tonic::Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_and_every_caller() {
    let server = start_with_keys().await;
    let channel = tonic::transport::Endpoint::from_shared(server.http())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let methods = segments_methods();
    assert!(methods.len() >= 4, "{methods:?}");
    for (path, cs, ss) in &methods {
        let access =
            grpc_access(path).unwrap_or_else(|| panic!("{path} has no role in auth::GRPC_ACCESS"));
        let Access::Needs(role) = access else {
            panic!("{path} is open; the Segments service serves data")
        };
        for caller in callers() {
            let (code, msg) = call_empty(channel.clone(), path, *cs, *ss, caller.token()).await;
            let what = format!("{path} as {caller:?}: {code:?} {msg}");
            match caller.expected(role) {
                Some("unauthenticated") => assert_eq!(code, tonic::Code::Unauthenticated, "{what}"),
                Some(_) => {
                    assert_eq!(code, tonic::Code::PermissionDenied, "{what}");
                    assert!(msg.contains(&format!("the {role} role")), "{what}");
                }
                None => assert!(
                    !matches!(
                        code,
                        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                    ),
                    "{what}"
                ),
            }
        }
    }
    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}

#[test]
fn the_policy_of_the_named_routes() {
    use Access::{Needs, Open};
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    let delete = reqwest::Method::DELETE;
    let cases = [
        (&post, "/v1/pairs", Needs(Role::Ingest)),
        (&get, "/v1/segments", Needs(Role::Read)),
        (&get, "/v1/segments/{segment}", Needs(Role::Read)),
        (&get, "/v1/count", Needs(Role::Read)),
        (&get, "/v1/overlap", Needs(Role::Read)),
        (&get, "/v1/segments/{segment}/history", Needs(Role::Read)),
        (&get, "/v1/users/{user_id}/segments", Needs(Role::Members)),
        (&get, "/v1/segments/{segment}/members", Needs(Role::Members)),
        (&get, "/v1/changes", Needs(Role::Members)),
        (&delete, "/v1/users/{user_id}", Needs(Role::Admin)),
        (&post, "/v1/users/delete", Needs(Role::Admin)),
        (&get, "/healthz", Open),
        (&get, "/readyz", Open),
        (&get, "/metrics", Open),
    ];
    for (m, p, a) in cases {
        assert_eq!(http_access(m, p), Some(a), "{m} {p}");
    }
    assert_eq!(http_access(&post, "/v1/segments"), None);
    for (p, a) in [
        ("/userseg.v1.Segments/Push", Needs(Role::Ingest)),
        ("/userseg.v1.Segments/PushStream", Needs(Role::Ingest)),
        ("/userseg.v1.Segments/Estimate", Needs(Role::Read)),
        ("/userseg.v1.Segments/ListEstimates", Needs(Role::Read)),
        ("/userseg.v1.Segments/Count", Needs(Role::Read)),
        ("/userseg.v1.Segments/Overlap", Needs(Role::Read)),
        ("/userseg.v1.Segments/History", Needs(Role::Read)),
        ("/userseg.v1.Segments/GetUserSegments", Needs(Role::Members)),
        ("/userseg.v1.Segments/ExportMembers", Needs(Role::Members)),
        ("/userseg.v1.Segments/DeleteUsers", Needs(Role::Admin)),
        ("/grpc.health.v1.Health/Check", Open),
    ] {
        assert_eq!(grpc_access(p), Some(a), "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_missing_from_the_table_needs_admin_and_a_404_needs_nothing() {
    let server = start_with_keys().await;
    let http = reqwest::Client::new();
    // PUT on a registered path is not in the table: only admin gets past auth (then 405).
    let r = http
        .put(format!("{}/v1/segments", server.http()))
        .bearer_auth(KEYS[1].1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .put(format!("{}/v1/segments", server.http()))
        .bearer_auth(KEYS[3].1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = http
        .get(format!("{}/no/such/route", server.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
