//! Interns user ids into dense `u32` indices, so that each membership costs a few bytes.

use foldhash::fast::FixedState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};

/// Bytes per arena block; an entry never straddles two blocks.
const BLOCK_BYTES: usize = 1 << 20;
/// Bits of the in-block position in a packed location.
const POS_BITS: u32 = 20;

/// Append-only dictionary of user ids.
///
/// Ids live in an arena of fixed 1 MiB blocks, in index order, each entry being the index
/// (u32), the length of the id as a LEB128 varint and the id. The hash table holds 5-byte packed
/// locations (block, position) of entries plus a 1-byte tag, so a lookup touches one table slot
/// (usually) and one arena entry, and both can be fetched ahead ([`UserDict::touch_slot`],
/// [`UserDict::touch_entry`]). Nothing is reallocated by doubling except the hash table: about
/// 5 + len bytes per user plus the table (6 bytes a slot).
#[derive(Default)]
pub struct UserDict {
    blocks: Vec<Vec<u8>>,
    len: usize,
    erased: usize,
    table: Table,
    hasher: FixedState,
}

/// Open addressing with linear probing (the dictionary never deletes): a power-of-two number of
/// 6-byte slots, each a packed location and a tag (0: empty, else 0x80 | 7 hash bits), at most
/// 4/5 full.
#[derive(Default)]
struct Table {
    slots: Vec<[u8; 6]>,
    len: usize,
}

/// The tag of a slot whose entry was erased: never equal to a live tag (those have the top bit
/// set), not empty either, so probes go on past it.
const TOMBSTONE: u8 = 0x01;

#[inline]
fn tag_of(hash: u64) -> u8 {
    0x80 | (hash >> 57) as u8
}

#[inline]
fn loc_of(slot: [u8; 6]) -> [u8; 5] {
    [slot[0], slot[1], slot[2], slot[3], slot[4]]
}

impl Table {
    fn with_capacity(n: usize) -> Table {
        let mut t = Table::default();
        if n > 0 {
            t.slots = vec![[0; 6]; Table::buckets_for(n)];
        }
        t
    }

    /// Slots for `n` entries at a load of at most 4/5.
    fn buckets_for(n: usize) -> usize {
        (n + n / 4 + 1).next_power_of_two().max(16)
    }

    #[inline]
    fn home(&self, hash: u64) -> usize {
        hash as usize & (self.slots.len().wrapping_sub(1))
    }

    /// The location of the entry with `hash` for which `eq` holds, or the empty slot to put it.
    #[inline]
    fn find(&self, hash: u64, mut eq: impl FnMut([u8; 5]) -> bool) -> Result<[u8; 5], usize> {
        let mask = self.slots.len() - 1;
        let tag = tag_of(hash);
        let mut i = hash as usize & mask;
        loop {
            let s = self.slots[i];
            if s[5] == 0 {
                return Err(i);
            }
            if s[5] == tag && eq(loc_of(s)) {
                return Ok(loc_of(s));
            }
            i = (i + 1) & mask;
        }
    }

    fn full(&self) -> bool {
        self.slots.is_empty() || (self.len + 1) * 5 > self.slots.len() * 4
    }

    fn put(&mut self, i: usize, hash: u64, loc: [u8; 5]) {
        let [a, b, c, d, e] = loc;
        self.slots[i] = [a, b, c, d, e, tag_of(hash)];
        self.len += 1;
    }

    /// Doubles the slots, rehashing every entry with `hash_of` (erased entries are dropped).
    fn grow(&mut self, hash_of: impl Fn([u8; 5]) -> u64) {
        let n = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![[0; 6]; n]);
        let mask = n - 1;
        self.len = 0;
        for s in old {
            if s[5] == 0 || s[5] == TOMBSTONE {
                continue;
            }
            self.len += 1;
            let mut i = hash_of(loc_of(s)) as usize & mask;
            while self.slots[i][5] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = s;
        }
    }
}

