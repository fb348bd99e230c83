//! ClickHouse stopped while ES consumes, then started again: ES pauses its writes (readiness says
//! so, nothing is dead-lettered) while its in-memory index keeps estimates current from the
//! topic; the backlog drains into ClickHouse, nothing is lost. In its own test binary
//! because it stops the shared ClickHouse server.

mod common;

use common::{seg, until, Api, Cluster};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{Pair, PushRequest};

async fn push(client: &mut SegmentsClient<tonic::transport::Channel>, from: u64, n: u64) -> u64 {
    let pairs: Vec<Pair> = (from..from + n)
        .map(|i| Pair {
            user_id: format!("o{i}"),
            segment: "outage".into(),
            ts: None,
        })
        .collect();
    client
        .push(PushRequest { pairs })
        .await
        .expect("USS does not depend on ClickHouse")
        .into_inner()
        .accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_pauses_es_and_the_backlog_drains() {
    let c = Cluster::new("outage");
    let port = c
        .clickhouse
        .rsplit(':')
        .next()
        .map(str::to_owned)
        .expect("a port in USERSEG_TEST_CLICKHOUSE_URL");
    c.migrate();
    let mut uss = c.spawn("uss", &[]);
    let mut es = c.spawn(
        "es",
        &[("BATCH_SIZE", "300"), ("CLICKHOUSE_REQUEST_TIMEOUT", "3s")],
    );
    uss.ready().await;
    es.ready().await;
    let mut client = SegmentsClient::connect(uss.base.clone()).await.unwrap();
    let mut sent = push(&mut client, 0, 1000).await;
    until("the first pairs are counted", 30, async || {
        es.counts().await == vec![seg("outage", 1000)]
    })
    .await;

    // Make sure ClickHouse comes back even if an assertion below fails.
    struct Restart(String);
    impl Drop for Restart {
        fn drop(&mut self) {
            common::clickhouse("start", Some(&self.0));
        }
    }
    common::clickhouse("stop", None);
    let guard = Restart(port.clone());
    for _ in 0..10 {
        sent += push(&mut client, sent, 500).await;
    }
    until(
        "the index counts the new pairs without ClickHouse",
        30,
        async || es.counts().await == vec![seg("outage", sent)],
    )
    .await;
    until("readiness reports the failing store", 60, async || {
        let (status, body) = es.readyz().await;
        status == 503
            && body["checks"]["processor"]
                .as_str()
                .is_some_and(|s| s.contains("writes to the store are failing"))
    })
    .await;
    // Lag grows, nothing is dead-lettered.
    assert_eq!(es.metric("userseg_dead_letters_total").await, 0.0);
    drop(guard); // starts ClickHouse again on the same port with the same data
    let sql = format!(
        "SELECT uniqExact(user_id) FROM `{}`.pairs FORMAT TabSeparated",
        c.database
    );
    let http = reqwest::Client::new();
    until("the backlog drains into ClickHouse", 120, async || {
        let Ok(r) = http.post(&c.clickhouse).body(sql.clone()).send().await else {
            return false;
        };
        let text = r.text().await.unwrap_or_default();
        text.trim().parse::<u64>().ok() == Some(sent)
    })
    .await;
    assert_eq!(es.counts().await, vec![seg("outage", sent)]);
    until("ES is ready again", 30, async || es.readyz().await.0 == 200).await;
    assert_eq!(es.metric("userseg_dead_letters_total").await, 0.0);
    assert_eq!(sent, 6000);
}
