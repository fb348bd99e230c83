//! The documented settings, the flags and what the roles read agree: README's Configuration
//! table lists exactly the environment variables of the flags of each command, every flag has
//! one, every variable named in the docs is a real one, and setting any of them changes the
//! validated configuration (so none is declared but ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};

/// The role commands the Configuration table covers (`load` has docs/LOADGEN.md).
const ROLES: &[&str] = &["standalone", "uss", "es", "migrate"];

/// Upper-case names in the docs that are not settings.
const NOT_SETTINGS: &[&str] = &[
    // gRPC status codes
    "INVALID_ARGUMENT",
    "RESOURCE_EXHAUSTED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "DEADLINE_EXCEEDED",
    "FAILED_PRECONDITION",
    "ALREADY_EXISTS",
    // ClickHouse exception names and this crate's constants
    "MEMORY_LIMIT_EXCEEDED",
    "TIMEOUT_EXCEEDED",
    "TOO_MANY_PARTS",
    "TOO_MANY_SIMULTANEOUS_QUERIES",
    "DATA_ERROR_CODES",
    "CONFIG_ERROR_CODES",
    "DEFAULT_MUTATION_TIMEOUT",
    // the protobuf enum value of approximate estimates
    "MODE_APPROX",
    // constants of the ES index (crates/usecase/src/shards.rs, crates/kafka/src/follower.rs)
    "RELEASE_AFTER_EMPTY",
    "MERGE_PAIRS",
    // read by tracing-subscriber, documented next to LOG_FORMAT
    "RUST_LOG",
    // the seed of a random test, to replay it (crates/userseg/tests/distributed_changes.rs)
    "USERSEG_TEST_SEED",
    // read by scripts/clickhouse.sh: serve https too (tests of ClickHouse over TLS)
    "CLICKHOUSE_HTTPS_CERT",
    "CLICKHOUSE_HTTPS_KEY",
    // exported by scripts/test.sh for the tests
    "USERSEG_TEST_CLICKHOUSE_URL",
    "USERSEG_TEST_KAFKA",
    // read by the soak test (crates/userseg/tests/soak.rs) and scripts/soak.sh
    "SOAK_SECS",
    "SOAK_KILL_EVERY",
    "SOAK_CAPACITY_SECS",
    "SOAK_BIN",
    // read by crates/userseg/tests/soak_distributed.rs and scripts/soak.sh
    "SOAK_RATE",
    "SOAK_MODE",
    "SOAK_USERS",
    "SOAK_LOAD_PERCENT",
    // read by scripts/bench_scale.py (make bench-scale)
    "SCALE_PAIRS",
    "SCALE_USERS",
    "SCALE_SEGMENTS",
    "SCALE_CONCURRENCY",
    "SCALE_BATCH",
    "SCALE_STREAM_BATCHES",
    "SCALE_ESTIMATES",
    "SCALE_DATA_DIR",
    "SCALE_OUT",
    "SCALE_TAG",
    "SCALE_MIN_FREE_GIB",
    // read by the fuzzing scripts (make fuzz, make chdb-check)
    "FUZZ_SECS",
    "ENHANCE_YOUR_CALM",
    "SETTINGS_MAX_HEADER_LIST_SIZE",
    "SETTINGS_MAX_CONCURRENT_STREAMS",
];

