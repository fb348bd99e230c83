//! The role each API operation needs, in one table for HTTP and one for gRPC, so that the
//! authorization layer enforces them from one place.

/// What a caller is allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Counts, estimates, overlap, history.
    Read,
    /// Pushing pairs.
    Ingest,
    /// Reads that name users: a user's segments, member export.
    Members,
    /// Deleting users.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Ingest => "ingest",
            Role::Members => "members",
            Role::Admin => "admin",
        }
    }
}

/// Every `/v1` HTTP route (method, path as routed) and the role it needs.
pub const HTTP_ROUTES: &[(&str, &str, Role)] = &[
    ("POST", "/v1/pairs", Role::Ingest),
    ("GET", "/v1/segments", Role::Read),
    ("GET", "/v1/segments/{segment}", Role::Read),
    ("GET", "/v1/segments/{segment}/members", Role::Members),
    ("GET", "/v1/segments/{segment}/history", Role::Read),
    ("GET", "/v1/count", Role::Read),
    ("GET", "/v1/overlap", Role::Read),
    ("GET", "/v1/users/{user_id}/segments", Role::Members),
    ("DELETE", "/v1/users/{user_id}", Role::Admin),
    ("POST", "/v1/users/delete", Role::Admin),
];

/// Every `userseg.v1.Segments` RPC (its gRPC path) and the role it needs.
pub const GRPC_METHODS: &[(&str, Role)] = &[
    ("/userseg.v1.Segments/Push", Role::Ingest),
    ("/userseg.v1.Segments/PushStream", Role::Ingest),
    ("/userseg.v1.Segments/Estimate", Role::Read),
    ("/userseg.v1.Segments/ListEstimates", Role::Read),
    ("/userseg.v1.Segments/GetUserSegments", Role::Members),
    ("/userseg.v1.Segments/DeleteUsers", Role::Admin),
    ("/userseg.v1.Segments/Count", Role::Read),
    ("/userseg.v1.Segments/Overlap", Role::Read),
    ("/userseg.v1.Segments/ExportMembers", Role::Members),
    ("/userseg.v1.Segments/History", Role::Read),
];

/// The role an HTTP route needs, by method and routed path (`axum::extract::MatchedPath`).
pub fn http_role(method: &str, routed_path: &str) -> Option<Role> {
    HTTP_ROUTES
        .iter()
        .find(|(m, p, _)| *m == method && *p == routed_path)
        .map(|(_, _, r)| *r)
}

/// The role a gRPC method needs, by its path.
pub fn grpc_role(path: &str) -> Option<Role> {
    GRPC_METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, r)| *r)
}
