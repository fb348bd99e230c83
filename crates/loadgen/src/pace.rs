//! `--rate`: one pacer, shared by every worker, spaces the batches they put on the wire.
//!
//! The pacer keeps a schedule. A batch of `b` pairs asking for a slot gets the time at which
//! the pairs granted before it are paid for, `start + (pairs granted before) / rate`, waits
//! until then (one timer, no polling loop), and moves the schedule on by `b / rate`. So the
//! first batch goes at once and `N` batches of `b` pairs are released over `(N - 1)·b / rate`,
//! whichever workers ask for them.
//!
//! When nobody asks for a while (the server is slow, a worker backs off after an overload
//! error), the schedule falls behind the clock. It is never allowed to lag by more than
//! [`MAX_DEBT`]: the batches whose slots are in that last second go out back to back, and the
//! ones after them are paced again. A stall therefore costs at most ~1 s of pairs in a burst,
//! and the rest of the lost time is simply lost (the achieved rate is lower).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How far the schedule may lag behind the clock: the largest catch-up burst, in time at the
/// configured rate.
pub(crate) const MAX_DEBT: Duration = Duration::from_secs(1);

/// The longest step a single batch moves the schedule by, so that absurdly low rates cannot
/// overflow the clock arithmetic (such a run waits "forever" either way).
const MAX_STEP_SECS: f64 = 1e9;

/// The shared schedule of a run.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Pairs per second, finite and > 0.
    rate: f64,
    max_debt: Duration,
    /// When the next batch may go; `None` until the first one asks.
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `rate` pairs per second (finite, > 0), with the default [`MAX_DEBT`].
    pub(crate) fn new(rate: f64) -> Pacer {
        Pacer::with_max_debt(rate, MAX_DEBT)
    }

    pub(crate) fn with_max_debt(rate: f64, max_debt: Duration) -> Pacer {
        Pacer {
            rate,
            max_debt,
            next: Mutex::new(None),
        }
    }

    /// Reserves the slot of a batch of `pairs`: the time it may be sent. `None`, and nothing
    /// reserved, when that slot is at or after `deadline`.
    fn reserve(&self, pairs: u64, deadline: Option<Instant>) -> Option<Instant> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let floor = now.checked_sub(self.max_debt).unwrap_or(now);
        let at = match *next {
            Some(n) => n.max(floor),
            None => now,
        };
        if deadline.is_some_and(|d| at >= d) {
            return None;
        }
        let step = (pairs as f64 / self.rate).min(MAX_STEP_SECS);
        *next = Some(at + Duration::from_secs_f64(step));
        Some(at)
    }
}

/// A worker's handle on the pacer: also knows the run's deadline and its stop signal.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    pacer: Arc<Pacer>,
    deadline: Option<Instant>,
    stop: watch::Receiver<bool>,
}

impl Gate {
    pub(crate) fn new(
        pacer: Arc<Pacer>,
        deadline: Option<Instant>,
        stop: watch::Receiver<bool>,
    ) -> Gate {
        Gate {
            pacer,
            deadline,
            stop,
        }
    }

    /// The same gate ignoring the deadline: for re-sending bodies the server may already have
    /// seen.
    pub(crate) fn without_deadline(self) -> Gate {
        Gate {
            deadline: None,
            ..self
        }
    }