/// A valid value other than the default, for every documented variable.
const SAMPLES: &[(&str, &str)] = &[
    ("LOG_FORMAT", "json"),
    ("SERVICE_HOST", "0.0.0.0"),
    ("SERVICE_PORT", "9999"),
    ("API_TOKEN", "0123456789abcdef-token"),
    ("WINDOW", "2d"),
    ("MAX_PAIRS_PER_REQUEST", "1000"),
    ("MAX_REQUEST_BYTES", "1MiB"),
    ("BATCH_SIZE", "10"),
    ("FLUSH_INTERVAL", "1s"),
    ("RETRY_ATTEMPTS", "5"),
    ("RETRY_BACKOFF", "1s"),
    ("RETRY_BACKOFF_MAX", "20s"),
    ("DATA_DIR", "/var/lib/userseg"),
    ("MAX_INFLIGHT_PAIRS", "2000000"),
    ("CHECKPOINT_INTERVAL", "1m"),
    ("CHECKPOINT_LOG_BYTES", "1GiB"),
    ("HISTORY_INTERVAL", "10s"),
    ("HISTORY_RETENTION", "7d"),
    ("CHANGES_RETENTION", "1d"),
    ("KAFKA_BROKER_URL", "kafka:9092"),
    ("KAFKA_TOPIC", "pairs"),
    ("KAFKA_DLQ_TOPIC", "pairs-dlq"),
    ("KAFKA_CLIENT_ID", "seg"),
    ("KAFKA_PARTITIONS", "12"),
    ("KAFKA_REPLICATION_FACTOR", "3"),
    ("KAFKA_CREATE_TOPICS", "false"),
    ("KAFKA_ACK_TIMEOUT", "5s"),
    ("KAFKA_LINGER", "1ms"),
    ("KAFKA_COMPRESSION", "zstd"),
    ("KAFKA_BATCH_BYTES", "100000"),
    ("KAFKA_QUEUE_MAX_MESSAGES", "1000"),
    ("KAFKA_QUEUE_MAX_KBYTES", "100000"),
    ("KAFKA_MAX_MESSAGE_BYTES", "500000"),
    ("KAFKA_METADATA_TIMEOUT", "1s"),
    ("KAFKA_METADATA_REFRESH", "10s"),
    ("KAFKA_PREFETCH_KBYTES", "2048"),
    ("KAFKA_PREFETCH_MESSAGES", "100"),
    ("KAFKA_SESSION_TIMEOUT", "10s"),
    ("KAFKA_MAX_POLL_INTERVAL", "60s"),
    ("KAFKA_STATS_INTERVAL", "0s"),
    ("KAFKA_EXTRA", "security.protocol=SSL"),
    ("KAFKA_GROUP_ID", "es-2"),
    ("CLICKHOUSE_ADDR", "http://ch:8123"),
    ("CLICKHOUSE_DATABASE", "seg"),
    ("CLICKHOUSE_USER", "writer"),
    ("CLICKHOUSE_PASSWORD", "s3cret"),
    ("CLICKHOUSE_REQUEST_TIMEOUT", "5s"),
    ("CLICKHOUSE_CONNECT_TIMEOUT", "1s"),
    ("CLICKHOUSE_MAX_ROWS_PER_INSERT", "1000"),
    ("CLICKHOUSE_NODES", "http://ch1:8123,http://ch2:8123"),
    ("CLICKHOUSE_NODE_DATABASE", "local"),
    ("ESTIMATE_CACHE_TTL", "0s"),
    ("RETENTION_INTERVAL", "10m"),
    ("ES_INDEX", "false"),
    ("KAFKA_CHANGES_TOPIC", "user-changes"),
    ("ES_PEERS", "http://es-2:8080"),
    ("ES_PEER_TOKEN", "usk_peer"),
];

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Per role command, its flags: environment variable → long flag.
fn flags() -> BTreeMap<String, BTreeMap<String, String>> {
    let cli = Cli::command();
    let mut out = BTreeMap::new();
    for role in ROLES {
        let cmd = cli
            .find_subcommand(role)
            .unwrap_or_else(|| panic!("no command {role}"));
        let mut vars = BTreeMap::new();
        for arg in cli.get_arguments().chain(cmd.get_arguments()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("{role} --{id} has no environment variable"));
            let long = arg
                .get_long()
                .unwrap_or_else(|| panic!("{role} --{id} has no long flag"));
            vars.insert(env.to_string_lossy().into_owned(), long.to_owned());
        }
        out.insert(role.to_string(), vars);
    }
    out
}

/// README's Configuration table: variable → the commands its row names.
fn readme_table() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (vars, commands) = (cells[1], cells[2]);
        let commands: BTreeSet<String> = if commands == "all" {
            ROLES.iter().map(|r| r.to_string()).collect()
        } else {
            commands.split_whitespace().map(str::to_owned).collect()
        };
        for var in vars.split(',').map(|v| v.trim().trim_matches('`')) {
            assert!(
                out.insert(var.to_owned(), commands.clone()).is_none(),
                "README lists {var} twice"
            );
        }
    }
    out
}

#[test]
fn the_readme_table_lists_exactly_the_flags_of_each_command() {
    let flags = flags();
    let table = readme_table();
    let mut accepted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (role, vars) in &flags {
        for var in vars.keys() {
            accepted
                .entry(var.clone())
                .or_default()
                .insert(role.clone());
        }
    }
    let documented: BTreeSet<&String> = table.keys().collect();
    let declared: BTreeSet<&String> = accepted.keys().collect();
    assert_eq!(
        documented.difference(&declared).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "documented in README but no command reads them"
    );
    assert_eq!(
        declared.difference(&documented).collect::<Vec<_>>(),
        Vec::<&&String>::new(),
        "read by a command but missing from README's Configuration table"
    );
    for (var, commands) in &table {
        assert_eq!(
            commands, &accepted[var],
            "README's commands for {var} are not the commands that read it"
        );
    }
}

