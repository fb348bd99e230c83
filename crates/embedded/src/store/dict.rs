//! Interns user ids into dense `u32` indices, so that each membership costs a few bytes.

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Bytes per arena block; an id never straddles two blocks.
const BLOCK_BYTES: usize = 1 << 20;
/// Locations per chunk of the location array.
const LOC_CHUNK: usize = 1 << 16;
/// Bits of the in-block position in a packed location.
const POS_BITS: u32 = 20;

/// Append-only dictionary of user ids.
///
/// Ids live in an arena of fixed 1 MiB blocks, each prefixed by its length as a LEB128 varint;
/// the location of id `i` is packed into 5 bytes (block index, position), in chunks of 64 Ki
/// locations; a hash table maps ids to indices. Nothing is ever reallocated by doubling
/// except the hash table, so about 5 + 1 + len bytes per user plus the table (5 bytes a slot).
#[derive(Default)]
pub struct UserDict {
    blocks: Vec<Vec<u8>>,
    locs: Vec<Vec<[u8; 5]>>,
    len: usize,
    table: HashTable<u32>,
    hasher: FixedState,
}

fn id_at<'a>(blocks: &'a [Vec<u8>], locs: &[Vec<[u8; 5]>], idx: u32) -> &'a [u8] {
    let i = idx as usize;
    let l = locs[i / LOC_CHUNK][i % LOC_CHUNK];
    let loc = u64::from_le_bytes([l[0], l[1], l[2], l[3], l[4], 0, 0, 0]);
    let block = &blocks[(loc >> POS_BITS) as usize];
    let mut pos = (loc & ((1 << POS_BITS) - 1)) as usize;
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
    &block[pos..pos + n]
}

impl UserDict {
    pub fn with_capacity(users: usize, _bytes: usize) -> Self {
        UserDict {
            table: HashTable::with_capacity(users),
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The id of `idx`. Ids are stored from valid `&str`s, so the bytes are UTF-8.
    pub fn get(&self, idx: u32) -> &[u8] {
        id_at(&self.blocks, &self.locs, idx)
    }

    /// Appends `id` to the arena; returns its packed location.
    fn push_bytes(&mut self, id: &[u8]) -> Option<u64> {
        let mut head = [0u8; 10];
        let mut n = id.len();
        let mut h = 0;
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
            // A new block; an id longer than a block gets a block of its own.
            self.blocks.push(Vec::with_capacity(need.max(BLOCK_BYTES)));
        }
        let block_idx = self.blocks.len() - 1;
        if block_idx >= 1 << (40 - POS_BITS) {
            return None;
        }
        let block = self.blocks.last_mut()?;
        let pos = block.len();
        block.extend_from_slice(&head[..h]);
        block.extend_from_slice(id);
        Some(((block_idx as u64) << POS_BITS) | pos as u64)
    }

    /// The index of `id`, adding it if new. Fails only when 2^32 users are interned.
    pub fn intern(&mut self, id: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(id);
        if let Some(&idx) = self
            .table
            .find(hash, |&i| id_at(&self.blocks, &self.locs, i) == id)
        {
            return Some(idx);
        }
        let idx = u32::try_from(self.len).ok()?;
        let loc = self.push_bytes(id)?;
        let l = loc.to_le_bytes();
        if self.len.is_multiple_of(LOC_CHUNK) {
            self.locs.push(Vec::with_capacity(LOC_CHUNK));
        }
        self.locs.last_mut()?.push([l[0], l[1], l[2], l[3], l[4]]);
        self.len += 1;
        let UserDict {
            blocks,
            locs,
            table,
            hasher,
            ..
        } = self;
        table.insert_unique(hash, idx, |&i| hasher.hash_one(id_at(blocks, locs, i)));
        Some(idx)
    }

    /// Bytes of memory held (capacity, not length; the last block counts only as used).
    pub fn memory_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(|b| b.len()).sum();
        let locs: usize = self.locs.iter().map(|c| c.len() * 5).sum();
        blocks + locs + self.table.capacity() * 5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_dense() {
        let mut d = UserDict::default();
        assert_eq!(d.intern(b"alice"), Some(0));
        assert_eq!(d.intern(b"bob"), Some(1));
        assert_eq!(d.intern(b"alice"), Some(0));
        assert_eq!(d.intern("é".as_bytes()), Some(2));
        assert_eq!(d.get(1), b"bob");
        assert_eq!(d.get(2), "é".as_bytes());
        assert_eq!(d.len(), 3);
        for i in 0..10_000u32 {
            let id = format!("user-{i}");
            let idx = d.intern(id.as_bytes()).unwrap();
            assert_eq!(d.get(idx), id.as_bytes());
        }
        assert_eq!(d.intern(b"user-42"), Some(45));
        // Ids longer than a varint byte and than a block.
        let long = "x".repeat(300);
        let huge = "y".repeat(BLOCK_BYTES + 10);
        let a = d.intern(long.as_bytes()).unwrap();
        let b = d.intern(huge.as_bytes()).unwrap();
        let c = d.intern(b"after").unwrap();
        assert_eq!(d.get(a), long.as_bytes());
        assert_eq!(d.get(b), huge.as_bytes());
        assert_eq!(d.get(c), b"after");
        assert_eq!(d.intern(huge.as_bytes()), Some(b));
        for i in 0..200_000u32 {
            let id = format!("user-{i}");
            let idx = d.intern(id.as_bytes()).unwrap();
            assert_eq!(d.get(idx), id.as_bytes());
        }
    }
}
