//! One error type for both protocols: the error kind decides the HTTP status and the gRPC code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use userseg_domain::ErrorKind;
use userseg_usecase::{EstimationError, IngestError};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// Index of the offending pair in the request.
    pub index: Option<usize>,
    /// Line of the offending NDJSON line (1-based).
    pub line: Option<usize>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            index: None,
            line: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// A role asked for something it does not serve (a USS for estimates, an ES for ingest):
    /// over HTTP the route is not found on this process.
    pub(crate) fn not_served(what: &str) -> Self {
        Self::new(
            ErrorKind::NotFound,
            format!("this process does not serve {what}"),
        )
    }

    pub(crate) fn with_index(mut self, index: Option<usize>) -> Self {
        self.index = index;
        self
    }

    pub(crate) fn http_status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Gone => StatusCode::GONE,
            ErrorKind::Unsupported => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::Overloaded | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn grpc_code(&self) -> tonic::Code {
        match self.kind {
            ErrorKind::InvalidArgument | ErrorKind::PayloadTooLarge => tonic::Code::InvalidArgument,
            ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::Gone => tonic::Code::OutOfRange,
            ErrorKind::Unsupported => tonic::Code::Unimplemented,
            ErrorKind::Overloaded => tonic::Code::ResourceExhausted,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({
            "code": self.kind.as_str(),
            "message": self.message,
        });
        if let Some(i) = self.index {
            error["index"] = i.into();
        }
        if let Some(l) = self.line {
            error["line"] = l.into();
        }
        serde_json::json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.http_status(), axum::Json(self.body())).into_response();
        resp.extensions_mut()
            .insert(crate::observe::ErrorCode(self.kind.as_str()));
        if matches!(self.kind, ErrorKind::Overloaded | ErrorKind::Unavailable) {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.grpc_code(), e.message)
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        ApiError::new(e.kind(), e.to_string()).with_index(e.index())
    }
}

impl From<EstimationError> for ApiError {
    fn from(e: EstimationError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_both_protocols() {
        let cases = [
            (
                ErrorKind::InvalidArgument,
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                ErrorKind::PayloadTooLarge,
                413,
                tonic::Code::InvalidArgument,
            ),
            (
                ErrorKind::Unauthenticated,
                401,
                tonic::Code::Unauthenticated,
            ),
            (
                ErrorKind::PermissionDenied,
                403,
                tonic::Code::PermissionDenied,
            ),
            (ErrorKind::NotFound, 404, tonic::Code::NotFound),
            (ErrorKind::Gone, 410, tonic::Code::OutOfRange),
            (ErrorKind::Unsupported, 415, tonic::Code::Unimplemented),
            (ErrorKind::Overloaded, 503, tonic::Code::ResourceExhausted),
            (ErrorKind::Unavailable, 503, tonic::Code::Unavailable),
            (ErrorKind::Internal, 500, tonic::Code::Internal),
        ];
        for (kind, status, code) in cases {
            let e = ApiError::new(kind, "x");
            assert_eq!(e.http_status().as_u16(), status, "{kind}");
            assert_eq!(e.grpc_code(), code, "{kind}");
            assert_eq!(e.body()["error"]["code"], kind.as_str());
        }
    }
}