    /// Waits for the slot of a batch of `pairs`. `false`: do not send it, because its slot is
    /// at or after the deadline, or the run is stopping (which also ends the wait early).
    pub(crate) async fn pass(&mut self, pairs: u64) -> bool {
        if *self.stop.borrow() {
            return false;
        }
        let Some(at) = self.pacer.reserve(pairs, self.deadline) else {
            return false;
        };
        if at <= Instant::now() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep_until(at) => true,
            // A dropped sender leaves the branch disabled, and the sleep decides.
            Ok(_) = self.stop.wait_for(|s| *s) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: u64 = 1000;
    const RATE: f64 = 50_000.0;

    fn gate(pacer: &Arc<Pacer>, deadline: Option<Instant>) -> (Gate, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (Gate::new(pacer.clone(), deadline, rx), tx)
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn n_batches_take_n_batch_over_rate() {
        let pacer = Arc::new(Pacer::new(RATE));
        let (mut g, _tx) = gate(&pacer, None);
        let n = 500u64;
        let start = Instant::now();
        for k in 0..n {
            assert!(g.pass(BATCH).await);
            // Batch k goes at start + k·batch/rate.
            let expected = k as f64 * BATCH as f64 / RATE;
            let got = secs(Instant::now() - start);
            assert!((got - expected).abs() < 1e-3, "batch {k}: {got} s");
        }
        // The last batch's own interval elapses too before the pacer grants anything else.
        assert!(g.pass(BATCH).await);
        let took = secs(Instant::now() - start);
        let want = n as f64 * BATCH as f64 / RATE;
        assert!((took - want).abs() < 0.01 * want, "{took} s for {want} s");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_shared_by_all_workers() {
        let pacer = Arc::new(Pacer::new(RATE));
        let start = Instant::now();
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // 8 workers, 100 batches each, of different sizes.
        for w in 0..8u64 {
            let mut g = Gate::new(pacer.clone(), None, rx.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    assert!(g.pass(BATCH + w * 100).await);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(tx);
        let pairs: u64 = (0..8).map(|w| 100 * (BATCH + w * 100)).sum();
        let took = secs(Instant::now() - start);
        let want = pairs as f64 / RATE;
        // All but the last batch's interval have elapsed: within one batch of pairs / rate.
        let slack = (BATCH + 700) as f64 / RATE + 1e-6;
        assert!(
            took <= want && took >= want - slack,
            "{took} s for {pairs} pairs at {RATE}/s ({want} s)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_bursts_at_most_the_debt_cap() {
        let pacer = Arc::new(Pacer::new(RATE));
        let (mut g, _tx) = gate(&pacer, None);
        for _ in 0..10 {
            assert!(g.pass(BATCH).await);
        }
        // Nobody asks for 30 s (a stalled server).
        tokio::time::sleep(Duration::from_secs(30)).await;
        let stalled = Instant::now();
        let mut immediate = 0u64;
        while g.pass(BATCH).await && Instant::now() == stalled {
            immediate += 1;
        }
        // 1 s of pairs at 50k/s is 50 batches of 1000 (plus the one whose slot is "now").
        let cap = (RATE * MAX_DEBT.as_secs_f64()) as u64 / BATCH + 1;
        assert!(
            immediate >= cap - 1 && immediate <= cap,
            "{immediate} batches sent back to back, cap {cap}"
        );
        // Then paced again: 100 more batches take 100·batch/rate.
        let t = Instant::now();
        for _ in 0..100 {
            assert!(g.pass(BATCH).await);
        }
        let took = secs(Instant::now() - t);
        let want = 100.0 * BATCH as f64 / RATE;
        assert!(
            (took - want).abs() <= BATCH as f64 / RATE + 1e-6,
            "{took} s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_and_stop_end_the_wait() {
        let pacer = Arc::new(Pacer::new(1000.0));
        let start = Instant::now();
        let (mut g, tx) = gate(&pacer, Some(start + Duration::from_secs(5)));
        // 1000 pairs a second, batches of 1000: slots at 0, 1, 2, 3, 4 s; 5 s is too late.
        let mut passed = 0;
        while g.pass(1000).await {
            passed += 1;
        }
        assert_eq!(passed, 5);
        assert_eq!(secs(Instant::now() - start).round(), 4.0);
        // Without the deadline the next slot (5 s) is granted.
        let mut g = g.without_deadline();
        assert!(g.pass(1000).await);
        assert_eq!(secs(Instant::now() - start).round(), 5.0);
        // A slot far ahead (rate 1000, a batch of 1e6 pairs: 1000 s), cut short by the stop.
        assert!(g.pass(1_000_000).await);
        let waiting = tokio::spawn({
            let mut g = g.clone();
            async move { g.pass(1).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        tx.send_replace(true);
        assert!(!waiting.await.unwrap());
        assert!(secs(Instant::now() - start) < 10.0);
        assert!(!g.pass(1).await, "stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn tiny_rates_do_not_overflow() {
        let pacer = Arc::new(Pacer::new(1e-300));
        let (mut g, _tx) = gate(&pacer, Some(Instant::now() + Duration::from_secs(1)));
        assert!(g.pass(1_000_000).await);
        assert!(!g.pass(1_000_000).await);
    }
}
