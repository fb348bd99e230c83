//! Soak with kills, distributed: USS → Kafka (tansu) → ES → ClickHouse, the real binaries,
//! under a paced load through USS at ~70% of the capacity measured on the same cluster just
//! before (`userseg load` unpaced, pairs accepted over the time until ES's index counted them
//! all). During `SOAK_SECS` seconds ES is SIGKILLed every `SOAK_KILL_EVERY` seconds and
//! restarted, USS is SIGKILLed and restarted once, ClickHouse is stopped and started once. At
//! the end `userseg load --verify` (reading ES's index) finds every segment's count equal to the
//! generator's exact count, ClickHouse's own counts (a direct `uniqExact` query) equal the
//! index's, a lag probe's segment counts every acknowledged probe, the DLQ topic is empty, and
//! the RSS of ES and of USS at the end is within 20% of its value after warm-up (medians of
//! one-a-second samples, as the standalone soak in crates/userseg/tests/soak.rs does). It prints
//! the figures: pairs, kills, restart times, acked → visible lag, RSS curves.
//!
//! A killed ES is restarted only once its consumer-group session (`KAFKA_SESSION_TIMEOUT`, 6 s
//! here) has expired: tansu 0.6 drops a dead member only when a join arrives after its session
//! expired (see `es_killed_mid_stream_loses_and_doubles_nothing` in distributed.rs).
//!
//! In its own test binary because it restarts the shared ClickHouse (USERSEG_TEST_CLICKHOUSE_DIR)
//! and wants the machine to itself. `make test` runs the short form (36 s, a kill every 12 s, the
//! debug binary); `make soak` the long one (scripts/soak.sh: 10 minutes, a kill a minute, the
//! release binary through `SOAK_BIN`).

mod common;
mod soak_common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, servers, until, Api, Cluster, Proc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use soak_common::{
    assert_exact, bin, curve_text, env_secs, load, max, median, print_lags, print_load, probe,
    probe_count, rss_mib, summary, Lags,
};
use userseg_testkit::metrics::metric;

/// ES's consumer-group session: a killed ES is restarted this long (plus a second) after the
/// kill.
const SESSION_SECS: u64 = 6;

