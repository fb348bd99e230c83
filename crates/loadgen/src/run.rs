//! The run: workers generating and sending, retrying on overload, then the optional
//! verification.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use userseg_usecase::{Backoff, Clock, SystemClock};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use userseg_proto::v1::segments_client::SegmentsClient;

use crate::args::{HttpBody, LoadArgs, Protocol};
use crate::client::{Body, Lister, Listing, Pusher, SendError, Sent, Target};
use crate::encode::Names;
use crate::model::{bucket_secs, compare, Model, Tolerance};
use crate::pace::{Gate, Pacer};
use crate::summary::{FillReport, Latency, Summary, VerifyReport};
use crate::workload::{skew_for, GenPair, Workload};
use crate::LoadError;

/// A batch failing with retryable errors for this long stops the run.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// --verify: poll interval.
const POLL_EVERY: Duration = Duration::from_millis(200);

fn unix_now() -> i64 {
    SystemClock.now()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The seed of worker `id`'s generator.
pub(crate) fn worker_seed(seed: u64, id: usize) -> u64 {
    splitmix(seed ^ splitmix(id as u64 + 1))
}

/// How many pairs worker `id` of `n` sends out of `total`.
pub(crate) fn quota(total: u64, n: usize, id: usize) -> u64 {
    let n = n as u128;
    let id = id as u128;
    let t = u128::from(total);
    (t * (id + 1) / n - t * id / n) as u64
}

/// The margin kept between the oldest ts sent and the server's expiry, so that pairs stay valid
/// while in flight (and through a few retries).
pub(crate) fn ts_margin(window: u64) -> u64 {
    (window / 100).clamp(2, 300)
}

struct Ctx {
    target: Target,
    workload: Workload,
    names: Names,
    protocol: Protocol,
    http_body: HttpBody,
    batch: usize,
    unit_batches: usize,
    /// Oldest allowed event age in seconds (0: pairs carry no ts).
    max_age: i64,
    seed: u64,
    deadline: Option<Instant>,
    /// `--rate`: the schedule shared by all workers.
    pacer: Option<Arc<Pacer>>,
    stop: AtomicBool,
    /// The same as `stop`, for waits to end on.
    stop_signal: tokio::sync::watch::Sender<bool>,
    fatal: Mutex<Option<String>>,
    accepted: AtomicU64,
    model: Option<Mutex<Model>>,
    /// `--fill`: workers send their share of the users' memberships instead of random pairs.
    fill: bool,
    /// Workers (`--concurrency`).
    workers: usize,
    /// `--latency-log`: an instant and the unix time in milliseconds at that instant.
    latency_epoch: Option<(Instant, u64)>,
}

impl Ctx {
    fn fail(&self, message: String) {
        lock(&self.fatal).get_or_insert(message);
        self.stop.store(true, Ordering::Relaxed);
        self.stop_signal.send_replace(true);
    }

    /// A worker's gate on the pacer (with `--rate`).
    fn gate(&self) -> Option<Gate> {
        self.pacer.as_ref().map(|p| {
            Gate::new(
                p.clone(),
                self.deadline.map(tokio::time::Instant::from_std),
                self.stop_signal.subscribe(),
            )
        })
    }

    fn encode(&self, pairs: &[GenPair], bodies: &mut Vec<Body>) {
        bodies.clear();
        for chunk in pairs.chunks(self.batch) {
            let mut b = BytesMut::new();
            match (self.protocol, self.http_body) {
                (Protocol::Grpc | Protocol::GrpcUnary, _) => self.names.protobuf(chunk, &mut b),
                (Protocol::Http, HttpBody::Json) => self.names.json(chunk, &mut b),
                (Protocol::Http, HttpBody::Ndjson) => self.names.ndjson(chunk, &mut b),
            }
            bodies.push(Body {
                bytes: b.freeze(),
                pairs: chunk.len() as u64,
            });
        }
    }
}

struct Stats {
    generated: u64,
    resends: u64,
    sent: u64,
    accepted: u64,
    requests: u64,
    retries: u64,
    latency_us: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    /// `--latency-log`: (start unix ms, latency µs, pairs) per acknowledged unit.
    latency_log: Vec<(u64, u64, u64)>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits: valid constant bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new() -> Stats {
        Stats {
            generated: 0,
            resends: 0,
            sent: 0,
            accepted: 0,
            requests: 0,
            retries: 0,
            latency_us: histogram(),
            errors: BTreeMap::new(),
            latency_log: Vec::new(),
        }
    }

    fn merge(&mut self, o: Stats) {
        self.generated += o.generated;
        self.resends += o.resends;
        self.sent += o.sent;
        self.accepted += o.accepted;
        self.requests += o.requests;
        self.retries += o.retries;
        // Same bounds on both sides, so this cannot fail.
        let _ = self.latency_us.add(&o.latency_us);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latency_log.extend(o.latency_log);
    }
}

/// Raises ts older than `oldest` (after a long retry); returns whether anything changed.
fn refresh(pairs: &mut [GenPair], oldest: i64) -> bool {
    let mut changed = false;
    for p in pairs {
        if let Some(ts) = &mut p.ts {
            if *ts < oldest {
                *ts = oldest;
                changed = true;
            }
        }
    }
    changed
}

async fn worker(ctx: Arc<Ctx>, id: usize, mut pusher: Pusher, quota: Option<u64>) -> Stats {
    let mut stats = Stats::new();
    let mut generator = ctx.workload.generator(worker_seed(ctx.seed, id));
    let mut filler = ctx.fill.then(|| {
        let n = ctx.workers;
        ctx.workload
            .filler(ctx.workload.fill_range(n, id), worker_seed(ctx.seed, id))
    });
    let mut jitter = SmallRng::seed_from_u64(worker_seed(ctx.seed ^ 0x6a17, id));
    let mut left = quota;
    let mut raw: Vec<GenPair> = Vec::new();
    let mut bodies: Vec<Body> = Vec::new();
    // Re-sends among the pairs of each batch of the unit.
    let mut batch_resends: Vec<u64> = Vec::new();
    let gate = ctx.gate();
    'units: loop {
        if ctx.stop.load(Ordering::Relaxed)
            || left == Some(0)
            || ctx.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let now = unix_now();
        raw.clear();
        batch_resends.clear();
        for _ in 0..ctx.unit_batches {
            let n = left.map_or(ctx.batch, |l| l.min(ctx.batch as u64) as usize);
            if n == 0 {
                break;
            }
            if let Some(f) = &mut filler {
                if f.fill(&mut raw, n, now) == 0 {
                    break;
                }
                batch_resends.push(0);
                continue;
            }
            let resends = generator.fill(&mut raw, n, now);
            stats.resends += resends;
            batch_resends.push(resends);
            if let Some(l) = &mut left {
                *l -= n as u64;
            }
        }
        if raw.is_empty() {
            // A filler with nothing left.
            break;
        }
        stats.generated += raw.len() as u64;
        ctx.encode(&raw, &mut bodies);

        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
        let mut failing_since: Option<Instant> = None;
        let mut gate = gate.clone();
        loop {
            let Sent {
                result,
                cut,
                began,
                released,
            } = pusher.send(&ctx.target, &bodies, gate.clone()).await;
            // A retry re-sends all that the server may have seen, deadline or not (paced still).
            gate = gate.map(Gate::without_deadline);
            if let Some(put) = cut {
                // The gate held back the rest of the unit (the deadline came, or the run is
                // stopping): the unit is what went out, and is not counted beyond it.
                let keep: usize = bodies[..put].iter().map(|b| b.pairs as usize).sum();
                stats.generated -= (raw.len() - keep) as u64;
                stats.resends -= batch_resends.drain(put..).sum::<u64>();
                raw.truncate(keep);
                bodies.truncate(put);
                if bodies.is_empty() {
                    break 'units;
                }
            }
            stats.sent += raw.len() as u64;
            match result {
                Ok(accepted) => {
                    let latency = began.elapsed().as_micros() as u64;
                    stats.latency_us.saturating_record(latency);
                    if let Some((at, unix_ms)) = ctx.latency_epoch {
                        let start = if began >= at {
                            unix_ms + began.duration_since(at).as_millis() as u64
                        } else {
                            unix_ms.saturating_sub(at.duration_since(began).as_millis() as u64)
                        };
                        stats.latency_log.push((start, latency, raw.len() as u64));
                    }
                    stats.requests += 1;
                    stats.accepted += accepted;
                    ctx.accepted.fetch_add(accepted, Ordering::Relaxed);
                    if accepted != raw.len() as u64 {
                        *stats.errors.entry("accepted_mismatch".into()).or_default() += 1;
                    }
                    if let Some(m) = &ctx.model {
                        // Pairs without ts are recorded at the time their body went out.
                        let mut m = lock(m);
                        let mut last = released.first().copied().unwrap_or_else(unix_now);
                        for (i, chunk) in raw.chunks(ctx.batch).enumerate() {
                            last = released.get(i).copied().unwrap_or(last);
                            m.record(chunk, last);
                        }
                    }
                    break;
                }
                Err(SendError {
                    kind,
                    message,
                    retryable,
                }) => {
                    *stats.errors.entry(kind.clone()).or_default() += 1;
                    if !retryable {
                        ctx.fail(format!("{kind}: {message}"));
                        break 'units;
                    }
                    let since = *failing_since.get_or_insert(began);
                    if since.elapsed() >= GIVE_UP_AFTER {
                        ctx.fail(format!(
                            "{kind}: {message} (still failing after {} s of retries)",
                            GIVE_UP_AFTER.as_secs()
                        ));
                        break 'units;
                    }
                    if ctx.stop.load(Ordering::Relaxed) {
                        break 'units;
                    }
                    stats.retries += 1;
                    let wait = backoff.pause().mul_f64(jitter.random_range(0.5..1.5));
                    tokio::time::sleep(wait).await;
                    if ctx.max_age > 0 && refresh(&mut raw, unix_now() - ctx.max_age + 1) {
                        ctx.encode(&raw, &mut bodies);
                    }
                }
            }
        }
    }
    stats
}

