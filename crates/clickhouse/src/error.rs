//! What can go wrong talking to ClickHouse, and which failures are worth retrying.

use userseg_usecase::PortError;

/// Exception codes with which ClickHouse refuses the *data* of a request: the same rows fail
/// again however often they are retried, so a write failing with one of them is
/// [`PortError::Permanent`] (and eventually dead-lettered).
///
/// Every other failure is [`PortError::Transient`]: the server is down, slow or overloaded
/// (`TOO_MANY_PARTS` 252, `TOO_MANY_SIMULTANEOUS_QUERIES` 202, `MEMORY_LIMIT_EXCEEDED` 241,
/// `TIMEOUT_EXCEEDED` 159, network and ZooKeeper errors, read-only replicas), or it is
/// misconfigured (unknown table or database because `userseg migrate` was not run, wrong
/// credentials, a read-only user). The latter are not the data's fault, and an operator can fix
/// them without losing a single pair, so they stall the pipeline instead of dead-lettering it.
pub const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
];

/// Codes that mean the schema or the credentials are wrong: still transient (see
/// [`DATA_ERROR_CODES`]), but logged as errors with a hint, because no amount of waiting fixes
/// them without an operator.
pub const CONFIG_ERROR_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    47,  // UNKNOWN_IDENTIFIER
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    81,  // UNKNOWN_DATABASE
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No HTTP response: connection refused or reset, DNS failure, timeout.
    #[error("clickhouse at {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    /// ClickHouse answered with an error status.
    #[error("clickhouse answered http {status}{}: {message}", code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Server {
        status: u16,
        code: Option<u32>,
        message: String,
    },
    /// ClickHouse answered 200 with a body this crate cannot read.
    #[error("unexpected response from clickhouse: {0}")]
    Decode(String),
    /// A pair that can never be stored (its ts is outside ClickHouse's DateTime range).
    #[error("pair cannot be stored: {0}")]
    Unstorable(String),
    /// A request this store refuses for good (e.g. more segments than a query supports).
    #[error("unsupported request: {0}")]
    Unsupported(String),
    /// Waiting for a mutation (a user deletion) to be applied took too long.
    #[error("{0}")]
    MutationTimeout(String),
    /// The database's migration history contradicts this binary's migrations.
    #[error("migration: {0}")]
    Migration(String),
}

impl ClickHouseError {
    /// Would retrying the same request later plausibly succeed?
    pub fn is_transient(&self) -> bool {
        match self {
            ClickHouseError::Unreachable { .. }
            | ClickHouseError::Decode(_)
            | ClickHouseError::MutationTimeout(_) => true,
            ClickHouseError::Server { code, .. } => {
                !code.is_some_and(|c| DATA_ERROR_CODES.contains(&c))
            }
            ClickHouseError::Unstorable(_)
            | ClickHouseError::Unsupported(_)
            | ClickHouseError::Config(_)
            | ClickHouseError::Migration(_) => false,
        }
    }

    /// Is this a wrong schema or wrong credentials, i.e. something an operator must fix?
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            ClickHouseError::Server { code, .. } => {
                code.is_some_and(|c| CONFIG_ERROR_CODES.contains(&c))
            }
            ClickHouseError::Config(_) | ClickHouseError::Migration(_) => true,
            _ => false,
        }
    }

    /// The ClickHouse exception code, when the server sent one.
    pub fn code(&self) -> Option<u32> {
        match self {
            ClickHouseError::Server { code, .. } => *code,
            _ => None,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "permanent"
        }
    }
}

impl From<ClickHouseError> for PortError {
    fn from(e: ClickHouseError) -> Self {
        let mut text = e.to_string();
        if e.is_misconfiguration() {
            text.push_str(
                " (check CLICKHOUSE_* settings and run `userseg migrate` against this database)",
            );
        }
        if e.is_transient() {
            PortError::Transient(text)
        } else {
            PortError::Permanent(text)
        }
    }
}

/// Reads the exception code from ClickHouse's error body: `Code: 60, e.displayText() = ...`
/// (18.x) or `Code: 60. DB::Exception: ...` (current versions).
pub(crate) fn parse_exception_code(body: &str) -> Option<u32> {
    let rest = body.trim_start().strip_prefix("Code: ")?;
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: Option<u32>) -> ClickHouseError {
        ClickHouseError::Server {
            status: 500,
            code,
            message: "x".into(),
        }
    }

    #[test]
    fn parses_both_exception_formats() {
        assert_eq!(
            parse_exception_code("Code: 27, e.displayText() = DB::Exception: Cannot parse input"),
            Some(27)
        );
        assert_eq!(
            parse_exception_code(
                "Code: 60. DB::Exception: Table x.y does not exist. (UNKNOWN_TABLE)"
            ),
            Some(60)
        );
        assert_eq!(parse_exception_code("Bad Gateway"), None);
        assert_eq!(parse_exception_code("Code: x"), None);
    }

    #[test]
    fn classification() {
        assert!(matches!(
            PortError::from(server(Some(27))),
            PortError::Permanent(_)
        ));
        assert!(matches!(
            PortError::from(server(Some(252))),
            PortError::Transient(_)
        ));
        assert!(matches!(
            PortError::from(server(Some(202))),
            PortError::Transient(_)
        ));
        assert!(matches!(
            PortError::from(server(None)),
            PortError::Transient(_)
        ));
        let missing = PortError::from(server(Some(60)));
        match missing {
            PortError::Transient(text) => assert!(text.contains("userseg migrate"), "{text}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            PortError::from(ClickHouseError::Unreachable {
                addr: "a".into(),
                detail: "refused".into()
            }),
            PortError::Transient(_)
        ));
        assert!(matches!(
            PortError::from(ClickHouseError::Unstorable("ts".into())),
            PortError::Permanent(_)
        ));
    }
}
