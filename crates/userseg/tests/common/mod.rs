//! Harness for end-to-end tests of the distributed mode against the real servers that
//! scripts/test.sh starts (tansu for Kafka, ClickHouse). Tests fail, never skip, without them.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the real servers; run them with `make test` \
             (scripts/test.sh starts tansu and ClickHouse and exports the variables)"
        )
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

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
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("{test}_{}_{nanos}", std::process::id());
        let logs = std::env::temp_dir().join(format!("userseg-e2e-{id}"));
        std::fs::create_dir_all(&logs).expect("log dir");
        Cluster {
            kafka: required_env("USERSEG_TEST_KAFKA"),
            clickhouse: required_env("USERSEG_TEST_CLICKHOUSE_URL"),
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
            ("SERVICE_HOST", "127.0.0.1"),
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
        let log_path = self.logs.join(format!("{role}-{port}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_userseg"));
        cmd.arg(role)
            .envs(self.env())
            .env("SERVICE_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Proc {
            child: cmd.spawn().expect("spawn userseg"),
            base: format!("http://127.0.0.1:{port}"),
            port,
            log: log_path,
        }
    }
}

pub struct Proc {
    pub child: Child,
    pub base: String,
    pub port: u16,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Waits until the process answers `/healthz` (it is up; readiness may still depend on
    /// other servers).
    pub async fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/healthz", self.base)).await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("userseg exited early with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "userseg never came up");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn ready(&mut self) {
        self.up().await;
        until("ready", 60, async || self.readyz().await.0 == 200).await;
    }

    pub async fn readyz(&self) -> (u16, Value) {
        match reqwest::get(format!("{}/readyz", self.base)).await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub async fn counts(&self) -> Vec<(String, u64)> {
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

    /// A counter or gauge from `/metrics` (summed over label sets), 0 when absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("{}/metrics", self.base)).await else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub async fn until<F>(what: &str, secs: u64, mut f: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn seg(name: &str, users: u64) -> (String, u64) {
    (name.to_string(), users)
}
