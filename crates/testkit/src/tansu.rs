//! A tansu broker of a test's own, started and stopped with `scripts/tansu.sh`, for tests that
//! need a broker configured differently from the shared one `make test` starts: memory storage,
//! or sqlite storage that survives a restart in the same directory and on the same port.

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

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().expect("run scripts/tansu.sh");
    assert!(
        out.status.success(),
        "scripts/tansu.sh {what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Tansu {
    /// Starts a broker with memory storage on a free port that advertises `advertised` (a
    /// listener URL such as `tcp://localhost:9093`) to its clients instead of its own address
    /// when given.
    pub fn start(advertised: Option<&str>) -> Tansu {
        Tansu::start_with("memory", advertised)
    }

    /// Starts a broker with sqlite storage (a file in its own directory): topics, records and
    /// committed offsets survive [`Tansu::stop`] then [`Tansu::restart`].
    pub fn sqlite() -> Tansu {
        Tansu::start_with("sqlite", None)
    }

    fn start_with(storage: &str, advertised: Option<&str>) -> Tansu {
        let dir = tempfile::tempdir().expect("a directory for tansu");
        let mut cmd = Command::new(script());
        cmd.arg("start").arg(dir.path());
        if let Some(url) = advertised {
            cmd.env("TANSU_ADVERTISED", url);
        }
        cmd.env("TANSU_STORAGE", storage);
        run(&mut cmd, "start");
        let env = std::fs::read_to_string(dir.path().join("tansu.env")).expect("tansu.env");
        let addr = env
            .lines()
            .find_map(|l| l.strip_prefix("USERSEG_TEST_KAFKA="))
            .expect("USERSEG_TEST_KAFKA in tansu.env")
            .trim()
            .to_string();
        Tansu { dir, addr }
    }

    /// Stops the broker (SIGTERM); its directory stays.
    pub fn stop(&self) {
        run(
            Command::new(script()).arg("stop").arg(self.dir.path()),
            "stop",
        );
    }

    /// Starts the stopped broker again in the same directory, on the same port, with the same
    /// storage.
    pub fn restart(&self) {
        let mut cmd = Command::new(script());
        cmd.arg("start").arg(self.dir.path());
        // tansu.sh keeps the port and storage of the previous start of this directory.
        cmd.env_remove("TANSU_STORAGE");
        run(&mut cmd, "start (again)");
    }

    /// The broker's log (what it printed, panics included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
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
