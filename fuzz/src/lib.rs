//! Fuzz targets for every decoder of bytes that come from outside the process: request bodies
//! (HTTP JSON and NDJSON pairs, the deletion body, the gRPC `PushRequest`), query strings and
//! durations, query expressions, the API keys file, the Kafka record value, and the files of the
//! data directory (write-ahead log records, snapshots, history files).
//!
//! A target gets arbitrary bytes and panics only when the decoder under test misbehaves: it
//! panicked, or it failed without the specific error the API promises (the right kind, a
//! message), or what it decoded does not encode back to the same value. The same functions run
//! coverage-guided under AFL++ (`make fuzz`, `src/main.rs`) and as property tests on random
//! and structured inputs (`tests/decoders.rs`, part of `make test`).
//!
//! Where the bytes carry checksums (log frames, snapshots, history files), the targets also
//! decode a copy whose checksums were recomputed, so the fuzzer reaches the code behind them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message as _;
use userseg_api::{ApiError, KeyFileError, KeySet};
use userseg_domain::{
    parse_duration, ErrorKind, Expr, Pair, RawPair, Record, UserDeletion, Window, Within,
};
use userseg_embedded::store::snapshot::{self, SnapshotError};
use userseg_embedded::wal::codec::{self, Frame};
use userseg_embedded::{FileHistory, MemStore};
use userseg_usecase::HistoryStore;

/// "Now" for the targets: a fixed instant, so that runs are reproducible.
pub const NOW: i64 = 1_800_000_000;
/// At most this many pairs in an NDJSON body (the server's MAX_PAIRS_PER_REQUEST, scaled down).
pub const NDJSON_MAX_PAIRS: usize = 64;

