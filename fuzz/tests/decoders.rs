//! The short pass of the fuzz targets in `make test`: each target on random bytes and on
//! structured inputs (valid encodings, then mutated: bytes flipped, cut, spliced; JSON with odd
//! types, duplicate keys, deep nesting; protobuf strings that are not UTF-8; snapshots and
//! history files with their checksums recomputed after the mutation). `PROPTEST_CASES` scales
//! the number of cases; `make fuzz` runs the same targets coverage-guided for longer.

use proptest::prelude::*;
use proptest::test_runner::Config;
use userseg_domain::Pair;
use userseg_fuzz::*;

fn cases(n: u32) -> Config {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A byte-level mutation of a valid input.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Set(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (
            any::<usize>(),
            prop_oneof![Just(0u8), Just(0x7f), Just(0x80), Just(0xff)]
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn mutate(mut data: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = data.len();
        match m {
            Mutation::Flip(i, b) if len > 0 => data[i % len] ^= b,
            Mutation::Set(i, b) if len > 0 => data[i % len] = *b,
            Mutation::Cut(i) => data.truncate(i % (len + 1)),
            Mutation::Insert(i, b) => {
                let at = i % (len + 1);
                data.splice(at..at, b.iter().copied());
            }
            Mutation::Remove(i, n) if len > 0 => {
                let at = i % len;
                data.drain(at..(at + n).min(len));
            }
            _ => {}
        }
    }
    data
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 0..4)
}

/// A JSON value of odd shapes: every type, huge and fractional numbers, nesting.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        Just("9223372036854775808".to_string()),
        Just("-9223372036854775809".to_string()),
        Just("1e400".to_string()),
        Just("1.0".to_string()),
        "\\PC{0,12}".prop_map(|s| serde_json_string(&s)),
        Just("\"\\ud800\"".to_string()),
        Just("\"a\\u0000b\"".to_string()),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("user_id"),
                        Just("segment"),
                        Just("ts"),
                        Just("pairs"),
                        Just("x")
                    ],
                    inner
                ),
                0..4
            )
            .prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

fn serde_json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A pair object with any of its fields missing, repeated or of another type.
fn json_pair() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        "[a-z0-9]{1,8}".prop_map(|v| format!("\"user_id\":\"{v}\"")),
        "[a-z:._-]{1,8}".prop_map(|v| format!("\"segment\":\"{v}\"")),
        any::<i64>().prop_map(|v| format!("\"ts\":{v}")),
        prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(NOW), Just(0)]
            .prop_map(|v| format!("\"ts\":{v}")),
        any::<f64>().prop_map(|v| format!("\"ts\":{v:?}")),
        json_value().prop_map(|v| format!("\"ts\":{v}")),
        json_value().prop_map(|v| format!("\"user_id\":{v}")),
        json_value().prop_map(|v| format!("\"extra\":{v}")),
    ];
    proptest::collection::vec(field, 0..5).prop_map(|f| format!("{{{}}}", f.join(",")))
}

