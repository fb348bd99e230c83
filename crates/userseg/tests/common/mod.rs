//! Harness for end-to-end tests of the distributed mode against the real servers that
//! scripts/test.sh starts (tansu for Kafka, ClickHouse). Tests fail, never skip, without them.

#![allow(dead_code, unused_imports)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
pub use userseg_testkit::{free_port, now, servers, until, Proc};

/// Names private to one test: topics, consumer group, ClickHouse database.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub kafka: String,
    pub clickhouse: String,
    pub topic: String,
    pub dlq: String,
    pub group: String,
    pub database: String,
    pub logs: PathBuf,
}

impl Cluster {
    pub fn new(test: &str) -> Cluster {
        let id = userseg_testkit::unique(test);
        let logs = std::env::temp_dir().join(format!("userseg-e2e-{id}"));
        std::fs::create_dir_all(&logs).expect("log dir");
        Cluster {
            kafka: servers::kafka(),
            clickhouse: servers::clickhouse(),
            topic: format!("pairs-{id}"),
            dlq: format!("dlq-{id}"),
            group: format!("es-{id}"),
            database: format!("e2e_{id}"),
            logs,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("KAFKA_BROKER_URL", self.kafka.as_str()),
            ("KAFKA_TOPIC", &self.topic),
            ("KAFKA_DLQ_TOPIC", &self.dlq),
            ("KAFKA_GROUP_ID", &self.group),
            ("KAFKA_PARTITIONS", "6"),
            ("CLICKHOUSE_ADDR", &self.clickhouse),
            ("CLICKHOUSE_DATABASE", &self.database),
            ("ESTIMATE_CACHE_TTL", "0s"),
            ("FLUSH_INTERVAL", "100ms"),
            ("RETRY_BACKOFF_MAX", "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    pub fn migrate(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
            .arg("migrate")
            .envs(self.env())
            .output()
            .expect("run userseg migrate");
        assert!(
            out.status.success(),
            "migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `userseg <role>` on a free port with this cluster's settings plus `extra`.
    pub fn spawn(&self, role: &str, extra: &[(&str, &str)]) -> Proc {
        let port = free_port();
        self.spawn_on(role, port, extra)
    }

    pub fn spawn_on(&self, role: &str, port: u16, extra: &[(&str, &str)]) -> Proc {
        let mut env = self.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Proc::spawn(
            env!("CARGO_BIN_EXE_userseg"),
            &[role],
            &env,
            port,
            self.logs.join(format!("{role}-{port}.log")),
        )
    }
}

/// What the tests read from a running userseg's API.
pub trait Api {
    /// `GET /v1/segments` as (segment, users), empty when nothing answers.
    async fn counts(&self) -> Vec<(String, u64)>;
    /// A counter or gauge from `/metrics` (summed over label sets), 0 when absent.
    async fn metric(&self, name: &str) -> f64;
}

impl Api for Proc {
    async fn counts(&self) -> Vec<(String, u64)> {
        let Ok(r) = reqwest::get(format!("{}/v1/segments", self.base)).await else {
            return Vec::new();
        };
        let body: Value = r.json().await.unwrap_or(Value::Null);
        body["segments"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        (
                            s["segment"].as_str().unwrap_or_default().to_string(),
                            s["users"].as_u64().unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn metric(&self, name: &str) -> f64 {
        userseg_testkit::metrics::metric(&self.base, name)
            .await
            .unwrap_or(0.0)
    }
}

pub fn seg(name: &str, users: u64) -> (String, u64) {
    (name.to_string(), users)
}

/// `scripts/clickhouse.sh CMD DIR [PORT]` on the shared test ClickHouse (the directory
/// scripts/test.sh exports as USERSEG_TEST_CLICKHOUSE_DIR).
pub fn clickhouse(cmd: &str, port: Option<&str>) {
    let dir = servers::required(
        "USERSEG_TEST_CLICKHOUSE_DIR",
        "the directory of `scripts/clickhouse.sh start DIR`",
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/clickhouse.sh");
    let mut c = Command::new("bash");
    c.arg(script).arg(cmd).arg(&dir);
    if let Some(p) = port {
        c.arg(p);
    }
    let out = c.output().expect("run scripts/clickhouse.sh");
    assert!(
        out.status.success(),
        "clickhouse.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
