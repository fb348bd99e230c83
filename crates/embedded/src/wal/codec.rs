//! Encoding of one log record: a batch of pairs.
//!
//! Frame: len u32 LE, crc32 u32 LE of the payload, payload. Payload: varint count, then per
//! pair varint len + user id, varint len + segment, zigzag varint ts.

use userseg_domain::Pair;

pub const FRAME_HEADER: usize = 8;

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
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
    let payload = &out[start + FRAME_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn get_str(buf: &[u8], pos: &mut usize) -> Option<String> {
    let n = get_varint(buf, pos)? as usize;
    let bytes = buf.get(*pos..pos.checked_add(n)?)?;
    *pos += n;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Decodes a payload (without its frame header).
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
