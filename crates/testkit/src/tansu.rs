//! A tansu broker of a test's own, started and stopped with `scripts/tansu.sh` (memory storage),
//! for tests that need a broker configured differently from the shared one `make test` starts.

use std::path::PathBuf;
use std::process::Command;

/// A running broker; stopped when dropped.
pub struct Tansu {
    dir: tempfile::TempDir,
    /// Where the broker listens, `127.0.0.1:PORT`.
    pub addr: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tansu.sh")
}

impl Tansu {
    /// Starts a broker on a free port that advertises `advertised` (a listener URL such as
    /// `tcp://localhost:9093`) to its clients instead of its own address when given.
    pub fn start(advertised: Option<&str>) -> Tansu {
        let dir = tempfile::tempdir().expect("a directory for tansu");
        let mut cmd = Command::new(script());
        cmd.arg("start").arg(dir.path());
        if let Some(url) = advertised {
            cmd.env("TANSU_ADVERTISED", url);
        }
        cmd.env("TANSU_STORAGE", "memory");
        let out = cmd.output().expect("run scripts/tansu.sh");
        assert!(
            out.status.success(),
            "scripts/tansu.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.path().join("tansu.env")).expect("tansu.env");
        let addr = env
            .lines()
            .find_map(|l| l.strip_prefix("USERSEG_TEST_KAFKA="))
            .expect("USERSEG_TEST_KAFKA in tansu.env")
            .trim()
            .to_string();
        Tansu { dir, addr }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}
