//! The shared store suite against the real server, in exact mode and, through an adapter, in
//! approximate mode.

use std::sync::Arc;

use userseg_domain::Window;
use userseg_usecase::store_suite::SuiteStore;

use crate::common::fresh_store;

async fn make_store(window: Window) -> SuiteStore {
    let store = Arc::new(fresh_store(window).await);
    SuiteStore {
        writer: store.clone(),
        counter: store,
    }
}

userseg_usecase::store_test_suite!(make_store, seeds = 6, steps = 50);

/// The suite again with every count answered from the sketches. Its data sets are small
/// (under 60 users per segment), where uniqCombined holds exact sets of 32-bit hashes, and
/// approximate expiry is exact to the second, so approximate mode must pass it unchanged.
mod approx {
    use std::sync::Arc;

    use async_trait::async_trait;
    use userseg_clickhouse::ClickHouseStore;
    use userseg_domain::{UnixSeconds, Window};
    use userseg_usecase::store_suite::SuiteStore;
    use userseg_usecase::{Mode, PortError, SegmentCount, SegmentCounter};

    use crate::common::fresh_store;

    /// Answers every count in approximate mode, but claims exactness so the suite accepts it.
    struct ApproxAsExact(Arc<ClickHouseStore>);

    #[async_trait]
    impl SegmentCounter for ApproxAsExact {
        async fn count(
            &self,
            segment: &str,
            at: UnixSeconds,
            _mode: Mode,
        ) -> Result<(u64, bool), PortError> {
            let (n, exact) = self.0.count(segment, at, Mode::Approx).await?;
            assert!(!exact, "approx mode must say it is approximate");
            Ok((n, true))
        }

        async fn count_all(
            &self,
            at: UnixSeconds,
            _mode: Mode,
        ) -> Result<(Vec<SegmentCount>, bool), PortError> {
            let (list, exact) = self.0.count_all(at, Mode::Approx).await?;
            assert!(!exact, "approx mode must say it is approximate");
            Ok((list, true))
        }

        async fn check_ready(&self) -> Result<(), PortError> {
            self.0.check_ready().await
        }
    }

    async fn make_approx_store(window: Window) -> SuiteStore {
        let store = Arc::new(fresh_store(window).await);
        SuiteStore {
            writer: store.clone(),
            counter: Arc::new(ApproxAsExact(store)),
        }
    }

    userseg_usecase::store_test_suite!(make_approx_store, seeds = 3, steps = 50);
}
