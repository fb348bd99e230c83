//! The shared analytics and history suites against the real server.

use std::sync::Arc;
use std::time::Duration;

use userseg_domain::Window;
use userseg_usecase::analytics_suite::SuiteAnalytics;
use userseg_usecase::HistoryStore;

use crate::common::fresh_store;

async fn make_analytics(window: Window) -> SuiteAnalytics {
    let store = Arc::new(
        fresh_store(window)
            .await
            .with_mutation_timeout(Duration::from_secs(60)),
    );
    SuiteAnalytics {
        writer: store.clone(),
        analytics: store,
    }
}

userseg_usecase::analytics_test_suite!(make_analytics, seeds = 4, steps = 30);

async fn make_history() -> Arc<dyn HistoryStore> {
    Arc::new(fresh_store(Window::DEFAULT).await)
}

userseg_usecase::history_test_suite!(make_history);