/// `userseg <role>` (the binary under test) on `port` with the cluster's settings.
fn spawn(c: &Cluster, role: &str, port: u16) -> Proc {
    let mut env: Vec<(String, String)> = [
        ("KAFKA_BROKER_URL", c.kafka.as_str()),
        ("KAFKA_TOPIC", &c.topic),
        ("KAFKA_DLQ_TOPIC", &c.dlq),
        ("KAFKA_GROUP_ID", &c.group),
        ("KAFKA_PARTITIONS", "6"),
        ("CLICKHOUSE_ADDR", &c.clickhouse),
        ("CLICKHOUSE_DATABASE", &c.database),
        ("ESTIMATE_CACHE_TTL", "0s"),
        // ES's default (30 s) would leave the last partial batch out of ClickHouse that long.
        ("FLUSH_INTERVAL", "1s"),
        ("RETRY_BACKOFF_MAX", "1s"),
        ("CLICKHOUSE_REQUEST_TIMEOUT", "5s"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.push(("KAFKA_SESSION_TIMEOUT".into(), format!("{SESSION_SECS}s")));
    Proc::spawn(
        bin(),
        &[role],
        &env,
        port,
        c.logs.join(format!("{role}-{port}.log")),
    )
}

/// SIGKILLs the shared test ClickHouse (the pid `scripts/clickhouse.sh start` recorded) and
/// waits until it is gone (where nobody reaps it, a zombie). (`clickhouse.sh stop`, SIGTERM, can take 30 s while ES's requests are
/// in flight.)
fn clickhouse_sigkill(port: u16) {
    let dir = servers::required(
        "USERSEG_TEST_CLICKHOUSE_DIR",
        "the directory of `scripts/clickhouse.sh start DIR`",
    );
    let pid = std::fs::read_to_string(format!("{dir}/clickhouse.pid"))
        .expect("clickhouse.pid")
        .trim()
        .to_string();
    let ok = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill -KILL {pid}");
    let deadline = Instant::now() + Duration::from_secs(30);
    // Gone, or a zombie nobody reaped yet (it holds no port any more).
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    }) {
        assert!(
            Instant::now() < deadline,
            "ClickHouse {pid} survived SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A zombie still answers `kill -0`, which `clickhouse.sh start` takes for a running server:
    // the recorded pid is dead either way.
    std::fs::remove_file(format!("{dir}/clickhouse.pid")).expect("remove clickhouse.pid");
    // The leader thread turns zombie while other threads still exit holding the sockets.
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "ClickHouse's port {port} stays taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Messages in `topic`: the sum of its partitions' end offsets (0 when it does not exist).
fn messages_in(kafka: &str, topic: &str) -> i64 {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .expect("kafka client");
    let timeout = Duration::from_secs(10);
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .expect("topic metadata");
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| {
            client
                .fetch_watermarks(topic, p.id(), timeout)
                .expect("watermarks")
                .1
        })
        .sum()
}

/// Every segment's exact count straight from ClickHouse's raw pairs (every pair of this test is
/// stamped now, so none has expired), sorted; None while ClickHouse does not answer.
async fn clickhouse_counts(http: &reqwest::Client, c: &Cluster) -> Option<Vec<(String, u64)>> {
    let sql = format!(
        "SELECT segment, uniqExact(user_id) FROM `{}`.pairs GROUP BY segment ORDER BY segment FORMAT TabSeparated",
        c.database
    );
    let r = http.post(&c.clickhouse).body(sql).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let text = r.text().await.ok()?;
    text.lines()
        .map(|l| {
            let (s, n) = l.split_once('\t')?;
            Some((s.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

async fn sorted_counts(p: &Proc) -> Vec<(String, u64)> {
    let mut v = p.counts().await;
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_soak_with_kills_and_restarts_loses_nothing_and_keeps_rss_flat() {
    // The short form: 60 s, a kill every 20 s, so each ES process lives long enough for its RSS
    // median to be more than a couple of samples.
    let secs = env_secs("SOAK_SECS", 60);
    let kill_every = env_secs("SOAK_KILL_EVERY", 20);
    // 0: no capacity measurement, the load runs at SOAK_RATE pairs/s (the short form: measuring
    // until ClickHouse holds everything takes too long on a busy machine).
    let capacity_secs = env_secs("SOAK_CAPACITY_SECS", 0);
    let fixed_rate = env_secs("SOAK_RATE", 5000);
    assert!(
        kill_every >= SESSION_SECS + 4 && secs >= 3 * kill_every,
        "SOAK_KILL_EVERY must be at least {} s and SOAK_SECS at least 3 × SOAK_KILL_EVERY",
        SESSION_SECS + 4
    );
    let c = Cluster::new("soakd");
    let ch_port = c
        .clickhouse
        .rsplit(':')
        .next()
        .map(str::to_owned)
        .expect("a port in USERSEG_TEST_CLICKHOUSE_URL");
    // Make sure ClickHouse runs again even if an assertion fails while it is stopped.
    struct Restart(String, bool);
    impl Drop for Restart {
        fn drop(&mut self) {
            if self.1 {
                common::clickhouse("start", Some(&self.0));
            }
        }
    }
    let mut ch_guard = Restart(ch_port.clone(), false);
    c.migrate();
    println!("soakd: binary {}", bin().display());
    let (uss_port, es_port) = (free_port(), free_port());
    let mut uss = spawn(&c, "uss", uss_port);
    uss.ready().await; // creates the topic
    let mut es = Some(spawn(&c, "es", es_port));
    es.as_mut().unwrap().ready().await;
    let (uss_base, es_base) = (uss.base.clone(), format!("http://127.0.0.1:{es_port}"));

    // Capacity: ES's write rate into ClickHouse while `userseg load` pushes unpaced through USS,
    // so USS, the generator and the broker take their share of the cores as they do in the
    // soak (a burst absorbed afterwards, with them idle, overstates it by half or more). Then
    // wait until ES's index and ClickHouse count every pair, so the soak starts without backlog.
    let http = reqwest::Client::new();
    let capacity = if capacity_secs > 0 {
        let t0 = Instant::now();
        let gen = load(
            &uss_base,
            &[
                "--duration",
                &format!("{capacity_secs}s"),
                "--segment-prefix",
                "cap-",
                "--verify",
                "--verify-target",
                &es_base,
                // Unpaced, USS accepts far more than ES writes: wait for ES to catch up.
                "--verify-timeout",
                "600s",
                "--verify-settle",
                "60s",
            ],
        );
        // Samples of (time, pairs written) once a second while the generator sends; the
        // first two seconds (ES's first batches, the generator's start) are left out.
        let mut samples: Vec<(Instant, f64)> = Vec::new();
        while t0.elapsed() < Duration::from_secs(capacity_secs) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if t0.elapsed() >= Duration::from_secs(2)
                && t0.elapsed() < Duration::from_secs(capacity_secs)
            {
                if let Some(w) = metric(&es_base, "userseg_processor_pairs_written_total").await {
                    samples.push((Instant::now(), w));
                }
            }
        }
        let (first, last) = (samples.first().copied(), samples.last().copied());
        let (ok, s) = summary(gen).await;
        assert_exact(ok, &s);
        let index = sorted_counts(es.as_ref().expect("ES")).await;
        until("ClickHouse holds the capacity run", 600, async || {
            clickhouse_counts(&http, &c).await.as_ref() == Some(&index)
        })
        .await;
        let ((ta, wa), (tb, wb)) = first.zip(last).expect("ES's metrics while the load ran");
        let es_rate = (wb - wa) / tb.duration_since(ta).as_secs_f64();
        let accepted = s["pairs_accepted"].as_f64().expect("pairs_accepted");
        println!(
            "soakd: capacity run: USS accepted {accepted:.0} pairs in {capacity_secs} s; \
             ES wrote {es_rate:.0} pairs/s into ClickHouse meanwhile; all of them in the index and \
             ClickHouse after {:.1} s ({:.0} pairs/s as a burst)",
            t0.elapsed().as_secs_f64(),
            accepted / t0.elapsed().as_secs_f64()
        );
        Some(es_rate)
    } else {
        None
    };
    // The share of the capacity to soak at, in percent (SOAK_LOAD_PERCENT, default 70).
    let percent = env_secs("SOAK_LOAD_PERCENT", 70);
    assert!(
        (1..=100).contains(&percent),
        "SOAK_LOAD_PERCENT must be 1 to 100"
    );
    let rate = capacity.map_or(fixed_rate as f64, |c| (c * percent as f64 / 100.0).round());
    match capacity {
        Some(c) => println!(
            "soakd: capacity {c:.0} pairs/s (ES's write rate under unpaced load); {percent}% of it"
        ),
        None => {
            println!("soakd: capacity not measured (SOAK_CAPACITY_SECS=0): the fixed SOAK_RATE")
        }
    }
    let planned_kills = secs / kill_every - 1;
    let (uss_at, ch_at) = (kill_every / 2, kill_every * 3 / 4);
    println!(
        "soakd: soaking at {rate:.0} pairs/s for {secs} s: \
         SIGKILL of ES every {kill_every} s ({planned_kills}×, restarted {} s after the kill), of USS once at {uss_at} s, \
         ClickHouse SIGKILLed and restarted once at {ch_at} s",
        SESSION_SECS + 1
    );

    let started = Instant::now();
    let mut gen = load(
        &uss_base,
        &[
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
            "--segment-prefix",
            "soak-",
            "--verify",
            "--verify-target",
            &es_base,
            "--verify-timeout",
            "120s",
            // A restart can hold the counts still for a while: no early give-up.
            "--verify-settle",
            "60s",
        ],
    );
    // Every disruption (ES kill, USS kill, ClickHouse restart): probes spanning one are apart.
    let disruptions = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let lags = Arc::new(Mutex::new(Lags::default()));
    let prober = tokio::spawn(probe(
        uss_base.clone(),
        es_base.clone(),
        disruptions.clone(),
        stop.clone(),
        lags.clone(),
    ));

    // (second, RSS MiB, process generation)
    let mut es_curve: Vec<(u64, f64, u64)> = Vec::new();
    let mut uss_curve: Vec<(u64, f64, u64)> = Vec::new();
    let (mut es_gen, mut es_born) = (0u64, 0u64);
    let mut es_warm: Option<(u64, u64, u64)> = None;
    let mut es_killed: Option<Instant> = None;
    let mut es_restarts: Vec<f64> = Vec::new();
    let (mut uss_gen, mut uss_born, mut uss_restart) = (0u64, 0u64, 0.0f64);
    let mut ch_restart: Option<f64> = None;
    let mut ch_thread: Option<std::thread::JoinHandle<f64>> = None;
    let mut next_kill = kill_every;
    let status = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = started.elapsed().as_secs();
        if let Some(r) = es.as_ref().and_then(|p| rss_mib(p.child.id())) {
            es_curve.push((t, r, es_gen));
        }
        if let Some(r) = rss_mib(uss.child.id()) {
            uss_curve.push((t, r, uss_gen));
        }
        if let Some(status) = gen.try_wait().expect("userseg load") {
            break status;
        }
        if uss_gen == 0 && t >= uss_at {
            disruptions.fetch_add(1, Ordering::SeqCst);
            uss.sigkill();
            let killed = Instant::now();
            uss = spawn(&c, "uss", uss_port);
            uss.ready().await;
            uss_restart = killed.elapsed().as_secs_f64();
            uss_gen = 1;
            uss_born = started.elapsed().as_secs();
            println!("soakd: t={t}s SIGKILL USS; ready again after {uss_restart:.2} s");
        }
        // A kill leaves the restarted ES a second or two before the load ends, and every ES a
        // few seconds of life.
        if es.is_some()
            && t >= next_kill
            && next_kill + kill_every <= secs
            && t + SESSION_SECS + 2 <= secs
            && t >= es_born + 2
        {
            // Warm-up: the second half of the first restarted ES's life.
            if es_gen == 1 {
                es_warm = Some((es_gen, (es_born + t) / 2, t));
            }
            disruptions.fetch_add(1, Ordering::SeqCst);
            es.take().expect("ES").sigkill();
            es_killed = Some(Instant::now());
            println!("soakd: t={t}s SIGKILL ES");
            next_kill += kill_every;
        }
        if let Some(killed) = es_killed {
            if killed.elapsed() >= Duration::from_secs(SESSION_SECS + 1) {
                let mut p = spawn(&c, "es", es_port);
                p.ready().await;
                es = Some(p);
                // A probe acknowledged while ES was down spans this too.
                disruptions.fetch_add(1, Ordering::SeqCst);
                es_gen += 1;
                es_born = started.elapsed().as_secs();
                let took = killed.elapsed().as_secs_f64();
                es_restarts.push(took);
                es_killed = None;
                println!(
                    "soakd: t={es_born}s ES restarted; ready {took:.2} s after the kill ({} s of it waiting out the session)",
                    SESSION_SECS + 1
                );
            }
        }
        // ClickHouse's restart runs beside the loop, which keeps sampling and killing on time.
        if ch_restart.is_none() && ch_thread.is_none() && t >= ch_at {
            disruptions.fetch_add(1, Ordering::SeqCst);
            ch_guard.1 = true;
            let port = ch_port.clone();
            println!("soakd: t={t}s SIGKILL ClickHouse");
            ch_thread = Some(std::thread::spawn(move || {
                let t0 = Instant::now();
                clickhouse_sigkill(port.parse().expect("port"));
                common::clickhouse("start", Some(&port));
                t0.elapsed().as_secs_f64()
            }));
        }
        if ch_thread.as_ref().is_some_and(|h| h.is_finished()) {
            let took = ch_thread
                .take()
                .expect("thread")
                .join()
                .expect("ClickHouse restart");
            ch_guard.1 = false;
            disruptions.fetch_add(1, Ordering::SeqCst);
            ch_restart = Some(took);
            println!("soakd: t={t}s ClickHouse answers again, {took:.2} s after its SIGKILL");
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs + 300),
            "the load did not finish within 300 s of its duration"
        );
    };
    let end_t = started.elapsed().as_secs();
    let es_end = median(&es_curve, es_gen, (es_born + end_t) / 2, end_t);
    let uss_end = median(&uss_curve, 1, (uss_born + end_t) / 2, end_t);
    stop.store(true, Ordering::Relaxed);
    prober.await.unwrap();
    let (_, s) = summary(gen).await;
    let es = es.expect("ES runs at the end");

    // Figures.
    let l = std::mem::take(&mut *lags.lock().unwrap());
    print_load("soakd", &s);
    println!(
        "soakd: ES kills {} (restart after the kill to ready max {:.2} s), USS kills 1 (ready after {uss_restart:.2} s), ClickHouse restarts {} ({:.2} s)",
        es_gen,
        max(&es_restarts),
        u8::from(ch_restart.is_some()),
        ch_restart.unwrap_or(0.0)
    );
    print_lags("soakd", &l);
    println!("soakd: ES RSS MiB curve {}", curve_text(&es_curve));
    println!("soakd: USS RSS MiB curve {}", curve_text(&uss_curve));
    let (g, from, to) = es_warm.expect("ES killed twice");
    let es_warm = median(&es_curve, g, from, to);
    let uss_warm = median(
        &uss_curve,
        1,
        uss_born + kill_every / 2,
        uss_born + kill_every,
    );
    println!(
        "soakd: ES RSS (median over the second half of a process's life) after warm-up {es_warm:.1} MiB, at the end {es_end:.1} MiB ({:+.1}%)",
        (es_end / es_warm - 1.0) * 100.0
    );
    println!(
        "soakd: USS RSS (median) after warm-up {uss_warm:.1} MiB, at the end {uss_end:.1} MiB ({:+.1}%)",
        (uss_end / uss_warm - 1.0) * 100.0
    );

    // Verdicts.
    assert_exact(status.success(), &s);
    assert!(es_gen >= 2, "ES killed {es_gen} times");
    assert!(ch_restart.is_some(), "ClickHouse was not restarted");
    assert_eq!(
        probe_count(&http, &es_base).await,
        Some(l.acked),
        "every acknowledged probe counted once"
    );
    let index = sorted_counts(&es).await;
    let t0 = Instant::now();
    until(
        "ClickHouse's own counts equal the index's",
        120,
        async || clickhouse_counts(&http, &c).await.as_ref() == Some(&index),
    )
    .await;
    println!(
        "soakd: ClickHouse's own counts equal the index's ({} segments) {:.2} s after the verify",
        index.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        messages_in(&c.kafka, &c.dlq),
        0,
        "nothing was dead-lettered"
    );
    assert!(
        (es_end - es_warm).abs() <= 0.2 * es_warm,
        "ES RSS at the end ({es_end:.1} MiB) is not within 20% of its value after warm-up ({es_warm:.1} MiB)"
    );
    assert!(
        (uss_end - uss_warm).abs() <= 0.2 * uss_warm,
        "USS RSS at the end ({uss_end:.1} MiB) is not within 20% of its value after warm-up ({uss_warm:.1} MiB)"
    );
}
