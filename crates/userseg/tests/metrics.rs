//! docs/METRICS.md, the code and the Grafana dashboard agree: the real processes (standalone,
//! uss, es against tansu and ClickHouse) are scraped and every exported family must be listed
//! in the document for that role, with its type, and every listed family must be exported;
//! every query of deploy/grafana/userseg.json names only listed metrics. The metrics' values
//! are checked against what the test did.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, now, until, Api, Cluster, Proc};
use serde_json::{json, Value};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{Pair as GrpcPair, PushRequest};
use userseg_testkit::metrics::{self, value};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// One row of a table in docs/METRICS.md.
#[derive(Debug)]
struct DocRow {
    name: String,
    kind: String,
    roles: Vec<String>,
}

fn doc_rows() -> Vec<DocRow> {
    let text = std::fs::read_to_string(repo_file("docs/METRICS.md")).expect("docs/METRICS.md");
    let rows: Vec<DocRow> = text
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert!(
                cells.len() >= 5,
                "docs/METRICS.md: a row needs 5 cells: {l}"
            );
            DocRow {
                name: cells[0].trim_matches('`').to_string(),
                kind: cells[1].to_string(),
                roles: cells[3].split(',').map(|r| r.trim().to_string()).collect(),
            }
        })
        .collect();
    assert!(
        rows.len() > 40,
        "docs/METRICS.md lists only {} metrics",
        rows.len()
    );
    rows
}

/// name → type the document promises for `role`.
fn documented(role: &str) -> BTreeMap<String, String> {
    doc_rows()
        .into_iter()
        .filter(|r| r.roles.iter().any(|x| x == role))
        .map(|r| (r.name, r.kind))
        .collect()
}

/// name → type of every family in a scrape (from its `# TYPE` lines).
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

async fn scrape(base: &str) -> String {
    metrics::scrape(base).await.unwrap_or_default()
}

