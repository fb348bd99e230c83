//! What the scale examples share: the data set (Zipf-sized segments over a user space, filled
//! the same way by every example), a cheap deterministic rng, RSS and latency percentiles.

use std::time::{Duration, Instant};

use userseg_domain::{Pair, Window};
use userseg_embedded::MemStore;

/// xorshift: cheap deterministic randomness.
pub struct Rng(pub u64);

impl Rng {
    pub fn new() -> Rng {
        Rng(0x9e3779b97f4a7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The data set of `[pairs] [segments] [users]` (the command line's).
pub struct Scale {
    pub pairs: u64,
    pub segments: u64,
    pub users: u64,
    pub window: Window,
    pub now: i64,
    /// Segment sizes follow a Zipf-like law: segment k gets a share ∝ 1/(k+1).
    pub sizes: Vec<u64>,
}

impl Scale {
    pub fn from_args() -> Scale {
        let args: Vec<u64> = std::env::args()
            .skip(1)
            .filter_map(|a| a.replace('_', "").parse().ok())
            .collect();
        let pairs = *args.first().unwrap_or(&10_000_000);
        let segments = *args.get(1).unwrap_or(&500);
        let users = *args.get(2).unwrap_or(&(pairs / 5).max(1));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let harmonic: f64 = (1..=segments).map(|k| 1.0 / k as f64).sum();
        let sizes = (1..=segments)
            .map(|k| ((pairs as f64 / harmonic) / k as f64).max(1.0) as u64)
            .map(|s| s.min(users))
            .collect();
        Scale {
            pairs,
            segments,
            users,
            window: Window::DEFAULT,
            now,
            sizes,
        }
    }

    /// Fills `store`: segment `k` (named `segment-{k:03}`) gets `sizes[k]` distinct users (a
    /// random stride walk over the user space), each seen at a random time of the last 13
    /// days; applied in batches of 100,000. Returns the time spent applying.
    pub fn fill(&self, store: &MemStore, rng: &mut Rng) -> Duration {
        let users = self.users;
        let mut batch = Vec::with_capacity(100_000);
        let mut applying = Duration::ZERO;
        let mut apply = |batch: &mut Vec<Pair>| {
            let t = Instant::now();
            let _ = store.apply(batch);
            applying += t.elapsed();
            batch.clear();
        };
        for (k, &size) in self.sizes.iter().enumerate() {
            let segment = format!("segment-{k:03}");
            let stride = (rng.next() % users.max(2)) | 1;
            let mut u = rng.next() % users;
            for _ in 0..size {
                u = (u + stride) % users;
                batch.push(Pair {
                    user_id: format!("user-{u:012}"),
                    segment: segment.clone(),
                    ts: self.now - (rng.next() % (13 * 86_400)) as i64,
                });
                if batch.len() == batch.capacity() {
                    apply(&mut batch);
                }
            }
        }
        apply(&mut batch);
        applying
    }
}

/// Resident memory of this process.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// p50 / p99 / max in milliseconds of sorted durations.
pub fn latency_ms(sorted: &[Duration]) -> serde_json::Value {
    let ms = |p: f64| {
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i].as_secs_f64() * 1e3
    };
    serde_json::json!({"p50": ms(0.5), "p99": ms(0.99), "max": ms(1.0)})
}
