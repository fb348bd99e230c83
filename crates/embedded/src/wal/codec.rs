//! Encoding of one log record: a batch of pairs, or a deletion of users.
//!
//! Frame: len u32 LE, crc32 u32 LE of the payload, payload. Pairs payload: varint count, then
//! per pair varint len + user id, varint len + segment, zigzag varint ts. Deletion payload:
//! bytes `00 DE`, varint count, then per user varint len + user id (a pairs payload starting
//! with a count of 0 is exactly one byte long, so the two never collide and logs written before
//! deletions existed read as before).

use userseg_domain::{Pair, Record, UserDeletion};

const DELETION_MARK: [u8; 2] = [0x00, 0xDE];

pub const FRAME_HEADER: usize = 8;

pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

pub(crate) fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Appends one framed record holding `pairs` to `out`.
pub fn encode_record(pairs: &[Pair], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    put_varint(out, pairs.len() as u64);
    for p in pairs {
        put_varint(out, p.user_id.len() as u64);
        out.extend_from_slice(p.user_id.as_bytes());
        put_varint(out, p.segment.len() as u64);
        out.extend_from_slice(p.segment.as_bytes());
        put_varint(out, ((p.ts << 1) ^ (p.ts >> 63)) as u64);
    }
    finish_frame(out, start);
}

/// Appends one framed record holding a deletion to `out`.
pub fn encode_deletion(deletion: &UserDeletion, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.extend_from_slice(&DELETION_MARK);
    put_varint(out, deletion.len() as u64);
    for id in deletion.user_ids() {
        put_varint(out, id.len() as u64);
        out.extend_from_slice(id.as_bytes());
    }
    finish_frame(out, start);
}

pub(crate) fn finish_frame(out: &mut [u8], start: usize) {
    let payload = &out[start + FRAME_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub(crate) fn get_str(buf: &[u8], pos: &mut usize) -> Option<String> {
    let n = get_varint(buf, pos)? as usize;
    let bytes = buf.get(*pos..pos.checked_add(n)?)?;
    *pos += n;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Decodes a payload (without its frame header).
pub fn decode(payload: &[u8]) -> Option<Record> {
    if let Some(rest) = payload.strip_prefix(&DELETION_MARK) {
        let mut pos = 0;
        let n = get_varint(rest, &mut pos)? as usize;
        let mut ids = Vec::with_capacity(n.min(rest.len()));
        for _ in 0..n {
            ids.push(get_str(rest, &mut pos)?);
        }
        if pos != rest.len() {
            return None;
        }
        return UserDeletion::from_log(ids).ok().map(Record::DeleteUsers);
    }
    decode_payload(payload).map(Record::Pairs)
}

/// Decodes a pairs payload (without its frame header).
pub fn decode_payload(payload: &[u8]) -> Option<Vec<Pair>> {
    let mut pos = 0;
    let n = get_varint(payload, &mut pos)? as usize;
    let mut pairs = Vec::with_capacity(n.min(payload.len() / 3));
    for _ in 0..n {
        let user_id = get_str(payload, &mut pos)?;
        let segment = get_str(payload, &mut pos)?;
        let z = get_varint(payload, &mut pos)?;
        let ts = ((z >> 1) as i64) ^ -((z & 1) as i64);
        pairs.push(Pair {
            user_id,
            segment,
            ts,
        });
    }
    (pos == payload.len()).then_some(pairs)
}

/// Result of reading a frame at the start of `buf`.
pub enum Frame<'a> {
    /// A complete, checksummed record and its total framed length.
    Ok(&'a [u8], usize),
    /// Not enough bytes for a whole frame (a torn write at the tail).
    Incomplete,
    /// The checksum does not match.
    Corrupt,
}

pub fn read_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < FRAME_HEADER {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let Some(payload) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Incomplete;
    };
    if crc32fast::hash(payload) != crc {
        return Frame::Corrupt;
    }
    Frame::Ok(payload, FRAME_HEADER + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec(("\\PC{1,20}", "[a-z:._-]{1,10}", any::<i64>()), 0..50)) {
            let pairs: Vec<Pair> = pairs.into_iter().map(|(u, s, ts)| Pair { user_id: u, segment: s, ts }).collect();
            let mut buf = Vec::new();
            encode_record(&pairs, &mut buf);
            match read_frame(&buf) {
                Frame::Ok(payload, n) => {
                    prop_assert_eq!(n, buf.len());
                    prop_assert_eq!(decode_payload(payload), Some(pairs));
                }
                _ => prop_assert!(false, "frame did not read back"),
            }
            // Every strict prefix is incomplete, never a wrong record.
            for cut in 0..buf.len() {
                prop_assert!(matches!(read_frame(&buf[..cut]), Frame::Incomplete));
            }
        }
    }

    proptest! {
        #[test]
        fn deletions_round_trip(ids in proptest::collection::btree_set("[a-z0-9 /é]{1,20}", 1..50)) {
            let d = UserDeletion::new(ids.into_iter().collect()).unwrap();
            let mut buf = Vec::new();
            encode_deletion(&d, &mut buf);
            match read_frame(&buf) {
                Frame::Ok(payload, n) => {
                    prop_assert_eq!(n, buf.len());
                    prop_assert_eq!(decode(payload), Some(Record::DeleteUsers(d)));
                }
                _ => prop_assert!(false, "frame did not read back"),
            }
        }
    }

    #[test]
    fn pairs_records_still_decode_as_pairs() {
        for n in [0usize, 1, 3] {
            let pairs: Vec<Pair> = (0..n)
                .map(|i| Pair {
                    user_id: format!("u{i}"),
                    segment: "s".into(),
                    ts: i as i64,
                })
                .collect();
            let mut buf = Vec::new();
            encode_record(&pairs, &mut buf);
            let Frame::Ok(payload, _) = read_frame(&buf) else {
                panic!("frame")
            };
            assert_eq!(decode(payload), Some(Record::Pairs(pairs)));
        }
    }

    #[test]
    fn flipped_bit_is_corrupt() {
        let mut buf = Vec::new();
        encode_record(
            &[Pair {
                user_id: "u".into(),
                segment: "s".into(),
                ts: 5,
            }],
            &mut buf,
        );
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(read_frame(&buf), Frame::Corrupt));
    }
}