#[test]
fn every_variable_named_in_the_docs_exists() {
    let mut known: BTreeSet<String> = flags().into_values().flat_map(|v| v.into_keys()).collect();
    let load = Cli::command();
    let load = load.find_subcommand("load").expect("load command");
    known.extend(
        load.get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned()),
    );
    known.extend(NOT_SETTINGS.iter().map(|s| s.to_string()));
    let mut files = vec![repo().join("README.md")];
    for entry in std::fs::read_dir(repo().join("docs")).expect("docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a doc");
        for token in text.split('`').skip(1).step_by(2) {
            let looks_like_a_variable = token.contains('_')
                && token
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if looks_like_a_variable {
                assert!(
                    known.contains(token),
                    "{} names `{token}`, which no command reads",
                    file.display()
                );
            }
        }
    }
}

/// The validated configuration of `role` with `flags`, printed (with the log format).
fn effective(role: &str, flags: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["userseg", role];
    argv.extend_from_slice(flags);
    let cli = Cli::try_parse_from(argv)?;
    let config = match cli.command {
        Command::Standalone(a) => format!("{:?}", a.validate()?),
        Command::Uss(a) => format!("{:?}", a.validate()?),
        Command::Es(a) => format!("{:?}", a.validate()?),
        Command::Migrate(a) => format!("{:?}", a.validate()?),
        _ => unreachable!("only role commands"),
    };
    Ok(format!("{config} log_format={}", cli.log_format))
}

/// Flags setting a variable whose value is a file that must exist and parse (keys, TLS): the
/// files are made in `dir`; the TLS files need each other.
fn file_sample(var: &str, dir: &Path) -> Option<Vec<String>> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    if !dir.join("server.key").exists() {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).expect("write");
        std::fs::write(dir.join("server.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
        let token_sha256 = userseg_api::auth::token_sha256_hex("a-token-for-the-sample");
        std::fs::write(
            dir.join("keys.toml"),
            format!("[[key]]\nname = \"a\"\nsha256 = \"{token_sha256}\"\nroles = [\"read\"]\n"),
        )
        .expect("write");
    }
    let cert_and_key = [
        "--tls-cert-file".to_string(),
        path("server.crt"),
        "--tls-key-file".to_string(),
        path("server.key"),
    ];
    match var {
        "API_KEYS_FILE" => Some(vec!["--api-keys-file".into(), path("keys.toml")]),
        "CLICKHOUSE_CA_FILE" => Some(vec!["--clickhouse-ca-file".into(), path("ca.crt")]),
        "TLS_CERT_FILE" | "TLS_KEY_FILE" => Some(cert_and_key.to_vec()),
        "TLS_CLIENT_CA_FILE" => {
            let mut v = cert_and_key.to_vec();
            v.extend(["--tls-client-ca-file".to_string(), path("ca.crt")]);
            Some(v)
        }
        _ => None,
    }
}

#[test]
fn every_documented_variable_changes_the_configuration() {
    let samples: BTreeMap<&str, &str> = SAMPLES.iter().copied().collect();
    let files = tempfile::tempdir().expect("tempdir");
    for (role, vars) in flags() {
        let default = effective(&role, &[]).expect("the defaults are valid");
        let tls_args = file_sample("TLS_CERT_FILE", files.path()).unwrap_or_default();
        let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        let tls_only = effective(&role, &tls_args);
        for (var, long) in vars {
            let (args, what) = match file_sample(&var, files.path()) {
                Some(args) => (args, "a generated file".to_string()),
                None => {
                    let value = samples
                        .get(var.as_str())
                        .unwrap_or_else(|| panic!("no sample value for {var}; add one to SAMPLES"));
                    (
                        vec![format!("--{long}"), value.to_string()],
                        value.to_string(),
                    )
                }
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let set = effective(&role, &args).unwrap_or_else(|e| panic!("{role} {args:?}: {e:#}"));
            assert_ne!(set, default, "{role}: {var}={what} changes nothing");
            if var == "TLS_CLIENT_CA_FILE" {
                let tls_only = tls_only.as_ref().expect("TLS alone is valid");
                assert_ne!(&set, tls_only, "{role}: {var} changes nothing beyond TLS");
            }
        }
    }
}
