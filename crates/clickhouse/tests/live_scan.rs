//! `LiveScan` against a real ClickHouse server (see `integration/main.rs` for how to start one;
//! without `USERSEG_TEST_CLICKHOUSE_URL` these tests fail, they are never skipped), plus a few
//! failure modes played by a fake HTTP server.
//!
//! The scan rate measurement: `cargo test -p userseg-clickhouse --release --test live_scan
//! scan_rate -- --ignored --nocapture` (`USERSEG_SCAN_ROWS`, default 5,000,000).

#[allow(dead_code)]
#[path = "integration/common.rs"]
mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use userseg_clickhouse::{ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Pair, UnixSeconds, Window};
use userseg_usecase::{LiveScan, PortError};

use common::{fresh_config, fresh_store, pair};

const DAY: i64 = 86_400;
const T0: i64 = 1_763_942_400;

fn sorted(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.sort_by(|a, b| (&a.segment, &a.user_id, a.ts).cmp(&(&b.segment, &b.user_id, b.ts)));
    pairs
}

/// What a scan delivered, and the size of each chunk.
struct Received {
    pairs: Vec<Pair>,
    chunk_sizes: Vec<usize>,
}

/// Runs a scan into a channel of `capacity`, the receiver pausing `pause` after each of the
/// first `slow_chunks` chunks.
async fn scan(
    store: &ClickHouseStore,
    at: UnixSeconds,
    chunk_pairs: usize,
    capacity: usize,
    pause: Duration,
    slow_chunks: usize,
) -> (Result<u64, PortError>, Received) {
    let (tx, mut rx) = mpsc::channel::<Vec<Pair>>(capacity);
    let receive = async move {
        let mut got = Received {
            pairs: Vec::new(),
            chunk_sizes: Vec::new(),
        };
        while let Some(chunk) = rx.recv().await {
            got.chunk_sizes.push(chunk.len());
            got.pairs.extend(chunk);
            if got.chunk_sizes.len() <= slow_chunks {
                tokio::time::sleep(pause).await;
            }
        }
        got
    };
    tokio::join!(store.scan_live(at, chunk_pairs, tx), receive)
}

#[tokio::test]
async fn live_pairs_are_all_sent_and_expired_ones_are_not() {
    let window = Window::from_secs(3 * DAY as u64).unwrap();
    let store = fresh_store(window).await;
    let at = T0 + 12 * 3600;
    let bound = at - 3 * DAY;
    let long_user = "é".repeat(128);
    // No two rows share (segment, user_id, day): background merges of the ReplacingMergeTree
    // would collapse them, and this test compares exact multisets.
    let live = vec![
        pair("u1", "s1", bound + 1), // the oldest live second
        pair("u1", "s1", at),        // the same membership on another day
        pair("u2", "s1", at - 10),
        pair("u1", "s2", at + 200), // ahead of `at`: still live
        pair("用户", "s2", bound + DAY),
        pair(&long_user, &"x".repeat(128), bound + 2 * DAY),
        pair("u3", "a.b:c_d-e", bound + 3600),
    ];
    let expired = vec![
        pair("u4", "s1", bound), // at the bound: expired
        pair("u1", "s1", bound - 1),
        pair("u5", "s3", bound - 20 * DAY),
        pair("u2", "s2", 0),
    ];
    let mut all = live.clone();
    all.extend(expired.clone());
    store.insert_pairs(&all).await.expect("insert");

    for chunk_pairs in [1, 2, 3, 100] {
        let (r, got) = scan(&store, at, chunk_pairs, 2, Duration::ZERO, 0).await;
        assert_eq!(r, Ok(live.len() as u64), "chunk_pairs {chunk_pairs}");
        assert_eq!(sorted(got.pairs), sorted(live.clone()));
        assert!(
            got.chunk_sizes.iter().all(|&n| 0 < n && n <= chunk_pairs),
            "chunk_pairs {chunk_pairs}: {:?}",
            got.chunk_sizes
        );
    }
    // chunk_pairs 0 is taken as 1.
    let (r, got) = scan(&store, at, 0, 1, Duration::ZERO, 0).await;
    assert_eq!(r, Ok(live.len() as u64));
    assert!(got.chunk_sizes.iter().all(|&n| n == 1));

    // A bound before 1970: everything stored, ts 0 included.
    let (r, got) = scan(&store, 3 * DAY - 1, 4, 2, Duration::ZERO, 0).await;
    assert_eq!(r, Ok(all.len() as u64));
    assert_eq!(sorted(got.pairs), sorted(all.clone()));
    // A bound past DateTime's range: nothing, without asking.
    let (r, got) = scan(&store, i64::MAX, 4, 2, Duration::ZERO, 0).await;
    assert_eq!(r, Ok(0));
    assert!(got.pairs.is_empty() && got.chunk_sizes.is_empty());
    // Later, only what is still live.
    let (r, got) = scan(&store, at + DAY, 4, 2, Duration::ZERO, 0).await;
    let still: Vec<Pair> = live
        .iter()
        .filter(|p| p.ts > bound + DAY)
        .cloned()
        .collect();
    assert_eq!(r, Ok(still.len() as u64));
    assert_eq!(sorted(got.pairs), sorted(still));
}

