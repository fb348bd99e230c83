//! What the distributed change feed needs from the store outside detection: the exit event of
//! a membership as the exit tick would make it (same id), for exits due while no estimation
//! service ran (`es.rs` finds them in the store of record).

use userseg_domain::{ChangeEvent, ChangeReason, UnixSeconds};

use super::MemStore;

impl MemStore {
    /// The `exited`/`expired` event of the membership (user, segment) last seen at
    /// `last_seen`, exactly as the exit tick emits it.
    pub fn expired_event(
        &self,
        user_id: &str,
        segment: &str,
        last_seen: UnixSeconds,
    ) -> ChangeEvent {
        let b = self.bucketing.bucket_of(last_seen);
        let ts = (b + self.bucketing.window_buckets()) * self.bucketing.bucket_secs();
        ChangeEvent::new(user_id, segment, ChangeReason::Expired, ts, b)
    }

    /// Has the membership last seen at `last_seen` expired at `now` (by the store's buckets,
    /// as the exit tick decides)?
    pub fn expired_at(&self, last_seen: UnixSeconds, now: UnixSeconds) -> bool {
        self.bucketing.bucket_of(last_seen) <= self.bucketing.live_range(now).0
    }

    /// Does the store hold (user, segment) live at `at`?
    pub fn holds_live(&self, user_id: &str, segment: &str, at: UnixSeconds) -> bool {
        self.user_segments(user_id, at)
            .iter()
            .any(|m| m.segment == segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userseg_domain::{Pair, Window};

    #[test]
    fn the_catch_up_exit_is_the_one_the_tick_emits() {
        let store = MemStore::new(Window::from_secs(600).unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ChangeEvent>::new()));
        let into = got.clone();
        let sink = crate::changes::EventSink::new(move |e| into.lock().unwrap().extend(e));
        let clock = std::sync::Arc::new(userseg_usecase::ManualClock::new(1_000_000));
        store.attach_event_sink(sink, clock.clone(), store.initial_exit_lo(1_000_000));
        let pair = Pair {
            user_id: "u".into(),
            segment: "s".into(),
            ts: 1_000_030,
        };
        store.apply_through(&[pair], None).unwrap();
        assert!(store.holds_live("u", "s", 1_000_100));
        assert!(!store.expired_at(1_000_030, 1_000_100));
        // Long after: the tick's exit and the catch-up's are the same event.
        let later = 1_000_030 + 700;
        assert!(store.expired_at(1_000_030, later));
        store.tick_changes(later).unwrap();
        let ticked: Vec<ChangeEvent> = got
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.reason == ChangeReason::Expired)
            .cloned()
            .collect();
        assert_eq!(ticked, vec![store.expired_event("u", "s", 1_000_030)]);
        assert!(!store.holds_live("u", "s", later));
    }
}