fn progress_bar(args: &LoadArgs, total: Option<u64>) -> ProgressBar {
    if args.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (len, template) = match (total, args.duration) {
        (Some(t), _) => (
            t,
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} pairs ({per_sec}) {msg}",
        ),
        (None, Some(d)) => (
            d.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        (None, None) => (0, "{spinner} {msg}"),
    };
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(5));
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}

fn print(out: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

fn connect_error(target: &Target, message: String) -> LoadError {
    LoadError::Connect {
        target: target.base.clone(),
        message,
    }
}

async fn lister(args: &LoadArgs, target: &Target) -> Result<Lister, LoadError> {
    Ok(match args.protocol {
        Protocol::Grpc | Protocol::GrpcUnary => {
            let ch = target
                .channel()
                .await
                .map_err(|e| connect_error(target, e))?;
            Lister::Grpc(SegmentsClient::new(ch).max_decoding_message_size(256 << 20))
        }
        Protocol::Http => Lister::Http(target.http_client().map_err(LoadError::Config)?),
    })
}

async fn pusher(
    args: &LoadArgs,
    target: &Target,
    http: Option<&reqwest::Client>,
) -> Result<Pusher, LoadError> {
    Ok(match (args.protocol, http) {
        (Protocol::Grpc, _) | (Protocol::GrpcUnary, _) => {
            let ch = target
                .channel()
                .await
                .map_err(|e| connect_error(target, e))?;
            let grpc = tonic::client::Grpc::new(ch);
            if args.protocol == Protocol::Grpc {
                Pusher::GrpcStream(grpc)
            } else {
                Pusher::GrpcUnary(grpc)
            }
        }
        (Protocol::Http, client) => {
            let client = match client {
                Some(c) => c.clone(),
                None => target.http_client().map_err(LoadError::Config)?,
            };
            Pusher::Http {
                client,
                url: format!("{}/v1/pairs", target.base),
                content_type: match args.http_body {
                    HttpBody::Json => "application/json",
                    HttpBody::Ndjson => "application/x-ndjson",
                },
            }
        }
    })
}

async fn list_once(lister: &mut Lister, target: &Target) -> Result<Listing, LoadError> {
    lister.list(target).await.map_err(|e| LoadError::Connect {
        target: target.base.clone(),
        message: format!(
            "listing segments (to learn the window): {}: {} (a server that only ingests needs \
             --verify-target pointing at one that serves estimates)",
            e.kind, e.message
        ),
    })
}

/// Polls the counts until they match the model, stop changing, or the timeout passes.
async fn verify(args: &LoadArgs, ctx: &Ctx, lister: &mut Lister, counts: &Target) -> VerifyReport {
    let mut report = VerifyReport::default();
    let Some(model) = &ctx.model else {
        return report;
    };
    // The workers are done: take the model out rather than hold the lock across the polls.
    let model = std::mem::replace(&mut *lock(model), Model::new(0));
    report.memberships = model.memberships();
    report.model_bytes = model.memory_bytes();
    let ours: HashSet<&str> = ctx.names.segments().iter().map(|s| &**s).collect();
    let started = Instant::now();
    let mut last_counts: Option<Vec<u64>> = None;
    let mut last_change = Instant::now();
    loop {
        report.polls += 1;
        match lister.list(counts).await {
            Err(e) => {
                if !e.retryable || started.elapsed() >= args.verify_timeout {
                    report.error = Some(format!("listing segments: {}: {}", e.kind, e.message));
                    break;
                }
            }
            Ok(l) => {
                let slack = args.verify_slack.as_secs();
                let tolerance = Tolerance {
                    // Pairs with ts are compared verbatim: only the store's bucketing blurs the
                    // edge. Pairs without ts are stamped a little after the model thinks.
                    expiry: bucket_secs(l.window_seconds) + if ctx.max_age > 0 { 0 } else { slack },
                    now: slack,
                };
                let expected = model.expected(l.as_of, l.window_seconds, tolerance);
                let count = |s: &str| l.segments.get(s).copied().unwrap_or(0);
                report.comparison = compare(ctx.names.segments(), &expected, count);
                report.exact = l.exact;
                report.as_of = l.as_of;
                report.window_seconds = l.window_seconds;
                report.tolerance = tolerance;
                report.other_segments = l
                    .segments
                    .keys()
                    .filter(|k| !ours.contains(k.as_str()))
                    .count();
                if report.comparison.mismatches.is_empty() {
                    break;
                }
                let counts: Vec<u64> = ctx.names.segments().iter().map(|s| count(s)).collect();
                if last_counts.as_ref() != Some(&counts) {
                    last_counts = Some(counts);
                    last_change = Instant::now();
                }
                if last_change.elapsed() >= args.verify_settle
                    || started.elapsed() >= args.verify_timeout
                {
                    break;
                }
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    report.waited_secs = started.elapsed().as_secs_f64();
    report.ok =
        report.error.is_none() && (report.comparison.mismatches.is_empty() || !report.exact);
    report
}

pub(crate) async fn run(args: LoadArgs) -> Result<Summary, LoadError> {
    args.validate()?;
    let (target, counts) = targets(&args)?;
    let mut lister = lister(&args, &counts).await?;
    let spread = ts_spread(&args, &target, &counts, &mut lister).await?;
    let latency_file = match &args.latency_log {
        Some(path) => Some(std::fs::File::create(path).map_err(|e| {
            LoadError::Config(format!(
                "LOAD_LATENCY_LOG: cannot create {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };

    let (skew, resend_ratio) = match args.fill {
        Some(live) => (skew_for(args.users, args.segments, live), 0.0),
        None => (args.skew, args.resend_ratio),
    };
    let workload = Workload::new(
        args.users,
        args.segments,
        skew,
        resend_ratio,
        spread as u32,
        args.seed,
    );
    let fill = args.fill.map(|target| FillReport {
        target_live_pairs: target,
        memberships: workload.memberships(),
        skew,
    });
    let total = match &fill {
        Some(f) => Some(f.memberships),
        None => args.total_pairs(),
    };
    let names = Names::new(&args.user_prefix, &args.segment_prefix, args.segments);
    let http = match args.protocol {
        Protocol::Http => Some(target.http_client().map_err(LoadError::Config)?),
        _ => None,
    };
    let mut pushers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        pushers.push(pusher(&args, &target, http.as_ref()).await?);
    }

    let pb = progress_bar(&args, total);
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        workload,
        names,
        protocol: args.protocol,
        http_body: args.http_body,
        batch: args.batch,
        unit_batches: if args.protocol == Protocol::Grpc {
            args.stream_batches
        } else {
            1
        },
        max_age: spread as i64,
        seed: args.seed,
        deadline: args.duration.map(|d| started + d),
        pacer: args.rate.map(|r| Arc::new(Pacer::new(r))),
        stop: AtomicBool::new(false),
        stop_signal: tokio::sync::watch::Sender::new(false),
        fatal: Mutex::new(None),
        accepted: AtomicU64::new(0),
        model: args.verify.then(|| Mutex::new(Model::new(args.segments))),
        fill: fill.is_some(),
        workers: args.concurrency,
        latency_epoch: latency_file
            .as_ref()
            .map(|_| (Instant::now(), unix_now_ms())),
    });

    let mut handles = Vec::with_capacity(args.concurrency);
    for (id, p) in pushers.into_iter().enumerate() {
        let q = match fill {
            // A filler stops when its users' memberships are sent.
            Some(_) => None,
            None => total.map(|t| quota(t, args.concurrency, id)),
        };
        handles.push(tokio::spawn(worker(ctx.clone(), id, p, q)));
    }
    let ticker = spawn_ticker(ctx.clone(), pb.clone(), started, total.is_none());
    let mut stats = Stats::new();
    for h in handles {
        match h.await {
            Ok(s) => stats.merge(s),
            Err(e) => ctx.fail(format!("a worker failed: {e}")),
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    pb.finish_and_clear();

    let mut summary = summarize(&args, &target, spread, &stats, elapsed);
    summary.fill = fill;
    summary.fatal = lock(&ctx.fatal).clone();
    if let (Some(file), Some(path)) = (latency_file, &args.latency_log) {
        stats.latency_log.sort_unstable();
        if let Err(e) = write_latency_log(file, &stats.latency_log) {
            eprintln!(
                "warning: LOAD_LATENCY_LOG: cannot write {}: {e}",
                path.display()
            );
        }
    }
    if args.verify && summary.fatal.is_none() {
        summary.verify = Some(verify(&args, &ctx, &mut lister, &counts).await);
    }
    report(&args, summary)
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `--latency-log`: one `start_unix_ms latency_us pairs` line per acknowledged unit.
fn write_latency_log(file: std::fs::File, log: &[(u64, u64, u64)]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(file);
    for (start, latency, pairs) in log {
        writeln!(w, "{start} {latency} {pairs}")?;
    }
    w.flush()
}

/// Where to push, and where to read counts (and the window) from: `--verify-target` when
/// given (in the distributed mode the ingest service does not serve estimates), else the same.
fn targets(args: &LoadArgs) -> Result<(Target, Target), LoadError> {
    let ca_pem = match &args.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            LoadError::Config(format!("LOAD_CA_FILE: cannot read {}: {e}", path.display()))
        })?),
        None => None,
    };
    let read = |var: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| LoadError::Config(format!("{var}: cannot read {}: {e}", path.display())))
    };
    let identity = match (&args.cert_file, &args.key_file) {
        (Some(cert), Some(key)) => {
            Some((read("LOAD_CERT_FILE", cert)?, read("LOAD_KEY_FILE", key)?))
        }
        _ => None,
    };
    let target = Target::new(&args.target, args.token.as_deref(), ca_pem.clone())
        .map_err(LoadError::Config)?
        .with_identity(identity)
        .map_err(LoadError::Config)?;
    let counts = match &args.verify_target {
        Some(url) => Target::new(url, args.token.as_deref(), ca_pem).map_err(LoadError::Config)?,
        None => target.clone(),
    };
    Ok((target, counts))
}

/// The spread of event times, kept inside the server's window (asked for when needed: to
/// keep every ts acceptable, and to verify); otherwise a connectivity check over HTTP (gRPC
/// connects its channels when the pushers are made).
async fn ts_spread(
    args: &LoadArgs,
    target: &Target,
    counts: &Target,
    lister: &mut Lister,
) -> Result<u64, LoadError> {
    let mut spread = args.ts_spread.as_secs();
    if spread > 0 || args.verify {
        let listing = list_once(lister, counts).await?;
        let w = listing.window_seconds;
        let max_age = w.saturating_sub(ts_margin(w));
        if spread > max_age {
            eprintln!(
                "warning: LOAD_TS_SPREAD: {spread} s reaches past the server's window of {w} s \
                 (older pairs are rejected); using {max_age} s"
            );
            spread = max_age;
        }
    } else if args.protocol == Protocol::Http {
        let client = target.http_client().map_err(LoadError::Config)?;
        if let Err(e) = client.get(format!("{}/healthz", target.base)).send().await {
            return Err(LoadError::Connect {
                target: target.base.clone(),
                message: e.to_string(),
            });
        }
    }
    Ok(spread)
}

/// Shows progress every 200 ms: pairs (a run of N pairs) or time and rate (a timed run).
fn spawn_ticker(
    ctx: Arc<Ctx>,
    pb: ProgressBar,
    started: Instant,
    timed: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let accepted = ctx.accepted.load(Ordering::Relaxed);
            if timed {
                let el = started.elapsed();
                pb.set_position(el.as_millis() as u64);
                let rate = accepted as f64 / el.as_secs_f64().max(1e-3);
                pb.set_message(format!("{accepted} pairs, {rate:.0} pairs/s"));
            } else {
                pb.set_position(accepted);
            }
        }
    })
}

/// The run's summary from the workers' statistics (no fatal error, not verified yet).
fn summarize(
    args: &LoadArgs,
    target: &Target,
    spread: u64,
    stats: &Stats,
    elapsed: Duration,
) -> Summary {
    let q = |q: f64| stats.latency_us.value_at_quantile(q) as f64 / 1000.0;
    Summary {
        protocol: args.protocol.as_str(),
        target: target.base.clone(),
        users: args.users,
        segments: args.segments,
        batch: args.batch,
        concurrency: args.concurrency,
        seed: args.seed,
        ts_spread_secs: spread,
        pairs_generated: stats.generated,
        resends: stats.resends,
        pairs_sent: stats.sent,
        pairs_accepted: stats.accepted,
        requests: stats.requests,
        retries: stats.retries,
        elapsed_secs: elapsed.as_secs_f64(),
        pairs_per_sec: stats.accepted as f64 / elapsed.as_secs_f64().max(1e-9),
        rate_limit_pairs_per_sec: args.rate,
        latency: Latency {
            unit: if args.protocol == Protocol::Grpc {
                "stream"
            } else {
                "request"
            },
            samples: stats.latency_us.len(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: stats.latency_us.max() as f64 / 1000.0,
        },
        errors: stats.errors.clone(),
        fatal: None,
        verify: None,
        fill: None,
    }
}

/// Prints the summary (JSON or text) and turns a fatal error or a failed verification into
/// the run's error.
fn report(args: &LoadArgs, summary: Summary) -> Result<Summary, LoadError> {
    if args.json {
        print(&format!("{}\n", summary.to_json()));
    } else {
        print(&summary.human());
    }
    if let Some(message) = summary.fatal.clone() {
        return Err(LoadError::Stopped {
            message,
            summary: Box::new(summary),
        });
    }
    if let Some(v) = &summary.verify {
        if !v.ok {
            let detail = match &v.error {
                Some(e) => e.clone(),
                None => format!(
                    "{} of {} segments differ from the expected counts",
                    v.comparison.mismatches.len(),
                    v.comparison.segments_checked
                ),
            };
            return Err(LoadError::Verify {
                detail,
                summary: Box::new(summary),
            });
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_add_up() {
        for total in [0u64, 1, 7, 1_000_001] {
            for n in [1usize, 3, 4, 64] {
                let sum: u64 = (0..n).map(|i| quota(total, n, i)).sum();
                assert_eq!(sum, total);
            }
        }
    }

    #[test]
    fn refresh_raises_old_ts() {
        let mut v = vec![
            GenPair {
                user: 1,
                segment: 0,
                ts: Some(5),
            },
            GenPair {
                user: 1,
                segment: 0,
                ts: Some(50),
            },
            GenPair {
                user: 1,
                segment: 0,
                ts: None,
            },
        ];
        assert!(refresh(&mut v, 10));
        assert_eq!(v[0].ts, Some(10));
        assert_eq!(v[1].ts, Some(50));
        assert_eq!(v[2].ts, None);
        assert!(!refresh(&mut v, 10));
    }

    #[test]
    fn run_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let args = LoadArgs::try_from_flags(["--pairs", "1"]).unwrap();
        let fut = run(args);
        assert_send(&fut);
    }

    #[test]
    fn margins() {
        assert_eq!(ts_margin(14 * 86_400), 300);
        assert_eq!(ts_margin(3600), 36);
        assert_eq!(ts_margin(120), 2);
        assert_eq!(ts_margin(5), 2);
    }
}
