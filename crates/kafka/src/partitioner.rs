//! Kafka's default partitioner for keyed records, bit for bit as the Java client computes it
//! (`Utils.toPositive(Utils.murmur2(key)) % numPartitions`), so a user lands in the same
//! partition whether a Java client or userseg wrote it.

/// Kafka's 32-bit murmur2 (seed `0x9747b28c`), returned as the Java `int` it computes.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;

    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions` (> 0).
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    debug_assert!(partitions > 0);
    let positive = murmur2(key) & 0x7fff_ffff;
    positive % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From the Java client's `UtilsTest.testMurmur2`.
    #[test]
    fn java_client_vectors() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    /// Every tail length (0..=3 trailing bytes), from the Java implementation.
    #[test]
    fn tail_lengths() {
        let cases: [(&[u8], i32); 5] = [
            (b"1", -1_993_445_489),
            (b"12", 126_087_238),
            (b"123", -267_702_483),
            (b"1234", -1_614_185_708),
            (b"12345", -1_188_365_604),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn partitions_are_positive_and_stable() {
        // murmur2("21") is negative; toPositive masks the sign bit (not abs()).
        assert_eq!(
            partition_for(b"21", 1000),
            (-973_932_308i32 & 0x7fff_ffff) % 1000
        );
        for n in [1, 2, 3, 6, 7, 100] {
            for i in 0..1000 {
                let key = format!("user-{i}");
                let p = partition_for(key.as_bytes(), n);
                assert!((0..n).contains(&p));
                assert_eq!(p, partition_for(key.as_bytes(), n));
            }
        }
        // Non-ASCII keys hash their UTF-8 bytes, like Java's StringSerializer.
        let p = partition_for("用户".as_bytes(), 6);
        assert!((0..6).contains(&p));
    }
}
