//! A child process of a real binary under test: started with its environment and a log file,
//! awaited until it answers, killed with SIGKILL, and killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server process listening on `port` (HTTP on `base`).
pub struct Proc {
    pub child: Child,
    pub base: String,
    pub port: u16,
    /// Its stderr (the logs), appended across restarts on the same path.
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `bin args...` with `env`, `SERVICE_HOST=127.0.0.1` and `SERVICE_PORT=port`, its
    /// stderr appended to `log`.
    pub fn spawn(
        bin: impl AsRef<Path>,
        args: &[&str],
        env: &[(String, String)],
        port: u16,
        log: impl Into<PathBuf>,
    ) -> Proc {
        let log = log.into();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("log file {}: {e}", log.display()));
        let bin = bin.as_ref();
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("SERVICE_HOST", "127.0.0.1")
            .env("SERVICE_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        Proc {
            child,
            base: format!("http://127.0.0.1:{port}"),
            port,
            log,
        }
    }

    /// What the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `path` answers 2xx; fails the test (with the logs) if the process exits or
    /// `secs` pass first.
    pub async fn until_ok(&mut self, path: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(r) = reqwest::get(format!("{}{path}", self.base)).await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the process exited early with {status}:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "{path} did not answer 2xx within {secs} s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the process is up (`/healthz`); readiness may still depend on other servers.
    pub async fn up(&mut self) {
        self.until_ok("/healthz", 60).await;
    }

    /// Waits until the process is ready (`/readyz`).
    pub async fn ready(&mut self) {
        self.until_ok("/readyz", 60).await;
    }

    /// `/readyz`: its status (0 when nothing answers) and body.
    pub async fn readyz(&self) -> (u16, Value) {
        match reqwest::get(format!("{}/readyz", self.base)).await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// Its resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit (failing the test after `secs`).
    pub async fn sigterm(&mut self, secs: u64) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {secs} s after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