#[tokio::test]
async fn an_empty_table_sends_nothing() {
    let store = fresh_store(Window::DEFAULT).await;
    let (r, got) = scan(&store, T0, 10, 1, Duration::ZERO, 0).await;
    assert_eq!(r, Ok(0));
    assert!(got.chunk_sizes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_scan_streams_through_a_slow_receiver() {
    const ROWS: usize = 300_000;
    let window = Window::from_secs(10 * DAY as u64).unwrap();
    let store = fresh_store(window).await;
    let at = T0;
    // Unique (segment, user_id) keys, ts spread over the window and a little before it.
    let pairs: Vec<Pair> = (0..ROWS)
        .map(|i| {
            pair(
                &format!("user-{i:07}-{}", "x".repeat(i % 40)),
                &format!("segment-{}", i % 97),
                at - (i as i64 * 7919) % (11 * DAY),
            )
        })
        .collect();
    for batch in pairs.chunks(100_000) {
        store.insert_pairs(batch).await.expect("insert");
    }
    let live: Vec<Pair> = pairs.into_iter().filter(|p| p.ts > at - 10 * DAY).collect();
    assert!(live.len() > ROWS * 8 / 10);

    // The same database through a store whose request timeout is far shorter than the scan:
    // only silence from the server may time it out, not a long scan nor a slow receiver.
    let config = ClickHouseConfig {
        request_timeout: Duration::from_millis(800),
        ..fresh_config().with_database(store.database())
    };
    let short = ClickHouseStore::new(config, window).expect("store");
    let started = Instant::now();
    // Capacity 1, 1000 pairs a chunk, and a receiver that stalls 1.5 s on its first chunk and
    // 2 ms on each of the next: the scan must wait for it, chunk by chunk.
    let (r, got) = {
        let (tx, mut rx) = mpsc::channel::<Vec<Pair>>(1);
        let receive = async move {
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            while let Some(chunk) = rx.recv().await {
                sizes.push(chunk.len());
                got.extend(chunk);
                let pause = if sizes.len() == 1 { 1500 } else { 2 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            (got, sizes)
        };
        tokio::join!(short.scan_live(at, 1000, tx), receive)
    };
    let elapsed = started.elapsed();
    let (got, sizes) = got;
    assert_eq!(r, Ok(live.len() as u64));
    assert!(sizes.iter().all(|&n| n <= 1000), "a chunk is too big");
    assert_eq!(
        sizes.len(),
        live.len().div_ceil(1000),
        "only the last chunk is short"
    );
    let stalled = Duration::from_millis(1500 + 2 * (sizes.len() as u64 - 1));
    assert!(
        elapsed >= stalled,
        "the scan took {elapsed:?}, less than the receiver stalled ({stalled:?})"
    );
    assert_eq!(sorted(got), sorted(live));
}

#[tokio::test]
async fn a_dropped_receiver_stops_the_scan() {
    let store = fresh_store(Window::DEFAULT).await;
    let pairs: Vec<Pair> = (0..20_000)
        .map(|i| pair(&format!("user-{i}"), "s", T0 - i))
        .collect();
    store.insert_pairs(&pairs).await.expect("insert");
    let (tx, mut rx) = mpsc::channel(1);
    let receive = async move {
        let first: Vec<Pair> = rx.recv().await.expect("a first chunk");
        drop(rx);
        first.len()
    };
    let (r, first) = tokio::join!(store.scan_live(T0, 100, tx), receive);
    assert_eq!(first, 100);
    assert_eq!(r, Err(PortError::Transient("index closed".into())));
}

/// Creates `{db}.pairs` as a view over `select` (no migrations): ClickHouse then streams
/// whatever that query yields, or fails the way it fails.
async fn store_over_view(select: &str) -> ClickHouseStore {
    let config = fresh_config();
    let db = config.database.clone();
    let store = ClickHouseStore::new(config, Window::from_secs(DAY as u64).unwrap()).unwrap();
    let client = store.client();
    client
        .execute(&format!("CREATE DATABASE `{db}`"))
        .await
        .expect("create database");
    client
        .execute(&format!("CREATE VIEW `{db}`.pairs AS {select}"))
        .await
        .expect("create view");
    store
}

#[tokio::test]
async fn an_exception_in_the_middle_of_the_body_is_an_error() {
    // 1.5 million rows, the query failing at row 1,000,000: long after ClickHouse has sent
    // `200 OK` and the first rows.
    let store = store_over_view(
        "SELECT toString(number % 7) AS segment, concat('u', toString(number)) AS user_id, \
         toDateTime(1700000000 + throwIf(number = 1000000), 'UTC') AS ts \
         FROM system.numbers LIMIT 1500000",
    )
    .await;
    let (r, got) = scan(&store, 1_700_000_000, 10_000, 4, Duration::ZERO, 0).await;
    let m = match r {
        Err(PortError::Transient(m)) => m,
        other => panic!("expected a transient error, got {other:?}"),
    };
    assert!(m.contains("Code: 395") && m.contains("throwIf"), "{m}");
    assert!(m.contains("the query failed after"), "{m}");
    assert!(
        !got.pairs.is_empty() && got.pairs.len() < 1_000_000,
        "{} pairs",
        got.pairs.len()
    );
}

#[tokio::test]
async fn rows_that_are_not_valid_pairs_are_permanent() {
    let store = store_over_view(
        "SELECT if(number = 150000, 'not a segment', toString(number % 7)) AS segment, \
         concat('u', toString(number)) AS user_id, toDateTime(1700000000, 'UTC') AS ts \
         FROM system.numbers LIMIT 200000",
    )
    .await;
    let (r, got) = scan(&store, 1_700_000_000, 10_000, 4, Duration::ZERO, 0).await;
    let m = match r {
        Err(PortError::Permanent(m)) => m,
        other => panic!("expected a permanent error, got {other:?}"),
    };
    assert!(
        m.contains("at row 150000") && m.contains("invalid segment \"not a segment\""),
        "{m}"
    );
    assert!(got.pairs.len() <= 150_000);
}

/// A fake ClickHouse that answers every request with `head` then `body`, then closes the
/// connection, or keeps it open without another byte when `hang`.
async fn fake_server(head: String, body: Vec<u8>, hang: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            // Read the request: headers, then a Content-Length body.
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            let header_end = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                req.extend_from_slice(&buf[..n]);
                if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(header_end) = header_end else {
                continue;
            };
            let text = String::from_utf8_lossy(&req[..header_end]).to_ascii_lowercase();
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while req.len() < header_end + len {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body).await;
            let _ = socket.flush().await;
            if hang {
                held.push(socket);
            }
        }
    });
    format!("http://{addr}")
}

fn encoded(rows: &[(&str, &str, u32)]) -> Vec<u8> {
    fn put(buf: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 128);
        buf.push(s.len() as u8);
        buf.extend_from_slice(s.as_bytes());
    }
    let mut buf = Vec::new();
    for (segment, user, ts) in rows {
        put(&mut buf, segment);
        put(&mut buf, user);
        buf.extend_from_slice(&ts.to_le_bytes());
    }
    buf
}

