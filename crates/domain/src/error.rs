/// The one small set of error kinds every layer speaks. The delivery layer maps each kind to an
/// HTTP status and a gRPC code in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or holds an invalid pair (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidArgument,
    /// The request is larger than the configured limits (HTTP 413, gRPC INVALID_ARGUMENT).
    PayloadTooLarge,
    /// Missing or wrong credentials (HTTP 401, gRPC UNAUTHENTICATED).
    Unauthenticated,
    /// Known credentials without the role the operation needs (HTTP 403, gRPC PERMISSION_DENIED).
    PermissionDenied,
    /// No such route or resource (HTTP 404, gRPC NOT_FOUND).
    NotFound,
    /// The resource existed but is no longer kept, e.g. a change-feed cursor older than the
    /// retention (HTTP 410, gRPC OUT_OF_RANGE).
    Gone,
    /// The request is understood but this server cannot serve it: an unsupported media type or
    /// an operation this mode does not offer (HTTP 415 / 501, gRPC UNIMPLEMENTED).
    Unsupported,
    /// The service is saturated; the client should retry later (HTTP 503, gRPC RESOURCE_EXHAUSTED).
    Overloaded,
    /// A dependency (broker, database) cannot be reached (HTTP 503, gRPC UNAVAILABLE).
    Unavailable,
    /// A bug or an unexpected failure (HTTP 500, gRPC INTERNAL).
    Internal,
}

impl ErrorKind {
    /// The stable snake_case name used in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Gone => "gone",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