/// Waits until the scrape's families equal the document's for `role` (families with run-time
/// labels appear with their first value), then checks the types; fails with the difference.
async fn families_match_doc(base: &str, role: &str) -> String {
    let want = documented(role);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let text = scrape(base).await;
        let got = families(&text);
        let got_names: BTreeSet<_> = got.keys().cloned().collect();
        let want_names: BTreeSet<_> = want.keys().cloned().collect();
        if got_names == want_names {
            for (name, kind) in &want {
                assert_eq!(
                    got.get(name),
                    Some(kind),
                    "{role}: {name} is documented as a {kind}, exported as {:?}",
                    got.get(name)
                );
            }
            return text;
        }
        if Instant::now() > deadline {
            let undocumented: Vec<_> = got_names.difference(&want_names).collect();
            let missing: Vec<_> = want_names.difference(&got_names).collect();
            panic!(
                "{role}: /metrics and docs/METRICS.md disagree.\n  exported but not documented for {role}: {undocumented:?}\n  documented for {role} but not exported: {missing:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn spawn_standalone(data: &Path, port: u16) -> Proc {
    let log = data.with_extension("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_userseg"));
    cmd.arg("standalone")
        .env("DATA_DIR", data)
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("FLUSH_INTERVAL", "50ms")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    Proc {
        child: cmd.spawn().expect("spawn userseg standalone"),
        base: format!("http://127.0.0.1:{port}"),
        port,
        log,
    }
}

async fn push(base: &str, pairs: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/pairs"))
        .json(&json!({ "pairs": pairs }))
        .send()
        .await
        .expect("push")
}

#[tokio::test]
async fn standalone_exports_exactly_the_documented_metrics_with_real_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn_standalone(&dir.path().join("data"), free_port());
    p.ready().await;

    // Zero-valued from start-up: families of events that have not happened yet are there.
    let first = scrape(&p.base).await;
    for name in [
        "userseg_dead_letters_total",
        "userseg_processor_retries_total",
        "userseg_wal_commit_seconds",
    ] {
        assert!(
            families(&first).contains_key(name),
            "{name} is missing from the first scrape"
        );
    }
    assert_eq!(
        value(
            &first,
            "userseg_processor_flushes_total",
            &[("reason", "shutdown")]
        ),
        0.0
    );

    let ts = now() - 60;
    for i in 0..3 {
        let r = push(
            &p.base,
            json!([
                {"user_id": format!("u{i}"), "segment": "sports", "ts": ts},
                {"user_id": format!("u{i}"), "segment": "news", "ts": ts},
            ]),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let bad = push(&p.base, json!([{"user_id": "u", "segment": "no spaces"}])).await;
    assert_eq!(bad.status(), 400);
    let r = reqwest::get(format!("{}/v1/segments/sports?mode=fast", p.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Paths no route serves are labelled together, never by their text.
    let r = reqwest::get(format!("{}/no/such/path-4711", p.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // gRPC: one good push, one invalid.
    let mut grpc = SegmentsClient::connect(p.base.clone()).await.unwrap();
    let good = PushRequest {
        pairs: vec![GrpcPair {
            user_id: "g1".into(),
            segment: "grpc".into(),
            ts: Some(ts),
        }],
    };
    grpc.push(good).await.expect("grpc push");
    let invalid = PushRequest {
        pairs: vec![GrpcPair {
            user_id: "g1".into(),
            segment: "bad segment".into(),
            ts: None,
        }],
    };
    let status = grpc.push(invalid).await.expect_err("invalid");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    families_match_doc(&p.base, "standalone").await;
    until("the segment gauges show the pushed users", 40, async || {
        let t = scrape(&p.base).await;
        value(&t, "userseg_segment_users", &[("segment", "sports")]) == 3.0
            && value(&t, "userseg_segment_users", &[("segment", "news")]) == 3.0
    })
    .await;
    // Everything was applied (the gauges saw it): the counters are final.
    let text = scrape(&p.base).await;
    let v = |name: &str, labels: &[(&str, &str)]| value(&text, name, labels);
    assert_eq!(v("userseg_ingest_pairs_total", &[]), 7.0);
    assert_eq!(v("userseg_processor_pairs_written_total", &[]), 7.0);
    for (code, n) in [("OK", 1.0), ("INVALID_ARGUMENT", 1.0)] {
        let labels = [("method", "userseg.v1.Segments/Push"), ("code", code)];
        assert_eq!(v("userseg_grpc_requests_total", &labels), n, "{code}");
        assert_eq!(
            v("userseg_grpc_request_duration_seconds_count", &labels),
            n,
            "{code}"
        );
    }
    assert_eq!(
        v(
            "userseg_http_requests_total",
            &[("route", "/v1/pairs"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        v(
            "userseg_http_errors_total",
            &[("route", "/v1/pairs"), ("code", "invalid_argument")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "userseg_http_errors_total",
            &[
                ("route", "/v1/segments/{segment}"),
                ("code", "invalid_argument")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "userseg_ingest_rejected_requests_total",
            &[("reason", "invalid")]
        ),
        2.0
    );
    // Every applied message measured its ingest → applied lag, within the histogram's range.
    let lag_count = v("userseg_processor_applied_lag_seconds_count", &[]);
    assert_eq!(lag_count, 4.0, "one lag per accepted request");
    assert_eq!(
        v(
            "userseg_processor_applied_lag_seconds_bucket",
            &[("le", "10")]
        ),
        lag_count
    );
    // An idle server applies as soon as the log runs dry (read-your-writes), else on the timer.
    assert!(
        v("userseg_processor_flushes_total", &[("reason", "drained")])
            + v("userseg_processor_flushes_total", &[("reason", "interval")])
            >= 1.0
    );
    assert_eq!(
        v(
            "userseg_http_request_duration_seconds_count",
            &[("route", "/v1/pairs")]
        ),
        4.0
    );
    assert!(v("userseg_wal_commit_seconds_count", &[]) >= 3.0);
    assert_eq!(
        v(
            "userseg_http_errors_total",
            &[("route", "unmatched"), ("code", "not_found")]
        ),
        1.0
    );
    assert!(!text.contains("path-4711"), "a path became a label");
    assert!(v("process_resident_memory_bytes", &[]) > 1e6);
    assert!(v("process_open_fds", &[]) >= 3.0);
    until("DATA_DIR bytes are sampled", 20, async || {
        value(&scrape(&p.base).await, "userseg_data_dir_bytes", &[]) > 0.0
    })
    .await;
}

#[tokio::test]
async fn uss_and_es_export_exactly_the_documented_metrics() {
    let c = Cluster::new("metrics");
    c.migrate();
    let mut es = c.spawn("es", &[]);
    let mut uss = c.spawn("uss", &[]);
    uss.ready().await;
    es.ready().await;
    let ts = now() - 60;
    let pairs: Vec<Value> = (0..20)
        .map(|i| json!({"user_id": format!("u{i}"), "segment": "sports", "ts": ts}))
        .collect();
    let r = push(&uss.base, Value::Array(pairs)).await;
    assert_eq!(r.status(), 200);
    until("es counts the pushed users", 60, async || {
        es.counts().await == vec![("sports".to_string(), 20)]
    })
    .await;
    // The console is served where estimates are: on the ES, not on the USS.
    let ui = |base: String| async move {
        reqwest::get(format!("{base}/ui/"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(ui(es.base.clone()).await, 200);
    assert_eq!(ui(uss.base.clone()).await, 404);
    families_match_doc(&uss.base, "uss").await;
    let text = families_match_doc(&es.base, "es").await;
    until("es wrote the pairs to ClickHouse", 60, async || {
        let t = scrape(&es.base).await;
        value(&t, "userseg_processor_pairs_written_total", &[]) == 20.0
            && value(&t, "userseg_processor_applied_lag_seconds_count", &[]) >= 1.0
    })
    .await;
    assert!(value(&text, "userseg_kafka_published_pairs_total", &[]) == 0.0);
    let u = scrape(&uss.base).await;
    assert_eq!(value(&u, "userseg_kafka_published_pairs_total", &[]), 20.0);
    assert_eq!(value(&u, "userseg_ingest_pairs_total", &[]), 20.0);
}

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names, grouping labels, durations, strings or variables.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let skip_group = |i: &mut usize, open: u8, close: u8| {
        let mut depth = 0;
        while *i < b.len() {
            if b[*i] == b'"' {
                *i += 1;
                while *i < b.len() && b[*i] != b'"' {
                    *i += if b[*i] == b'\\' { 2 } else { 1 };
                }
            } else if b[*i] == open {
                depth += 1;
            } else if b[*i] == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return;
                }
            }
            *i += 1;
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            skip_group(&mut i, b'{', b'}');
        } else if c == b'[' {
            skip_group(&mut i, b'[', b']');
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == b'$' || c.is_ascii_digit() || c == b'.' {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            if AGGREGATIONS.contains(&word) {
                // `sum by (le) (...)`: the grouping clause is skipped when its keyword is read.
            } else if KEYWORDS.contains(&word) {
                if call {
                    i = j;
                    skip_group(&mut i, b'(', b')');
                }
            } else if !call {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn promql_names_are_extracted() {
    let e = r#"histogram_quantile(0.99, sum by (le, route) (rate(userseg_http_request_duration_seconds_bucket{route!="x", code=~"a|b"}[$__rate_interval]))) / on (instance) topk(20, max by (segment) (userseg_segment_users offset 5m))"#;
    let names: Vec<_> = promql_metrics(e).into_iter().collect();
    assert_eq!(
        names,
        vec![
            "userseg_http_request_duration_seconds_bucket",
            "userseg_segment_users"
        ]
    );
}

#[test]
fn every_dashboard_query_names_documented_metrics() {
    let text = std::fs::read_to_string(repo_file("deploy/grafana/userseg.json"))
        .expect("deploy/grafana/userseg.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let docs = doc_rows();
    let kinds: BTreeMap<&str, &str> = docs
        .iter()
        .map(|r| (r.name.as_str(), r.kind.as_str()))
        .collect();
    let known = |name: &str| {
        if kinds.contains_key(name) {
            return kinds[name] != "histogram"; // histograms are queried as _bucket/_sum/_count
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| kinds.get(base) == Some(&"histogram"))
        })
    };
    let panels = dash["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    let mut graphs = 0;
    for panel in panels {
        if panel["type"] == "row" {
            continue;
        }
        graphs += 1;
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("every target has an expr");
            let names = promql_metrics(expr);
            assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
            for n in names {
                assert!(
                    known(&n),
                    "panel {title:?} queries {n}, which docs/METRICS.md does not list (as such): {expr}"
                );
                queried.insert(n);
            }
        }
    }
    assert!(graphs >= 15, "only {graphs} panels");
    // What the dashboard must show: rates, latency quantiles, lag, errors, batches, segments,
    // resources.
    for needed in [
        "userseg_ingest_pairs_total",
        "userseg_http_request_duration_seconds_bucket",
        "userseg_processor_applied_lag_seconds_bucket",
        "userseg_kafka_consumer_lag",
        "userseg_http_errors_total",
        "userseg_processor_batch_pairs_bucket",
        "userseg_segment_users",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "userseg_data_dir_bytes",
    ] {
        assert!(queried.contains(needed), "no panel queries {needed}");
    }
}