async fn fake_store(head: String, body: Vec<u8>, hang: bool) -> ClickHouseStore {
    let config = ClickHouseConfig {
        addr: fake_server(head, body, hang).await,
        request_timeout: Duration::from_millis(500),
        ..ClickHouseConfig::default()
    };
    ClickHouseStore::new(config, Window::from_secs(DAY as u64).unwrap()).unwrap()
}

const AT: i64 = 1_700_000_000 + DAY;

#[tokio::test]
async fn a_body_that_ends_inside_a_row_is_permanent() {
    let mut body = encoded(&[("s", "u1", 1_700_000_001), ("s", "u2", 1_700_000_002)]);
    body.truncate(body.len() - 2);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let store = fake_store(head, body, false).await;
    let (r, got) = scan(&store, AT, 10, 1, Duration::ZERO, 0).await;
    match r {
        Err(PortError::Permanent(m)) => {
            assert!(
                m.contains("ends inside a row") && m.contains("row 1"),
                "{m}"
            )
        }
        other => panic!("expected a permanent error, got {other:?}"),
    }
    // Nothing was sent: the complete first row was still in the unsent chunk.
    assert!(got.pairs.is_empty());
}

#[tokio::test]
async fn a_connection_cut_mid_body_is_transient() {
    let body = encoded(&[("s", "u1", 1_700_000_001), ("s", "u2", 1_700_000_002)]);
    // Promises more than it sends, then closes.
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len() + 100
    );
    let store = fake_store(head, body, false).await;
    let (r, _) = scan(&store, AT, 10, 1, Duration::ZERO, 0).await;
    assert!(matches!(r, Err(PortError::Transient(_))), "{r:?}");
}