/// The index and id of the entry at `pos` of `block`, and the position after it.
#[inline]
fn entry_at(block: &[u8], mut pos: usize) -> (u32, &[u8], usize) {
    let idx = u32::from_le_bytes([block[pos], block[pos + 1], block[pos + 2], block[pos + 3]]);
    pos += 4;
    let mut n = 0usize;
    let mut shift = 0;
    loop {
        let b = block[pos];
        pos += 1;
        n |= usize::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
        shift += 7;
    }
    (idx, &block[pos..pos + n], pos + n)
}

/// The live entries of one block (or a copy of it): erased ids (all zero bytes; a valid id never
/// starts with NUL) are skipped.
pub(super) fn entries(block: &[u8]) -> impl Iterator<Item = (u32, &[u8])> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < block.len() {
            let (idx, id, next) = entry_at(block, pos);
            pos = next;
            if id.first().is_some_and(|&b| b != 0) {
                return Some((idx, id));
            }
        }
        None
    })
}

#[inline]
fn at(blocks: &[Vec<u8>], loc: [u8; 5]) -> (u32, &[u8]) {
    let loc = u64::from_le_bytes([loc[0], loc[1], loc[2], loc[3], loc[4], 0, 0, 0]);
    let block = &blocks[(loc >> POS_BITS) as usize];
    let (idx, id, _) = entry_at(block, (loc & ((1 << POS_BITS) - 1)) as usize);
    (idx, id)
}

