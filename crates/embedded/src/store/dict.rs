//! Interns user ids into dense `u32` indices, so that each membership costs a few bytes.

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Append-only dictionary of user ids: one arena of bytes, the end offset of every id, and a
/// hash table of indices. About 13 bytes per user plus the id itself.
#[derive(Default)]
pub struct UserDict {
    bytes: Vec<u8>,
    ends: Vec<u64>,
    table: HashTable<u32>,
    hasher: FixedState,
}

fn id_at<'a>(bytes: &'a [u8], ends: &[u64], idx: u32) -> &'a [u8] {
    let i = idx as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    &bytes[start..ends[i] as usize]
}

impl UserDict {
    pub fn with_capacity(users: usize, bytes: usize) -> Self {
        UserDict {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(users),
            table: HashTable::with_capacity(users),
            hasher: FixedState::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The id of `idx`. Ids are stored from valid `&str`s, so the bytes are UTF-8.
    pub fn get(&self, idx: u32) -> &[u8] {
        id_at(&self.bytes, &self.ends, idx)
    }

    /// The index of `id`, adding it if new. Fails only when 2^32 users are interned.
    pub fn intern(&mut self, id: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(id);
        let UserDict {
            bytes,
            ends,
            table,
            hasher,
        } = self;
        if let Some(&idx) = table.find(hash, |&i| id_at(bytes, ends, i) == id) {
            return Some(idx);
        }
        let idx = u32::try_from(ends.len()).ok()?;
        bytes.extend_from_slice(id);
        ends.push(bytes.len() as u64);
        table.insert_unique(hash, idx, |&i| hasher.hash_one(id_at(bytes, ends, i)));
        Some(idx)
    }

    /// Bytes of memory held (capacity, not length).
    pub fn memory_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * 8 + self.table.capacity() * 5
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
    }
}