/// Brackets nested `depth` deep.
fn nested(depth: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{}{}", open.repeat(depth), inner, close.repeat(depth))
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn every_target_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        for t in TARGETS {
            (t.run)(&data);
        }
    }

    #[test]
    fn every_target_on_mutated_seeds(ms in mutations(), pick in any::<usize>()) {
        for t in TARGETS {
            let seeds = (t.seeds)();
            let seed = seeds[pick % seeds.len()].clone();
            (t.run)(&mutate(seed, &ms));
        }
    }

    #[test]
    fn json_bodies(pairs in proptest::collection::vec(json_pair(), 0..5), top in json_value(), dup in any::<bool>()) {
        let list = pairs.join(",");
        let body = if dup {
            format!("{{\"pairs\":[{list}],\"pairs\":[]}}")
        } else {
            format!("{{\"pairs\":[{list}]}}")
        };
        http_json(body.as_bytes());
        http_json(top.as_bytes());
        http_ndjson(pairs.join("\n").as_bytes());
        http_ndjson(top.as_bytes());
        delete_body(format!("{{\"user_ids\":{top}}}").as_bytes());
    }

    #[test]
    fn protobuf_messages(
        pairs in proptest::collection::vec(("\\PC{0,8}", "[a-z]{0,8}", proptest::option::of(any::<i64>())), 0..6),
        bad_utf8 in proptest::collection::vec(0x80u8..=0xbf, 1..4),
        ms in mutations(),
    ) {
        let valid = push_request(&pairs);
        grpc_push(&valid);
        grpc_push(&mutate(valid, &ms));
        // A Pair whose user_id holds bytes that are not UTF-8 (field 1 of field 1).
        let mut inner = vec![0x0a, bad_utf8.len() as u8];
        inner.extend_from_slice(&bad_utf8);
        inner.extend_from_slice(&[0x12, 1, b's']);
        let mut msg = vec![0x0a, inner.len() as u8];
        msg.extend_from_slice(&inner);
        grpc_push(&msg);
        let err = userseg_api::decode::push_proto(&msg).map(|_| ()).unwrap_err();
        prop_assert!(err.message.contains("UTF-8"), "{}", err.message);
    }

    #[test]
    fn kafka_records(
        pairs in proptest::collection::vec(("\\PC{0,8}", "[a-z.]{0,8}", any::<i64>()), 0..6),
        ms in mutations(),
    ) {
        let pairs: Vec<Pair> = pairs.into_iter().map(|(user_id, segment, ts)| Pair { user_id, segment, ts }).collect();
        let bytes = userseg_kafka::encode_batch(&pairs);
        kafka_record(&bytes);
        kafka_record(&mutate(bytes, &ms));
    }

    #[test]
    fn wal_logs(
        records in proptest::collection::vec(proptest::collection::vec(("\\PC{0,8}", "[a-z]{1,8}", any::<i64>()), 0..4), 1..4),
        ms in mutations(),
    ) {
        let mut log = Vec::new();
        let mut payloads = Vec::new();
        for r in records {
            let pairs: Vec<Pair> = r.into_iter().map(|(user_id, segment, ts)| Pair { user_id, segment, ts }).collect();
            let start = log.len();
            userseg_embedded::wal::codec::encode_record(&pairs, &mut log);
            payloads.push(log[start + 8..].to_vec());
        }
        wal_record(&log);
        wal_record(&mutate(log, &ms));
        // Mutated payloads behind valid checksums.
        let mutated: Vec<Vec<u8>> = payloads.into_iter().map(|p| mutate(p, &ms)).collect();
        wal_record(&join_chunks(&mutated));
    }

    #[test]
    fn snapshots(
        pairs in proptest::collection::vec(("[a-z0-9]{1,6}", "[a-z]{1,4}", 0..20_000i64), 0..40),
        ms in proptest::collection::vec(mutation(), 1..3),
    ) {
        let pairs: Vec<Pair> = pairs.into_iter().map(|(user_id, segment, age)| Pair { user_id, segment, ts: NOW - age * 60 }).collect();
        let good = snapshot_bytes(&pairs);
        snapshot_file(&good);
        let mut bad = mutate(good, &ms);
        snapshot_file(&bad);
        fix_snapshot_checksums(&mut bad);
        snapshot_file(&bad);
    }

    #[test]
    fn history_files(
        names in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("sports"), Just("x")], 0..4),
        samples in proptest::collection::vec((0..86_400i64, proptest::collection::vec((0..6u32, any::<u64>()), 0..4)), 0..5),
        ms in mutations(),
    ) {
        let day = HISTORY_DAY * 86_400;
        let mut samples: Vec<(i64, Vec<(u32, u64)>)> = samples.into_iter().map(|(t, c)| (day + t, c)).collect();
        samples.sort_by_key(|s| s.0);
        let chunks = history_chunks(&names, &samples);
        history_file(&join_chunks(&chunks));
        let mutated: Vec<Vec<u8>> = chunks.into_iter().map(|c| mutate(c, &ms)).collect();
        history_file(&join_chunks(&mutated));
    }

    #[test]
    fn keys_files(
        name in prop_oneof!["[a-z0-9-]{0,12}", "\\PC{0,6}"],
        sha in prop_oneof!["[0-9a-f]{64}", "[0-9a-fA-Z ]{0,70}"],
        roles in proptest::collection::vec(prop_oneof![Just("ingest"), Just("read"), Just("members"), Just("admin"), Just("root"), Just("")], 0..4),
        twice in any::<bool>(),
        ms in mutations(),
    ) {
        let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
        let key = format!("[[key]]\nname = \"{name}\"\nsha256 = \"{sha}\"\nroles = [{}]\n", roles.join(", "));
        let text = if twice { format!("{key}\n{key}") } else { key };
        keys_file(text.as_bytes());
        keys_file(&mutate(text.into_bytes(), &ms));
    }

    #[test]
    fn expressions(
        tokens in proptest::collection::vec(prop_oneof![
            Just("AND"), Just("OR"), Just("NOT"), Just("and"), Just("("), Just(")"), Just(" "),
            Just("sports"), Just("news"), Just("a.b:c-d_e"), Just("é"), Just("\u{0}"), Just("(((("), Just("))"),
        ], 0..24),
        depth in 0..300usize,
    ) {
        expr(tokens.join(" ").as_bytes());
        expr(tokens.concat().as_bytes());
        expr(nested(depth, "(", ")", "a").as_bytes());
        expr(nested(depth, "NOT ", "", "a").as_bytes());
    }

    #[test]
    fn durations_and_queries(
        amount in prop_oneof![any::<u64>().prop_map(|n| n.to_string()), "[0-9]{0,30}", Just("18446744073709551616".to_string())],
        unit in prop_oneof![Just("s"), Just("m"), Just("h"), Just("d"), Just("w"), Just(""), Just("x"), Just("ms")],
        more in "[0-9smhdw%&=+a-z]{0,12}",
    ) {
        params(format!("{amount}{unit}").as_bytes());
        params(format!("{amount}{unit}{more}").as_bytes());
        params(format!("within={amount}{unit}&q={more}").as_bytes());
        params(format!("within=1d&within={amount}").as_bytes());
        params(format!("from={amount}&to=-{amount}&step={amount}{unit}").as_bytes());
    }
}

