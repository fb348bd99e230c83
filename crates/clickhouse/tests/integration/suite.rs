//! The shared store suite, against the real server.

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