impl UserDict {
    pub fn with_capacity(users: usize, _bytes: usize) -> Self {
        UserDict {
            table: Table::with_capacity(users),
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every `(index, id)` in index order, erased ids left out. Ids are stored from valid
    /// `&str`s, so the bytes are UTF-8.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        self.blocks.iter().flat_map(|block| entries(block))
    }

    /// Arena blocks (each a run of whole entries, in index order).
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Appends a copy of block `b`'s entries to `out` (for scanning without holding the lock).
    pub fn copy_block(&self, b: usize, out: &mut Vec<u8>) {
        if let Some(block) = self.blocks.get(b) {
            out.extend_from_slice(block);
        }
    }

    /// The index of `id` if it is interned (and not erased).
    pub fn get_hashed(&self, hash: u64, id: &[u8]) -> Option<u32> {
        if self.table.slots.is_empty() {
            return None;
        }
        let blocks = &self.blocks;
        self.table
            .find(hash, |l| at(blocks, l).1 == id)
            .ok()
            .map(|loc| at(blocks, loc).0)
    }

    /// Erases `id`: its bytes in the arena are overwritten with zeros and its slot becomes a
    /// tombstone, so it is found no more and [`UserDict::iter`] skips it. Its index is never
    /// handed out again; interning the same id later gives a new index. Returns the index.
    pub fn erase_hashed(&mut self, hash: u64, id: &[u8]) -> Option<u32> {
        if self.table.slots.is_empty() {
            return None;
        }
        let mask = self.table.slots.len() - 1;
        let tag = tag_of(hash);
        let mut i = hash as usize & mask;
        loop {
            let s = self.table.slots[i];
            if s[5] == 0 {
                return None;
            }
            if s[5] == tag && at(&self.blocks, loc_of(s)).1 == id {
                break;
            }
            i = (i + 1) & mask;
        }
        let loc = loc_of(self.table.slots[i]);
        self.table.slots[i][5] = TOMBSTONE;
        let l = u64::from_le_bytes([loc[0], loc[1], loc[2], loc[3], loc[4], 0, 0, 0]);
        let block = &mut self.blocks[(l >> POS_BITS) as usize];
        let pos = (l & ((1 << POS_BITS) - 1)) as usize;
        let (idx, id, end) = entry_at(block, pos);
        let start = end - id.len();
        block[start..end].fill(0);
        self.erased += 1;
        Some(idx)
    }

    /// Ids erased so far (their indices stay dead).
    pub fn erased(&self) -> usize {
        self.erased
    }

    /// Appends the entry of `idx`; returns its packed location.
    fn push_entry(&mut self, idx: u32, id: &[u8]) -> Option<[u8; 5]> {
        let mut head = [0u8; 14];
        head[..4].copy_from_slice(&idx.to_le_bytes());
        let mut n = id.len();
        let mut h = 4;
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                head[h] = b;
                h += 1;
                break;
            }
            head[h] = b | 0x80;
            h += 1;
        }
        let need = h + id.len();
        let fits = self
            .blocks
            .last()
            .is_some_and(|b| b.capacity() - b.len() >= need);
        if !fits {
            if self.blocks.len() >= 1 << (40 - POS_BITS) {
                return None;
            }
            // A new block; an id longer than a block gets a block of its own.
            self.blocks.push(Vec::with_capacity(need.max(BLOCK_BYTES)));
        }
        let block_idx = self.blocks.len() - 1;
        let block = self.blocks.last_mut()?;
        let pos = block.len();
        block.extend_from_slice(&head[..h]);
        block.extend_from_slice(id);
        let l = (((block_idx as u64) << POS_BITS) | pos as u64).to_le_bytes();
        Some([l[0], l[1], l[2], l[3], l[4]])
    }

    /// The index of `id`, adding it if new. Fails only when 2^32 users are interned.
    pub fn intern(&mut self, id: &[u8]) -> Option<u32> {
        self.intern_hashed(self.hasher.hash_one(id), id)
    }

    /// [`UserDict::intern`] with `hash` = [`hash_id`]`(id)` computed by the caller.
    #[inline]
    pub fn intern_hashed(&mut self, hash: u64, id: &[u8]) -> Option<u32> {
        debug_assert_eq!(hash, self.hasher.hash_one(id));
        if self.table.full() {
            let (blocks, hasher) = (&self.blocks, &self.hasher);
            self.table.grow(|l| hasher.hash_one(at(blocks, l).1));
        }
        let blocks = &self.blocks;
        let slot = match self.table.find(hash, |l| at(blocks, l).1 == id) {
            Ok(loc) => return Some(at(blocks, loc).0),
            Err(slot) => slot,
        };
        let idx = u32::try_from(self.len).ok()?;
        let loc = self.push_entry(idx, id)?;
        self.len += 1;
        self.table.put(slot, hash, loc);
        Some(idx)
    }

    /// Reads the home slot of `hash`, so that a later lookup finds it in cache.
    #[inline]
    pub fn touch_slot(&self, hash: u64) {
        if let Some(s) = self.table.slots.get(self.table.home(hash)) {
            std::hint::black_box(s[5]);
        }
    }

    /// Reads the arena entry the home slot of `hash` points at if its tag matches (call some
    /// time after [`UserDict::touch_slot`]).
    #[inline]
    pub fn touch_entry(&self, hash: u64) {
        if let Some(&s) = self.table.slots.get(self.table.home(hash)) {
            if s[5] == tag_of(hash) {
                let loc = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], 0, 0, 0]);
                let block = self.blocks.get((loc >> POS_BITS) as usize);
                let pos = (loc & ((1 << POS_BITS) - 1)) as usize;
                if let Some(b) = block.and_then(|b| b.get(pos)) {
                    std::hint::black_box(*b);
                }
            }
        }
    }

    /// Bytes of memory held (the arena as used; the table by its buckets).
    pub fn memory_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(|b| b.len()).sum();
        blocks + self.table.slots.len() * 6
    }
}

/// The hash of a user id, as [`UserDict`] and [`Users`] use it.
#[inline]
pub(super) fn hash_id(id: &[u8]) -> u64 {
    FixedState::default().hash_one(id)
}

/// The user dictionary split by id hash into `n` (a power of two) [`UserDict`]s, each behind
/// its own lock, so that batches are interned by several threads.
///
/// The global index of local index `l` of shard `s` is `l * n + s`: shards fill at the same
/// pace (the hash splits users evenly), so global indices stay dense for the dense member
/// arrays. Global index `u32::MAX` is never handed out (it marks absent users elsewhere).
pub struct Users {
    shards: Box<[Mutex<UserDict>]>,
}

