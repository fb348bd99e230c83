//! Interns user ids into dense `u32` indices, so that each membership costs a few bytes.

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Bytes per arena block; an entry never straddles two blocks.
const BLOCK_BYTES: usize = 1 << 20;
/// Bits of the in-block position in a packed location.
const POS_BITS: u32 = 20;

/// Append-only dictionary of user ids.
///
/// Ids live in an arena of fixed 1 MiB blocks, in index order, each entry being the index
/// (u32), the length of the id as a LEB128 varint and the id. The hash table holds 5-byte packed
/// locations (block, position) of entries, so a lookup touches the table and one arena entry.
/// Nothing is reallocated by doubling except the hash table: about 5 + len bytes per user plus
/// the table (6 bytes a slot).
#[derive(Default)]
pub struct UserDict {
    blocks: Vec<Vec<u8>>,
    len: usize,
    table: HashTable<[u8; 5]>,
    hasher: FixedState,
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

    /// Every `(index, id)` in index order. Ids are stored from valid `&str`s, so the bytes are
    /// UTF-8.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        self.blocks.iter().flat_map(|block| {
            let mut pos = 0;
            std::iter::from_fn(move || {
                (pos < block.len()).then(|| {
                    let (idx, id, next) = entry_at(block, pos);
                    pos = next;
                    (idx, id)
                })
            })
        })
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
        let hash = self.hasher.hash_one(id);
        let blocks = &self.blocks;
        if let Some(&loc) = self.table.find(hash, |&l| at(blocks, l).1 == id) {
            return Some(at(blocks, loc).0);
        }
        let idx = u32::try_from(self.len).ok()?;
        let loc = self.push_entry(idx, id)?;
        self.len += 1;
        let UserDict {
            blocks,
            table,
            hasher,
            ..
        } = self;
        table.insert_unique(hash, loc, |&l| hasher.hash_one(at(blocks, l).1));
        Some(idx)
    }

    /// Bytes of memory held (the arena as used; the table by its buckets).
    pub fn memory_bytes(&self) -> usize {
        let blocks: usize = self.blocks.iter().map(|b| b.len()).sum();
        let cap = self.table.capacity();
        let buckets = if cap == 0 {
            0
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        blocks + buckets * 6
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
}