#[tokio::test]
async fn a_server_that_stops_sending_is_transient() {
    let body = encoded(&[("s", "u1", 1_700_000_001)]);
    let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
    let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n");
    let store = fake_store(head, chunked, true).await;
    let started = Instant::now();
    let (r, got) = scan(&store, AT, 1, 1, Duration::ZERO, 0).await;
    match r {
        Err(PortError::Transient(m)) => assert!(m.contains("timed out"), "{m}"),
        other => panic!("expected a transient error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(got.pairs.len(), 1, "the row before the silence was sent");
}

#[tokio::test]
async fn an_error_status_is_reported() {
    let text = "Code: 60, e.displayText() = DB::Exception: Table x.pairs doesn't exist., e.what() = DB::Exception\n";
    let head = format!(
        "HTTP/1.1 404 Not Found\r\nX-ClickHouse-Exception-Code: 60\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let store = fake_store(head, text.as_bytes().to_vec(), false).await;
    let (r, _) = scan(&store, AT, 10, 1, Duration::ZERO, 0).await;
    match r {
        Err(PortError::Transient(m)) => assert!(m.contains("code 60"), "{m}"),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

/// Not a check: measures the scan rate over `USERSEG_SCAN_ROWS` rows (default 5,000,000), and
/// the rate of merely reading the same body, to show what decoding costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly, in release mode"]
async fn scan_rate() {
    let rows: u64 = std::env::var("USERSEG_SCAN_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let store = fresh_store(Window::DEFAULT).await;
    let db = store.database().to_string();
    let t = Instant::now();
    store
        .client()
        .execute(&format!(
            "INSERT INTO `{db}`.pairs SELECT concat('seg-', toString(intHash32(number) % 500)), \
             concat('user-', toString(intHash64(number) % 10000000)), \
             toDateTime(now() - (number % 1000000)) FROM numbers({rows})"
        ))
        .await
        .expect("insert");
    println!(
        "scan_rate: inserted {rows} rows in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let now = userseg_testkit::now();

    for round in 0..3 {
        // The raw body alone.
        let t = Instant::now();
        let mut body = store
            .client()
            .query_stream(&format!(
                "SELECT segment, user_id, ts FROM `{db}`.pairs FORMAT RowBinary"
            ))
            .await
            .expect("query");
        let mut chunks = 0u64;
        while body.next_chunk().await.expect("chunk").is_some() {
            chunks += 1;
        }
        let raw = t.elapsed();
        // The scan, into a receiver that only counts.
        let t = Instant::now();
        let (tx, mut rx) = mpsc::channel::<Vec<Pair>>(16);
        let count = async move {
            let mut n = 0u64;
            while let Some(c) = rx.recv().await {
                n += c.len() as u64;
            }
            n
        };
        let (r, received) = tokio::join!(store.scan_live(now + 60, 8192, tx), count);
        let scanned = t.elapsed();
        let sent = r.expect("scan");
        assert_eq!(sent, received);
        println!(
            "scan_rate round {round}: body {} MB in {chunks} chunks read in {:.2} s ({:.0} MB/s); \
             scan of {sent} pairs in {:.2} s: {:.2} M pairs/s",
            body.bytes_read() / 1_000_000,
            raw.as_secs_f64(),
            body.bytes_read() as f64 / 1e6 / raw.as_secs_f64(),
            scanned.as_secs_f64(),
            sent as f64 / 1e6 / scanned.as_secs_f64(),
        );
    }
    store
        .client()
        .execute(&format!("DROP DATABASE `{db}`"))
        .await
        .expect("drop the database");
}