/// Nesting past serde_json's recursion limit is an error with a message, not a stack overflow.
#[test]
fn deep_json_nesting_is_refused() {
    for depth in [127, 128, 129, 10_000, 100_000] {
        let arrays = nested(depth, "[", "]", "");
        let objects = nested(depth, "{\"pairs\":", "}", "[]");
        for body in [&arrays, &objects] {
            http_json(body.as_bytes());
            http_ndjson(body.as_bytes());
            delete_body(body.as_bytes());
        }
        if depth > 128 {
            let e = userseg_api::decode::push_json(arrays.as_bytes())
                .map(|_| ())
                .unwrap_err();
            assert!(
                e.message.contains("recursion limit") || e.message.contains("invalid type"),
                "{}",
                e.message
            );
        }
    }
}

/// The first and last seconds of i64 and a float as `ts`: refused or rejected by validation,
/// never wrapped into a plausible time.
#[test]
fn ts_bounds_and_floats() {
    for ts in [
        i64::MIN.to_string(),
        i64::MAX.to_string(),
        "9223372036854775808".into(),
        "1.5".into(),
        "1e3".into(),
        "-0".into(),
    ] {
        let body = format!("{{\"pairs\":[{{\"user_id\":\"u\",\"segment\":\"s\",\"ts\":{ts}}}]}}");
        match userseg_api::decode::push_json(body.as_bytes()) {
            Ok(pairs) => {
                let p = pairs[0].clone().validate(NOW, window());
                if ts != "-0" {
                    assert!(p.is_err(), "ts {ts} was accepted: {p:?}");
                }
            }
            Err(e) => assert!(e.message.contains("ts"), "{ts}: {}", e.message),
        }
    }
}

/// Every seed decodes (the seeds are valid inputs, so the targets start from real code paths).
#[test]
fn seeds_are_valid() {
    assert!(userseg_api::decode::push_json(&(TARGETS[0].seeds)()[0]).is_ok());
    assert!(userseg_api::decode::push_proto(&(TARGETS[3].seeds)()[0]).is_ok());
    assert!(userseg_kafka::decode_batch(&(TARGETS[4].seeds)()[0]).is_ok());
    for t in TARGETS {
        assert!(!(t.seeds)().is_empty(), "{}", t.name);
        for s in (t.seeds)() {
            (t.run)(&s);
        }
    }
}