impl Users {
    pub fn new(shards: usize) -> Users {
        Users::with_capacity(shards, 0)
    }

    /// `shards` is rounded up to a power of two (at most 256); room for `users` users in all.
    pub fn with_capacity(shards: usize, users: usize) -> Users {
        let n = shards.clamp(1, 256).next_power_of_two();
        Users {
            shards: (0..n)
                .map(|_| Mutex::new(UserDict::with_capacity(users.div_ceil(n), 0)))
                .collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The shard of a user of hash `hash`: bits the hash table uses for neither the bucket
    /// (low bits) nor the tag (top 7 bits).
    #[inline]
    pub fn shard_of(&self, hash: u64) -> usize {
        (hash >> 48) as usize & (self.shards.len() - 1)
    }

    /// The global index of local index `local` of shard `shard`.
    #[inline]
    pub fn global(&self, shard: usize, local: u32) -> Option<u32> {
        u32::try_from(u64::from(local) * self.shards.len() as u64 + shard as u64)
            .ok()
            .filter(|&g| g != u32::MAX)
    }

    pub fn lock(&self, shard: usize) -> MutexGuard<'_, UserDict> {
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard locked, in shard order (the one order every caller locks several in).
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, UserDict>> {
        (0..self.shards.len()).map(|s| self.lock(s)).collect()
    }

    /// The global index of `id` in shards all locked by [`Users::lock_all`], adding it if new.
    #[inline]
    pub fn intern_in(&self, guards: &mut [MutexGuard<'_, UserDict>], id: &[u8]) -> Option<u32> {
        let hash = hash_id(id);
        let s = self.shard_of(hash);
        let local = guards[s].intern_hashed(hash, id)?;
        self.global(s, local)
    }

    /// [`Users::intern_in`] for an exclusively held dictionary (no locking).
    pub fn intern_mut(&mut self, id: &[u8]) -> Option<u32> {
        let hash = hash_id(id);
        let s = self.shard_of(hash);
        let local = self.shards[s]
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .intern_hashed(hash, id)?;
        self.global(s, local)
    }

    pub fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|s| {
                let d = self.lock(s);
                d.len() - d.erased()
            })
            .sum()
    }

    /// The global index of `id`, if it is interned.
    pub fn get(&self, id: &[u8]) -> Option<u32> {
        let hash = hash_id(id);
        let s = self.shard_of(hash);
        let local = self.lock(s).get_hashed(hash, id)?;
        self.global(s, local)
    }

    /// Erases `id` (see [`UserDict::erase_hashed`]); returns its global index if it was there.
    pub fn erase(&self, id: &[u8]) -> Option<u32> {
        let hash = hash_id(id);
        let s = self.shard_of(hash);
        let local = self.lock(s).erase_hashed(hash, id)?;
        self.global(s, local)
    }

    /// Calls `f(global index, id)` for every user, shard by shard and block by block, holding a
    /// shard's lock only while copying one block (at most 1 MiB) into `buf`: a scan of every
    /// user that never stalls interning for long. Stops early when `f` returns `false`.
    pub fn scan(&self, buf: &mut Vec<u8>, mut f: impl FnMut(u32, &[u8]) -> bool) {
        let n = self.shards.len() as u64;
        for s in 0..self.shards.len() {
            let mut b = 0;
            loop {
                buf.clear();
                {
                    let d = self.lock(s);
                    if b >= d.block_count() {
                        break;
                    }
                    d.copy_block(b, buf);
                }
                b += 1;
                for (local, id) in entries(buf) {
                    // Indices of present entries fit: they were handed out.
                    if !f((u64::from(local) * n + s as u64) as u32, id) {
                        return;
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One more than the largest global index handed out (0 if none).
    pub fn universe(&self) -> usize {
        let n = self.shards.len();
        (0..n)
            .map(|s| match self.lock(s).len() {
                0 => 0,
                len => (len - 1) * n + s + 1,
            })
            .max()
            .unwrap_or(0)
    }

    pub fn memory_bytes(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.lock(s).memory_bytes())
            .sum()
    }

    /// Calls `f(global index, id)` for every user in increasing index order, with every
    /// shard locked. Global index = local index × shards + shard, so the order is that of
    /// (local, shard); erased ids leave gaps in a shard's local indices, so the shards are
    /// merged by that key rather than visited in turn.
    pub fn for_each(&self, mut f: impl FnMut(u32, &[u8])) {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let guards = self.lock_all();
        let mut iters: Vec<_> = guards.iter().map(|g| g.iter()).collect();
        let n = iters.len() as u64;
        let mut next: Vec<Option<&[u8]>> = vec![None; iters.len()];
        let mut heap = BinaryHeap::with_capacity(iters.len());
        for (s, it) in iters.iter_mut().enumerate() {
            if let Some((local, id)) = it.next() {
                next[s] = Some(id);
                heap.push(Reverse((local, s)));
            }
        }
        while let Some(Reverse((local, s))) = heap.pop() {
            if let Some(id) = next[s].take() {
                // Indices of present entries fit: they were handed out.
                f((u64::from(local) * n + s as u64) as u32, id);
            }
            if let Some((local, id)) = iters[s].next() {
                next[s] = Some(id);
                heap.push(Reverse((local, s)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(d: &UserDict) -> Vec<Vec<u8>> {
        let all: Vec<(u32, Vec<u8>)> = d.iter().map(|(i, id)| (i, id.to_vec())).collect();
        for (n, (i, _)) in all.iter().enumerate() {
            assert_eq!(*i as usize, n);
        }
        all.into_iter().map(|(_, id)| id).collect()
    }

    #[test]
    fn interning_is_stable_and_dense() {
        let mut d = UserDict::default();
        assert_eq!(d.intern(b"alice"), Some(0));
        assert_eq!(d.intern(b"bob"), Some(1));
        assert_eq!(d.intern(b"alice"), Some(0));
        assert_eq!(d.intern("é".as_bytes()), Some(2));
        assert_eq!(ids(&d)[1], b"bob");
        assert_eq!(ids(&d)[2], "é".as_bytes());
        assert_eq!(d.len(), 3);
        let mut want: Vec<(u32, Vec<u8>)> = Vec::new();
        for i in 0..10_000u32 {
            let id = format!("user-{i}");
            want.push((d.intern(id.as_bytes()).unwrap(), id.into_bytes()));
        }
        assert_eq!(d.intern(b"user-42"), Some(45));
        // Ids longer than a varint byte and than a block.
        let long = "x".repeat(300);
        let huge = "y".repeat(BLOCK_BYTES + 10);
        for id in [long.as_bytes(), huge.as_bytes(), b"after"] {
            want.push((d.intern(id).unwrap(), id.to_vec()));
        }
        assert_eq!(d.intern(huge.as_bytes()), Some(10_004));
        for i in 0..200_000u32 {
            let id = format!("user-{i}");
            want.push((d.intern(id.as_bytes()).unwrap(), id.into_bytes()));
        }
        let all = ids(&d);
        assert_eq!(all.len(), d.len());
        for (idx, id) in want {
            assert_eq!(all[idx as usize], id);
        }
    }

    #[test]
    fn sharded_indices_are_dense_stable_and_ordered() {
        for shards in [1, 2, 4, 8] {
            let mut u = Users::new(shards);
            let mut want = std::collections::HashMap::new();
            for i in 0..50_000u32 {
                let id = format!("user-{}", i % 30_000);
                let g = u.intern_mut(id.as_bytes()).unwrap();
                assert_eq!(*want.entry(id).or_insert(g), g);
            }
            assert_eq!(u.len(), 30_000);
            let max = want.values().copied().max().unwrap() as usize;
            // Dense up to the imbalance between shards.
            assert!(max < 30_000 + 30_000 / 10, "{shards}: max index {max}");
            let mut seen = Vec::new();
            u.for_each(|g, id| seen.push((g, String::from_utf8(id.to_vec()).unwrap())));
            assert_eq!(seen.len(), 30_000);
            assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
            for (g, id) in seen {
                assert_eq!(want[&id], g);
            }
            let mut guards = u.lock_all();
            assert_eq!(u.intern_in(&mut guards, b"user-7"), Some(want["user-7"]));
        }
    }

    impl Users {
        fn intern_mut_shared(&self, id: &[u8]) -> u32 {
            let mut g = self.lock_all();
            self.intern_in(&mut g, id).unwrap()
        }
    }

    #[test]
    fn for_each_is_in_increasing_index_order_after_erasures() {
        let users = Users::with_capacity(4, 0);
        let ids: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        for id in &ids {
            users.intern_mut_shared(id.as_bytes());
        }
        // Erase a scattered third, then intern some again (they get fresh indices).
        for id in ids.iter().step_by(3) {
            users.erase(id.as_bytes());
        }
        for id in ids.iter().step_by(9) {
            users.intern_mut_shared(id.as_bytes());
        }
        let mut seen = Vec::new();
        users.for_each(|idx, id| seen.push((idx, id.to_vec())));
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0),
            "indices not strictly increasing: {:?}",
            seen.iter().map(|(i, _)| *i).collect::<Vec<_>>()
        );
        let live = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0 || i % 9 == 0)
            .count();
        assert_eq!(seen.len(), live);
        for (idx, id) in &seen {
            assert_eq!(users.get(id), Some(*idx));
        }
    }

    #[test]
    fn erased_ids_are_gone_and_come_back_with_new_indices() {
        let u = Users::new(4);
        let mut g = u.lock_all();
        let ids: Vec<String> = (0..5000).map(|i| format!("user-{i}")).collect();
        let idx: Vec<u32> = ids
            .iter()
            .map(|id| u.intern_in(&mut g, id.as_bytes()).unwrap())
            .collect();
        drop(g);
        assert_eq!(u.erase(b"user-7"), Some(idx[7]));
        assert_eq!(u.erase(b"user-7"), None, "erasing twice finds nothing");
        assert_eq!(u.erase(b"never"), None);
        assert_eq!(u.get(b"user-7"), None);
        assert_eq!(u.get(b"user-8"), Some(idx[8]));
        assert_eq!(u.len(), 4999);
        let mut seen = Vec::new();
        u.for_each(|g, id| seen.push((g, id.to_vec())));
        assert_eq!(seen.len(), 4999);
        assert!(seen.iter().all(|(_, id)| id != b"user-7"));
        // No trace of an erased id's bytes in the arena.
        let victim = b"erase-me@example.com";
        let vi = u.intern_mut_shared(victim);
        assert_eq!(u.erase(victim), Some(vi));
        for s in 0..u.shards() {
            let d = u.lock(s);
            for b in 0..d.block_count() {
                let mut copy = Vec::new();
                d.copy_block(b, &mut copy);
                assert!(!copy.windows(victim.len()).any(|w| w == victim));
            }
        }
        // Re-interned: a new index; every other id keeps its own; growth keeps working.
        let mut g = u.lock_all();
        let again = u.intern_in(&mut g, b"user-7").unwrap();
        assert_ne!(again, idx[7]);
        for (i, id) in ids.iter().enumerate() {
            if i != 7 {
                assert_eq!(u.intern_in(&mut g, id.as_bytes()), Some(idx[i]));
            }
        }
        for i in 0..50_000 {
            u.intern_in(&mut g, format!("more-{i}").as_bytes()).unwrap();
        }
        drop(g);
        assert_eq!(u.get(b"user-7"), Some(again));
        assert_eq!(u.get(b"user-9"), Some(idx[9]));
        // A scan lists every live id once.
        let mut n = 0;
        u.scan(&mut Vec::new(), |_, id| {
            n += 1;
            assert!(!id.is_empty());
            true
        });
        assert_eq!(n, 55_000);
        assert_eq!(u.get(victim), None);
    }
}