/// The window of the targets (the default, 14 days).
pub fn window() -> Window {
    Window::from_secs(14 * 86_400).unwrap_or_else(|e| panic!("window: {e}"))
}

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    /// What it decodes.
    pub what: &'static str,
    /// Runs the decoder on `data`; panics if it misbehaves.
    pub run: fn(&[u8]),
    /// Valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "http_json",
        what: "POST /v1/pairs JSON body",
        run: http_json,
        seeds: seeds_json,
    },
    Target {
        name: "http_ndjson",
        what: "POST /v1/pairs NDJSON body",
        run: http_ndjson,
        seeds: seeds_ndjson,
    },
    Target {
        name: "delete_body",
        what: "POST /v1/users/delete JSON body",
        run: delete_body,
        seeds: seeds_delete,
    },
    Target {
        name: "grpc_push",
        what: "gRPC PushRequest message",
        run: grpc_push,
        seeds: seeds_grpc,
    },
    Target {
        name: "kafka_record",
        what: "Kafka record value (PairBatch)",
        run: kafka_record,
        seeds: seeds_kafka,
    },
    Target {
        name: "wal_record",
        what: "write-ahead log frames and records",
        run: wal_record,
        seeds: seeds_wal,
    },
    Target {
        name: "snapshot",
        what: "snapshot file (snapshot::load)",
        run: snapshot_file,
        seeds: seeds_snapshot,
    },
    Target {
        name: "history",
        what: "history day file (FileHistory::open and read)",
        run: history_file,
        seeds: seeds_history,
    },
    Target {
        name: "keys_file",
        what: "API keys file (TOML)",
        run: keys_file,
        seeds: seeds_keys,
    },
    Target {
        name: "expr",
        what: "query expression (GET /v1/count?q=)",
        run: expr,
        seeds: seeds_expr,
    },
    Target {
        name: "params",
        what: "query strings, durations (within, step), unix seconds",
        run: params,
        seeds: seeds_params,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The error is one the API promises for bad input: one of `kinds`, with a message.
fn specific(e: &ApiError, kinds: &[ErrorKind]) {
    assert!(
        kinds.contains(&e.kind),
        "bad input answered {:?} ({}), expected one of {kinds:?}",
        e.kind,
        e.message
    );
    assert!(!e.message.trim().is_empty(), "an error without a message");
    let body = e.body();
    assert_eq!(body["error"]["code"], e.kind.as_str());
}

/// Validation of decoded pairs never panics, and a refusal says why.
fn validate(pairs: Vec<RawPair>) {
    for p in pairs {
        let raw = p.clone();
        match p.validate(NOW, window()) {
            Ok(pair) => {
                assert_eq!(pair.user_id, raw.user_id);
                assert_eq!(pair.segment, raw.segment);
                assert_eq!(pair.ts, raw.ts.unwrap_or(NOW));
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}

pub fn http_json(data: &[u8]) {
    match userseg_api::decode::push_json(data) {
        Ok(pairs) => validate(pairs),
        Err(e) => specific(&e, &[ErrorKind::InvalidArgument]),
    }
}

pub fn http_ndjson(data: &[u8]) {
    match userseg_api::decode::push_ndjson(data, NDJSON_MAX_PAIRS) {
        Ok(pairs) => {
            assert!(pairs.len() <= NDJSON_MAX_PAIRS);
            validate(pairs);
        }
        Err(e) => {
            specific(
                &e,
                &[ErrorKind::InvalidArgument, ErrorKind::PayloadTooLarge],
            );
            if e.kind == ErrorKind::InvalidArgument {
                let line = e.line.unwrap_or_else(|| panic!("no line in {}", e.message));
                assert!(line >= 1 && line <= data.split(|b| *b == b'\n').count());
                assert!(e.index.is_some(), "no index in {}", e.message);
            }
        }
    }
}

pub fn delete_body(data: &[u8]) {
    match userseg_api::decode::delete_body(data) {
        Ok(ids) => match UserDeletion::new(ids.clone()) {
            Ok(d) => {
                let mut kept = d.user_ids().to_vec();
                kept.sort();
                let mut given = ids;
                given.sort();
                given.dedup();
                assert_eq!(kept, given, "a deletion lost or invented ids");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
        Err(e) => specific(&e, &[ErrorKind::InvalidArgument]),
    }
}

pub fn grpc_push(data: &[u8]) {
    match userseg_api::decode::push_proto(data) {
        Ok(pairs) => validate(pairs),
        Err(e) => specific(&e, &[ErrorKind::InvalidArgument]),
    }
}

pub fn kafka_record(data: &[u8]) {
    match userseg_kafka::decode_batch(data) {
        Ok(pairs) => {
            let again = userseg_kafka::decode_batch(&userseg_kafka::encode_batch(&pairs));
            assert_eq!(
                again.as_ref(),
                Ok(&pairs),
                "a decoded batch does not round-trip"
            );
        }
        Err(e) => {
            let why = e.to_string();
            assert!(
                why.starts_with("undecodable: ") || why.starts_with("invalid pair "),
                "unexpected reason {why:?}"
            );
        }
    }
}

/// A record decodes to something that encodes back to the same record.
fn wal_payload(payload: &[u8]) {
    let Some(record) = codec::decode(payload) else {
        return;
    };
    let mut buf = Vec::new();
    match &record {
        Record::Pairs(pairs) => codec::encode_record(pairs, &mut buf),
        Record::DeleteUsers(d) => codec::encode_deletion(d, &mut buf),
    }
    match codec::read_frame(&buf) {
        Frame::Ok(p, n) => {
            assert_eq!(n, buf.len());
            assert_eq!(codec::decode(p).as_ref(), Some(&record), "no round trip");
        }
        _ => panic!("an encoded record does not read back as a frame"),
    }
}

/// Scans `log` frame by frame as recovery does; returns the payloads read.
fn scan_frames(log: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while pos < log.len() {
        match codec::read_frame(&log[pos..]) {
            Frame::Ok(payload, len) => {
                assert!(len >= codec::FRAME_HEADER && pos + len <= log.len());
                wal_payload(payload);
                pos += len;
                n += 1;
            }
            Frame::Incomplete | Frame::Corrupt => break,
        }
    }
    n
}

/// Frames `chunks` as the log does (length, crc32, payload): the fuzzer's bytes reach the
/// record decoder behind the checksum.
pub fn frame_chunks(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in chunks(data) {
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(chunk).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Splits `data` into chunks, each preceded by its length byte.
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let n = usize::from(data[pos]);
        let end = (pos + 1 + n).min(data.len());
        out.push(&data[pos + 1..end]);
        pos = end;
    }
    out
}

/// Builds the fuzzer's form of `chunks` (each preceded by its length byte).
pub fn join_chunks(chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in chunks {
        let c = &c[..c.len().min(255)];
        out.push(c.len() as u8);
        out.extend_from_slice(c);
    }
    out
}

pub fn wal_record(data: &[u8]) {
    wal_payload(data);
    scan_frames(data);
    let framed = frame_chunks(data);
    assert_eq!(scan_frames(&framed), chunks(data).len());
}

/// A directory of scratch files for the file targets, one per thread; in memory (`/dev/shm`)
/// where there is one, since snapshots and history files are fsynced.
fn scratch() -> PathBuf {
    thread_local! {
        static DIR: tempfile::TempDir = {
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
            dir.unwrap_or_else(|e| panic!("tempdir: {e}"))
        };
    }
    DIR.with(|d| d.path().to_owned())
}

/// Recomputes the two checksums of a snapshot from its footer's dictionary offset (when the
/// offset is plausible), so that mutated snapshots get past the checksum checks.
pub fn fix_snapshot_checksums(bytes: &mut [u8]) {
    let len = bytes.len();
    if len < 56 {
        return;
    }
    let footer = len - 24;
    let mut off = [0u8; 8];
    off.copy_from_slice(&bytes[footer..footer + 8]);
    let dict_offset = u64::from_le_bytes(off);
    let Ok(d) = usize::try_from(dict_offset) else {
        return;
    };
    if d < 32 || d > footer {
        return;
    }
    let seg = crc32fast::hash(&bytes[..d]);
    let dict = crc32fast::hash(&bytes[d..footer]);
    bytes[footer + 8..footer + 12].copy_from_slice(&seg.to_le_bytes());
    bytes[footer + 12..footer + 16].copy_from_slice(&dict.to_le_bytes());
}

fn load_snapshot(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    match snapshot::load(path, window()) {
        Ok((store, _offset)) => {
            for c in store.count_all(NOW) {
                assert!(c.users > 0);
                assert_eq!(store.count(&c.segment, NOW), c.users);
            }
            store.expire(NOW);
        }
        Err(SnapshotError::Corrupt { reason, .. }) => assert!(!reason.is_empty()),
        Err(SnapshotError::WindowMismatch { .. }) => {}
        Err(e @ SnapshotError::Io { .. }) => panic!("a snapshot's bytes gave an i/o error: {e}"),
    }
}

pub fn snapshot_file(data: &[u8]) {
    let path = scratch().join("snapshot-00000000000000000001.snap");
    load_snapshot(&path, data);
    let mut fixed = data.to_vec();
    fix_snapshot_checksums(&mut fixed);
    if fixed != data {
        load_snapshot(&path, &fixed);
    }
}

/// A current-thread runtime for the async history reads.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    })
}

/// The day of the history seeds: day 20833 (2027-01-15), ticks 1_799_971_200 and on.
pub const HISTORY_DAY: i64 = 20_833;

fn open_history(bytes: &[u8]) {
    let dir = scratch().join("history");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    std::fs::write(dir.join(format!("{HISTORY_DAY:08}.hist")), bytes)
        .unwrap_or_else(|e| panic!("write: {e}"));
    let h = FileHistory::open(&dir).unwrap_or_else(|e| panic!("a history file's bytes: {e}"));
    let day = HISTORY_DAY * 86_400;
    runtime().block_on(async {
        let last = h
            .last_tick()
            .await
            .unwrap_or_else(|e| panic!("last_tick: {e}"));
        for seg in ["a", "b", "sports"] {
            for (from, to, step) in [
                (day, day + 86_399, 60),
                (i64::MIN, i64::MAX, u64::MAX),
                (day + 600, day + 600, 1),
            ] {
                // A bad sample in a file is an error of the read, never a panic.
                if let Ok(points) = h.read(seg, from, to, step).await {
                    assert!(points.windows(2).all(|w| w[0].ts < w[1].ts));
                    assert!(points.iter().all(|p| p.ts >= from && p.ts <= to));
                    if let Some(p) = points.last() {
                        assert!(last.is_some_and(|l| p.ts <= l));
                    }
                }
            }
        }
        // Reads of ranges wholly before what retention keeps.
        if h.prune(day + 3600).await.is_ok() {
            for (from, to) in [
                (day, day + 60),
                (day - 86_400, day - 86_340),
                (i64::MIN, day),
            ] {
                let points = h.read("a", from, to, 60).await;
                assert!(points.is_ok_and(|p| p.is_empty()), "pruned ticks read back");
            }
        }
    });
}

pub fn history_file(data: &[u8]) {
    open_history(data);
    open_history(&frame_chunks(data));
}

pub fn keys_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match KeySet::parse(Path::new("keys.toml"), text) {
        Ok(keys) => assert!(!keys.is_empty()),
        Err(KeyFileError::Invalid { line, message, .. }) => {
            assert!(!message.is_empty());
            assert!(
                line >= 1 && line <= text.lines().count().max(1) + 1,
                "line {line}"
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

pub fn expr(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Expr::parse(text) {
        Ok(e) => {
            let segments = e.segments();
            assert!(!segments.is_empty());
            for s in &segments {
                assert!(userseg_domain::validate_segment(s).is_ok(), "{s:?}");
            }
            let _ = e.matches(&|s: &str| s.len().is_multiple_of(2));
        }
        Err(e) => {
            assert!(
                e.at <= text.len(),
                "error at {} of {} bytes",
                e.at,
                text.len()
            );
            assert!(!e.to_string().is_empty());
        }
    }
}

pub fn params(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(secs) = parse_duration(text) {
        assert!(secs > 0 || text.chars().any(|c| c == '0'));
    }
    match Within::parse(text, window()) {
        Ok(w) => assert!(w.secs() > 0 && w.secs() <= window().secs()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let allowed = ["q", "within", "from", "to", "step", "segments", "mode"];
    match userseg_api::decode::query(text, &allowed) {
        Ok(params) => {
            for (i, (k, _)) in params.iter().enumerate() {
                assert!(allowed.contains(&k.as_str()));
                assert!(params[..i].iter().all(|(k2, _)| k2 != k));
            }
        }
        Err(e) => specific(&e, &[ErrorKind::InvalidArgument]),
    }
}

// --- seeds -----------------------------------------------------------------------------

fn seeds_json() -> Vec<Vec<u8>> {
    [
        r#"{"pairs":[{"user_id":"u1","segment":"sports"},{"user_id":"u2","segment":"news","ts":1799999000}]}"#,
        r#"{"pairs":[]}"#,
        r#"{"pairs":[{"user_id":"u1","segment":"a","ts":-9223372036854775808}]}"#,
        r#"{"pairs":[{"user_id":"u1","segment":"a","ts":1.5e3}]}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn seeds_ndjson() -> Vec<Vec<u8>> {
    vec![
        b"{\"user_id\":\"u1\",\"segment\":\"sports\"}\n{\"user_id\":\"u2\",\"segment\":\"news\",\"ts\":1799999000}\r\n".to_vec(),
        b"\n\n{\"user_id\":\"u1\",\"segment\":\"a\"}".to_vec(),
    ]
}

fn seeds_delete() -> Vec<Vec<u8>> {
    vec![
        br#"{"user_ids":["u1","u2","u1"]}"#.to_vec(),
        br#"{"user_ids":[]}"#.to_vec(),
    ]
}

/// A valid `PushRequest` of `pairs`.
pub fn push_request(pairs: &[(String, String, Option<i64>)]) -> Vec<u8> {
    userseg_proto::v1::PushRequest {
        pairs: pairs
            .iter()
            .map(|(u, s, ts)| userseg_proto::v1::Pair {
                user_id: u.clone(),
                segment: s.clone(),
                ts: *ts,
            })
            .collect(),
    }
    .encode_to_vec()
}

fn seeds_grpc() -> Vec<Vec<u8>> {
    vec![
        push_request(&[
            ("u1".into(), "sports".into(), None),
            ("u2".into(), "news".into(), Some(1_799_999_000)),
        ]),
        push_request(&[("u1".into(), "a".into(), Some(i64::MIN))]),
    ]
}

fn sample_pairs() -> Vec<Pair> {
    (0..4)
        .map(|i| Pair {
            user_id: format!("user-{i}"),
            segment: ["sports", "news"][i % 2].into(),
            ts: NOW - 60 * i as i64,
        })
        .collect()
}

fn seeds_kafka() -> Vec<Vec<u8>> {
    vec![
        userseg_kafka::encode_batch(&sample_pairs()),
        userseg_kafka::encode_batch(&[]),
    ]
}

fn seeds_wal() -> Vec<Vec<u8>> {
    let mut framed = Vec::new();
    codec::encode_record(&sample_pairs(), &mut framed);
    if let Ok(d) = UserDeletion::new(vec!["user-1".into(), "user-2".into()]) {
        codec::encode_deletion(&d, &mut framed);
    }
    let payload = match codec::read_frame(&framed) {
        Frame::Ok(p, _) => p.to_vec(),
        _ => Vec::new(),
    };
    vec![framed, payload]
}

/// A valid snapshot of a small store.
pub fn snapshot_bytes(pairs: &[Pair]) -> Vec<u8> {
    let store = MemStore::new(window());
    store.apply(pairs).unwrap_or_else(|e| panic!("apply: {e}"));
    let dir = scratch().join("seed-snapshots");
    let _ = std::fs::remove_dir_all(&dir);
    let path = snapshot::write(&store, &dir, 7).unwrap_or_else(|e| panic!("snapshot: {e}"));
    std::fs::read(path).unwrap_or_else(|e| panic!("read: {e}"))
}

fn seeds_snapshot() -> Vec<Vec<u8>> {
    vec![snapshot_bytes(&sample_pairs()), snapshot_bytes(&[])]
}

/// A valid history day file, in the fuzzer's form (chunks framed by [`frame_chunks`]):
/// a names record and two samples.
pub fn history_chunks(names: &[&str], samples: &[(i64, Vec<(u32, u64)>)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rec = vec![1u8];
    put_varint(&mut rec, names.len() as u64);
    for (id, n) in names.iter().enumerate() {
        put_varint(&mut rec, id as u64);
        put_varint(&mut rec, n.len() as u64);
        rec.extend_from_slice(n.as_bytes());
    }
    out.push(rec);
    for (tick, counts) in samples {
        let mut rec = vec![2u8];
        put_varint(&mut rec, ((tick << 1) ^ (tick >> 63)) as u64);
        put_varint(&mut rec, counts.len() as u64);
        for (id, users) in counts {
            put_varint(&mut rec, u64::from(*id));
            put_varint(&mut rec, *users);
        }
        out.push(rec);
    }
    out
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn seeds_history() -> Vec<Vec<u8>> {
    let day = HISTORY_DAY * 86_400;
    vec![join_chunks(&history_chunks(
        &["a", "sports"],
        &[(day + 60, vec![(0, 3), (1, 5)]), (day + 120, vec![(1, 7)])],
    ))]
}

fn seeds_keys() -> Vec<Vec<u8>> {
    vec![format!(
        "[[key]]\nname = \"ingest-1\"\nsha256 = \"{}\"\nroles = [\"ingest\", \"read\"]\n",
        "ab".repeat(32)
    )
    .into_bytes()]
}

fn seeds_expr() -> Vec<Vec<u8>> {
    [
        "sports AND NOT news",
        "(a OR b) AND (c OR NOT (d AND e))",
        "a",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn seeds_params() -> Vec<Vec<u8>> {
    [
        "7d",
        "1d12h",
        "within=7d&q=a+AND+b",
        "from=0&to=9223372036854775807&step=1h",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
