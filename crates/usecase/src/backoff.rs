//! Exponential backoff between retries: the pause doubles after each failure, up to a cap, and
//! starts over after a success.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses of `initial`, `2 × initial`, … up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The pause to wait now (for a log line, before [`Backoff::pause`]).
    pub fn current(&self) -> Duration {
        self.next
    }

    /// The pause to wait now; the one after it is twice as long (at most the cap).
    pub fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        pause
    }

    /// After a success: the next pause is the first again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let pauses: Vec<_> = (0..5).map(|_| b.pause()).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(b.current(), ms(500));
        b.reset();
        assert_eq!(b.pause(), ms(100));
        assert_eq!(
            Backoff::new(ms(10), ms(1)).pause(),
            ms(10),
            "the cap is at least the start"
        );
    }
}
