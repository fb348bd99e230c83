//! Per-segment counts of members by the time bucket of their latest ts, in a ring that covers
//! one window plus the accepted future skew. Block sums make a window sum cost about
//! `ring_len / BLOCK + 2 * BLOCK` additions instead of `ring_len`. On top of that the ring keeps
//! the sum of the last `win` buckets below its top up to date, so an estimate at the time of the
//! latest data costs O(1) and one at another time only sums the difference.

const BLOCK: usize = 256;

pub(crate) struct Ring {
    len: i64,
    /// Highest bucket held; the ring holds buckets `(top - len, top]`.
    top: i64,
    blocks: Vec<Option<Box<[u32; BLOCK]>>>,
    block_sums: Vec<u64>,
    /// Buckets of the cached sum: `(top - win, top]` (`win < len`).
    win: i64,
    /// Sum of the counts of `(top - win, top]`.
    cached: u64,
}

impl Ring {
    /// A ring of `len` buckets caching the sum of the top `win` of them.
    pub(crate) fn new(len: i64, win: i64) -> Ring {
        let len = len.max(1);
        let nblocks = (len as usize).div_ceil(BLOCK);
        Ring {
            len,
            top: i64::MIN / 2,
            blocks: (0..nblocks).map(|_| None).collect(),
            block_sums: vec![0; nblocks],
            win: win.clamp(0, len - 1),
            cached: 0,
        }
    }

    pub(crate) fn len(&self) -> i64 {
        self.len
    }

    #[inline]
    fn cached_lo(&self) -> i64 {
        self.top - self.win
    }

    #[inline]
    pub(crate) fn top(&self) -> i64 {
        self.top
    }

    #[inline]
    pub(crate) fn holds(&self, bucket: i64) -> bool {
        bucket > self.top - self.len && bucket <= self.top
    }

    #[inline]
    fn slot(&self, bucket: i64) -> usize {
        bucket.rem_euclid(self.len) as usize
    }

    /// Moves the top to `bucket` if it is higher, clearing the slots that come back into use.
    pub(crate) fn advance(&mut self, bucket: i64) {
        if bucket <= self.top {
            return;
        }
        if bucket - self.top >= self.len {
            for (b, s) in self.blocks.iter_mut().zip(self.block_sums.iter_mut()) {
                *b = None;
                *s = 0;
            }
            self.cached = 0;
        } else {
            // Buckets leaving the cached range, counted while the ring still holds them.
            let old_lo = self.cached_lo();
            let new_lo = (bucket - self.win).min(self.top);
            if new_lo > old_lo {
                self.cached -= self.sum_range(old_lo, new_lo);
            }
            for b in self.top + 1..=bucket {
                let slot = self.slot(b);
                let (blk, i) = (slot / BLOCK, slot % BLOCK);
                if let Some(block) = &mut self.blocks[blk] {
                    self.block_sums[blk] -= u64::from(block[i]);
                    block[i] = 0;
                }
            }
        }
        self.top = bucket;
    }

    /// Adds one member to a held bucket.
    #[inline]
    pub(crate) fn inc(&mut self, bucket: i64) {
        debug_assert!(self.holds(bucket));
        let slot = self.slot(bucket);
        let (blk, i) = (slot / BLOCK, slot % BLOCK);
        let block = self.blocks[blk].get_or_insert_with(|| Box::new([0; BLOCK]));
        block[i] += 1;
        self.block_sums[blk] += 1;
        if bucket > self.cached_lo() {
            self.cached += 1;
        }
    }

    /// Removes one member from a held bucket.
    #[inline]
    pub(crate) fn dec(&mut self, bucket: i64) {
        debug_assert!(self.holds(bucket));
        let slot = self.slot(bucket);
        let (blk, i) = (slot / BLOCK, slot % BLOCK);
        if let Some(block) = &mut self.blocks[blk] {
            if block[i] > 0 {
                block[i] -= 1;
                self.block_sums[blk] -= 1;
                if bucket > self.top - self.win {
                    self.cached -= 1;
                }
            }
        }
    }

    fn sum_slots(&self, from: usize, to: usize) -> u64 {
        // Sum of slots [from, to).
        let mut total = 0;
        let mut s = from;
        while s < to {
            let blk = s / BLOCK;
            let block_start = blk * BLOCK;
            let block_end = block_start + BLOCK;
            if s == block_start && to >= block_end {
                total += self.block_sums[blk];
                s = block_end;
            } else {
                let end = to.min(block_end);
                if let Some(block) = &self.blocks[blk] {
                    total += block[s - block_start..end - block_start]
                        .iter()
                        .map(|&c| u64::from(c))
                        .sum::<u64>();
                }
                s = end;
            }
        }
        total
    }

    /// Members whose bucket is in `(lo, top]`.
    pub(crate) fn sum_above(&self, lo: i64) -> u64 {
        let lo = lo.max(self.top - self.len);
        if lo >= self.top {
            return 0;
        }
        let c = self.cached_lo();
        match lo.cmp(&c) {
            std::cmp::Ordering::Equal => self.cached,
            std::cmp::Ordering::Greater => self.cached - self.sum_range(c, lo),
            std::cmp::Ordering::Less => self.cached + self.sum_range(lo, c),
        }
    }

    /// Members whose bucket is in `(lo, hi]`, clipped to the buckets held.
    pub(crate) fn count_range(&self, lo: i64, hi: i64) -> u64 {
        let lo = lo.max(self.top - self.len);
        let hi = hi.min(self.top);
        if lo >= hi {
            return 0;
        }
        self.sum_range(lo, hi)
    }

    /// Members whose bucket is in `(lo, hi]`, for `top - len <= lo < hi <= top`.
    fn sum_range(&self, lo: i64, hi: i64) -> u64 {
        debug_assert!(lo >= self.top - self.len && hi <= self.top);
        if lo >= hi {
            return 0;
        }
        let first = self.slot(lo + 1);
        let count = (hi - lo) as usize;
        let len = self.len as usize;
        if first + count <= len {
            self.sum_slots(first, first + count)
        } else {
            self.sum_slots(first, len) + self.sum_slots(0, first + count - len)
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.blocks.len() * 8
            + self.block_sums.len() * 8
            + self.blocks.iter().filter(|b| b.is_some()).count() * BLOCK * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_plain_map(ops in proptest::collection::vec((0u8..4, 0i64..3000), 1..300), len in 1i64..1200, win in 0i64..1200) {
            let mut ring = Ring::new(len, win);
            let mut model: std::collections::BTreeMap<i64, u64> = Default::default();
            let mut top = i64::MIN / 2;
            for (op, x) in ops {
                match op {
                    0 => { ring.advance(x); top = top.max(x); model.retain(|b, _| *b > top - len); }
                    1 => if ring.holds(x) { ring.inc(x); *model.entry(x).or_default() += 1; },
                    2 => if ring.holds(x) && model.get(&x).copied().unwrap_or(0) > 0 { ring.dec(x); *model.entry(x).or_default() -= 1; },
                    _ => {
                        let want: u64 = model.iter().filter(|(b, _)| **b > x && **b <= top).map(|(_, c)| *c).sum();
                        prop_assert_eq!(ring.sum_above(x), want);
                    }
                }
            }
        }
    }
}
