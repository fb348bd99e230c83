//! Request bodies written straight from [`GenPair`]s: the protobuf `PushRequest` (for gRPC, sent
//! pre-encoded through a pass-through codec) and JSON / NDJSON (for HTTP). One buffer per batch,
//! no allocation per pair: user ids are the prefix plus the decimal user index, segment names
//! are formatted once.

use bytes::{BufMut, BytesMut};

use crate::workload::GenPair;

/// Characters allowed in the user id and segment prefixes: the segment name alphabet, which
/// needs no escaping in JSON either.
pub(crate) fn valid_prefix(p: &str) -> bool {
    p.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The strings of a run: user ids are `user_prefix` + index, segments `segment_prefix` + index.
#[derive(Clone, Debug)]
pub struct Names {
    user_prefix: Box<[u8]>,
    segments: Vec<Box<str>>,
}

/// Decimal digits of `n`, written at the end of `buf`; returns the start index.
#[inline]
fn digits(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

#[inline]
fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least 1.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[inline]
fn put_i64(out: &mut BytesMut, v: i64) {
    let mut buf = [0u8; 20];
    if v < 0 {
        out.put_u8(b'-');
    }
    let start = digits(v.unsigned_abs(), &mut buf);
    out.put_slice(&buf[start..]);
}

impl Names {
    pub fn new(user_prefix: &str, segment_prefix: &str, segments: u32) -> Names {
        Names {
            user_prefix: user_prefix.as_bytes().into(),
            segments: (0..segments)
                .map(|s| format!("{segment_prefix}{s}").into_boxed_str())
                .collect(),
        }
    }

    pub fn segment(&self, s: u32) -> &str {
        &self.segments[s as usize]
    }

    pub fn segments(&self) -> &[Box<str>] {
        &self.segments
    }

    pub fn user_id(&self, user: u32) -> String {
        let mut buf = [0u8; 20];
        let start = digits(u64::from(user), &mut buf);
        let mut s = String::from_utf8_lossy(&self.user_prefix).into_owned();
        s.push_str(std::str::from_utf8(&buf[start..]).unwrap_or_default());
        s
    }

    fn longest(&self) -> usize {
        self.user_prefix.len() + 10 + self.segments.iter().map(|s| s.len()).max().unwrap_or(0)
    }

    /// The protobuf encoding of `PushRequest { pairs }` (fields: pairs = 1; Pair: user_id = 1,
    /// segment = 2, optional int64 ts = 3).
    pub fn protobuf(&self, pairs: &[GenPair], out: &mut BytesMut) {
        out.reserve(pairs.len() * (self.longest() + 20));
        let mut buf = [0u8; 20];
        for p in pairs {
            let start = digits(u64::from(p.user), &mut buf);
            let uid_len = self.user_prefix.len() + (20 - start);
            let seg = self.segments[p.segment as usize].as_bytes();
            let mut len = 1 + varint_len(uid_len as u64) + uid_len;
            len += 1 + varint_len(seg.len() as u64) + seg.len();
            if let Some(ts) = p.ts {
                len += 1 + varint_len(ts as u64);
            }
            out.put_u8(0x0a);
            put_varint(out, len as u64);
            out.put_u8(0x0a);
            put_varint(out, uid_len as u64);
            out.put_slice(&self.user_prefix);
            out.put_slice(&buf[start..]);
            out.put_u8(0x12);
            put_varint(out, seg.len() as u64);
            out.put_slice(seg);
            if let Some(ts) = p.ts {
                out.put_u8(0x18);
                put_varint(out, ts as u64);
            }
        }
    }

    fn json_pair(&self, p: &GenPair, out: &mut BytesMut, buf: &mut [u8; 20]) {
        out.put_slice(b"{\"user_id\":\"");
        out.put_slice(&self.user_prefix);
        let start = digits(u64::from(p.user), buf);
        out.put_slice(&buf[start..]);
        out.put_slice(b"\",\"segment\":\"");
        out.put_slice(self.segments[p.segment as usize].as_bytes());
        out.put_u8(b'"');
        if let Some(ts) = p.ts {
            out.put_slice(b",\"ts\":");
            put_i64(out, ts);
        }
        out.put_u8(b'}');
    }

    /// `{"pairs":[{"user_id":..,"segment":..,"ts":..},..]}`
    pub fn json(&self, pairs: &[GenPair], out: &mut BytesMut) {
        out.reserve(12 + pairs.len() * (self.longest() + 60));
        let mut buf = [0u8; 20];
        out.put_slice(b"{\"pairs\":[");
        for (i, p) in pairs.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            self.json_pair(p, out, &mut buf);
        }
        out.put_slice(b"]}");
    }

    /// One JSON pair per line.
    pub fn ndjson(&self, pairs: &[GenPair], out: &mut BytesMut) {
        out.reserve(pairs.len() * (self.longest() + 60));
        let mut buf = [0u8; 20];
        for p in pairs {
            self.json_pair(p, out, &mut buf);
            out.put_u8(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use userseg_proto::v1::{Pair, PushRequest};

    use super::*;

    fn sample() -> (Names, Vec<GenPair>) {
        let names = Names::new("user-", "seg-", 300);
        let pairs = vec![
            GenPair {
                user: 0,
                segment: 0,
                ts: None,
            },
            GenPair {
                user: 4_294_967_295,
                segment: 299,
                ts: Some(1_764_000_000),
            },
            GenPair {
                user: 127,
                segment: 128,
                ts: Some(-5),
            },
            GenPair {
                user: 12_345,
                segment: 7,
                ts: Some(1),
            },
        ];
        (names, pairs)
    }

    fn expected(names: &Names, pairs: &[GenPair]) -> PushRequest {
        PushRequest {
            pairs: pairs
                .iter()
                .map(|p| Pair {
                    user_id: names.user_id(p.user),
                    segment: names.segment(p.segment).to_owned(),
                    ts: p.ts,
                })
                .collect(),
        }
    }

    #[test]
    fn protobuf_matches_prost() {
        let (names, pairs) = sample();
        let mut out = BytesMut::new();
        names.protobuf(&pairs, &mut out);
        let want = expected(&names, &pairs);
        assert_eq!(out.as_ref(), want.encode_to_vec().as_slice());
        assert_eq!(PushRequest::decode(out.freeze()).unwrap(), want);
        // A long prefix needs multi-byte lengths.
        let names = Names::new(&"u".repeat(200), "s", 2);
        let mut out = BytesMut::new();
        names.protobuf(&pairs[..1], &mut out);
        assert_eq!(
            out.as_ref(),
            expected(&names, &pairs[..1]).encode_to_vec().as_slice()
        );
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn json_and_ndjson_parse_back() {
        let (names, pairs) = sample();
        let mut out = BytesMut::new();
        names.json(&pairs, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let arr = v["pairs"].as_array().unwrap();
        assert_eq!(arr.len(), 4);
        assert_eq!(
            arr[0],
            serde_json::json!({"user_id": "user-0", "segment": "seg-0"})
        );
        assert_eq!(
            arr[1],
            serde_json::json!({"user_id": "user-4294967295", "segment": "seg-299", "ts": 1_764_000_000})
        );
        assert_eq!(arr[2]["ts"], -5);
        let mut out = BytesMut::new();
        names.ndjson(&pairs, &mut out);
        let lines: Vec<serde_json::Value> = out
            .as_ref()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.as_slice(), arr.as_slice());
    }

    #[test]
    fn prefixes() {
        assert!(valid_prefix("seg-"));
        assert!(valid_prefix(""));
        assert!(!valid_prefix("a\"b"));
        assert!(!valid_prefix("a b"));
    }
}
