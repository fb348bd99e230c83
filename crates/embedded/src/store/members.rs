//! The memberships of one segment: user index → bucket of the latest ts.
//!
//! Buckets are stored as small *modular codes* relative to the ring top (`u16` when the ring is
//! short enough, else `u32`; code 0 means "absent"): a code identifies a bucket within
//! `Code::M` buckets below the top, and [`Members::advance`] sweeps out entries that could become
//! ambiguous before the top moves that far.
//!
//! Two representations, switched by density:
//! * [`Table`]: open addressing with linear probing and backward-shift deletion, slots packed as
//!   `(user u32, code)` (6 bytes with `u16` codes), any capacity (growth ×1.5, load ≤ 0.85);
//! * [`Dense`]: one code per user index, for segments holding a large share of all users.
//!
//! A segment whose members are a large enough share of the user indices they span also keeps an
//! [`Index`]: one bit per user index, set for every entry (live or not). Expressions and overlaps
//! start from it instead of scanning the entries (see `analytics.rs`); it costs at most
//! [`INDEX_BYTES_PER_MEMBER`] bytes per member, and is built or dropped when the representation
//! is resized.

/// A modular bucket code. Codes are `1..=M`; 0 marks an empty slot.
pub(crate) trait Code: Copy + Eq + Send + Sync + 'static {
    const M: i64;
    const ZERO: Self;
    fn from_i64(v: i64) -> Self;
    fn get(self) -> i64;
    /// Non-zero and `(top_code - self) mod M < k` (see [`Repr::fill_bits`]); branch-free.
    #[inline(always)]
    fn live(self, top_code: i64, k: i64) -> bool {
        let c = self.get();
        let mut d = top_code - c;
        d += (d >> 63) & Self::M;
        (c != 0) & (d < k)
    }
}

impl Code for u16 {
    const M: i64 = u16::MAX as i64;
    const ZERO: Self = 0;
    /// In 32-bit lanes: twice as many per vector as the generic 64-bit form.
    #[inline(always)]
    fn live(self, top_code: i64, k: i64) -> bool {
        let (tc, k) = (top_code as i32, k.min(Self::M + 1) as i32);
        let c = i32::from(self);
        let mut d = tc - c;
        d += (d >> 31) & (Self::M as i32);
        (c != 0) & (d < k)
    }
    #[inline]
    fn from_i64(v: i64) -> Self {
        v as u16
    }
    #[inline]
    fn get(self) -> i64 {
        i64::from(self)
    }
}

impl Code for u32 {
    const M: i64 = u32::MAX as i64;
    const ZERO: Self = 0;
    #[inline]
    fn from_i64(v: i64) -> Self {
        v as u32
    }
    #[inline]
    fn get(self) -> i64 {
        i64::from(self)
    }
}

/// Converts between buckets and codes relative to the current top.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Coder {
    top: i64,
    top_code: i64,
}

impl Coder {
    pub(crate) fn new<C: Code>(top: i64) -> Coder {
        Coder {
            top,
            top_code: top.rem_euclid(C::M) + 1,
        }
    }

    /// Code of `bucket`, which must satisfy `top - M < bucket <= top`.
    #[inline]
    pub(crate) fn encode<C: Code>(self, bucket: i64) -> C {
        debug_assert!(bucket <= self.top && self.top - bucket < C::M);
        let mut c = self.top_code - (self.top - bucket);
        if c < 1 {
            c += C::M;
        }
        C::from_i64(c)
    }

    /// `(top code, k)` such that a code is live above bucket `lo` iff it is non-zero and
    /// `(top_code - code) mod M < k` (see [`Repr::fill_bits`]).
    pub(crate) fn live_window(self, lo: i64) -> (i64, i64) {
        (self.top_code, self.top - lo)
    }

    /// Bucket of a non-zero code, assuming it lies within `M` buckets at or below the top.
    #[inline]
    pub(crate) fn decode<C: Code>(self, code: C) -> i64 {
        let mut d = self.top_code - code.get();
        if d < 0 {
            d += C::M;
        }
        self.top - d
    }
}

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Slot<C> {
    key: u32,
    code: C,
}

impl<C: Code> Slot<C> {
    #[inline]
    fn key(self) -> u32 {
        self.key
    }
    #[inline]
    fn code(self) -> C {
        self.code
    }
}

const MAX_LOAD_NUM: usize = 85;
const MAX_LOAD_DEN: usize = 100;
/// Below this many members a segment always uses a table (small in tests, to exercise switches).
const MIN_DENSE: usize = if cfg!(test) { 64 } else { 4096 };

/// Open-addressing map user → code.
pub(crate) struct Table<C: Code> {
    slots: Box<[Slot<C>]>,
    len: usize,
    max_key: u32,
}

#[inline]
fn home(key: u32, cap: usize) -> usize {
    let h = u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((u128::from(h) * cap as u128) >> 64) as usize
}

fn max_len(cap: usize) -> usize {
    cap * MAX_LOAD_NUM / MAX_LOAD_DEN
}

impl<C: Code> Table<C> {
    pub(crate) fn with_capacity(n: usize) -> Table<C> {
        let cap = if n == 0 {
            0
        } else {
            (n * MAX_LOAD_DEN / MAX_LOAD_NUM + 2).max(8)
        };
        Table {
            slots: vec![
                Slot {
                    key: 0,
                    code: C::ZERO
                };
                cap
            ]
            .into_boxed_slice(),
            len: 0,
            max_key: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Slot<C>>()
    }

    /// `Ok(i)`: `key` is at slot `i`; `Err(i)`: absent, `i` is the empty slot to insert at.
    #[inline]
    fn find(&self, key: u32) -> Result<usize, usize> {
        let cap = self.slots.len();
        debug_assert!(cap > self.len);
        let mut i = home(key, cap);
        loop {
            let s = self.slots[i];
            if s.code() == C::ZERO {
                return Err(i);
            }
            if s.key() == key {
                return Ok(i);
            }
            i += 1;
            if i == cap {
                i = 0;
            }
        }
    }

    #[inline]
    fn get(&self, key: u32) -> Option<C> {
        if self.len == 0 {
            return None;
        }
        self.find(key).ok().map(|i| self.slots[i].code())
    }

    /// Whether inserting one more entry needs a larger table.
    #[inline]
    fn full(&self) -> bool {
        self.len + 1 > max_len(self.slots.len())
    }

    /// Capacity after the next growth.
    fn grown_capacity(&self) -> usize {
        (self.slots.len() * 3 / 2).max(16)
    }

    fn rebuild(&mut self, cap: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            vec![
                Slot {
                    key: 0,
                    code: C::ZERO
                };
                cap
            ]
            .into_boxed_slice(),
        );
        for s in old.iter() {
            if s.code() != C::ZERO {
                if let Err(i) = self.find(s.key()) {
                    self.slots[i] = *s;
                }
            }
        }
    }

    /// Inserts or overwrites; the table must not be [`full`](Self::full) for a new key.
    #[inline]
    fn put(&mut self, key: u32, code: C) {
        match self.find(key) {
            Ok(i) | Err(i) => {
                if self.slots[i].code() == C::ZERO {
                    self.len += 1;
                    self.max_key = self.max_key.max(key);
                }
                self.slots[i] = Slot { key, code };
            }
        }
    }

    /// Removes the entry at slot `i`, shifting later entries of its cluster back.
    fn remove_at(&mut self, mut hole: usize) {
        let cap = self.slots.len();
        let mut j = hole;
        loop {
            j += 1;
            if j == cap {
                j = 0;
            }
            let s = self.slots[j];
            if s.code() == C::ZERO {
                break;
            }
            let h = home(s.key(), cap);
            // Move `s` back into the hole if its probe path from `h` to `j` crosses the hole.
            let dist_entry = (j + cap - h) % cap;
            let dist_hole = (j + cap - hole) % cap;
            if dist_hole <= dist_entry {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole] = Slot {
            key: 0,
            code: C::ZERO,
        };
        self.len -= 1;
    }

    /// Keeps the entries for which `keep` is true. `keep` may be called more than once on an
    /// entry it keeps.
    fn retain(&mut self, mut keep: impl FnMut(u32, C) -> bool) {
        let mut i = 0;
        while i < self.slots.len() {
            let s = self.slots[i];
            if s.code() != C::ZERO && !keep(s.key(), s.code()) {
                self.remove_at(i);
                // Another entry may have moved into slot i.
                continue;
            }
            i += 1;
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32, C)) {
        for s in self.slots.iter() {
            if s.code() != C::ZERO {
                f(s.key(), s.code());
            }
        }
    }
}

/// One code per user index.
pub(crate) struct Dense<C: Code> {
    codes: Vec<C>,
    len: usize,
}

impl<C: Code> Dense<C> {
    fn with_universe(universe: usize) -> Dense<C> {
        Dense {
            codes: vec![C::ZERO; universe],
            len: 0,
        }
    }

    fn memory_bytes(&self) -> usize {
        self.codes.capacity() * std::mem::size_of::<C>()
    }

    #[inline]
    fn get(&self, key: u32) -> Option<C> {
        match self.codes.get(key as usize) {
            Some(&c) if c != C::ZERO => Some(c),
            _ => None,
        }
    }

    /// Sets an entry; grows the array (by at least 1/8) to cover `key`.
    #[inline]
    fn put(&mut self, key: u32, code: C) {
        let k = key as usize;
        if k >= self.codes.len() {
            let want = (k + 1).max(self.codes.len() + self.codes.len() / 8);
            self.codes.reserve_exact(want - self.codes.len());
            self.codes.resize(want, C::ZERO);
        }
        if self.codes[k] == C::ZERO {
            self.len += 1;
        }
        self.codes[k] = code;
    }

    fn retain(&mut self, mut keep: impl FnMut(u32, C) -> bool) {
        let mut removed = 0;
        for (k, c) in self.codes.iter_mut().enumerate() {
            if *c != C::ZERO && !keep(k as u32, *c) {
                *c = C::ZERO;
                removed += 1;
            }
        }
        self.len -= removed;
    }

    fn for_each(&self, mut f: impl FnMut(u32, C)) {
        for (k, &c) in self.codes.iter().enumerate() {
            if c != C::ZERO {
                f(k as u32, c);
            }
        }
    }
}

pub(crate) enum Kind<C: Code> {
    Table(Table<C>),
    Dense(Dense<C>),
}

/// One bit per user index, set for every key held (live or not).
pub(crate) struct Index {
    words: Vec<u64>,
}

impl Index {
    fn covering(span: usize) -> Index {
        Index {
            words: vec![0; span.div_ceil(64)],
        }
    }

    #[inline]
    fn set(&mut self, key: u32) {
        let w = key as usize / 64;
        if w >= self.words.len() {
            let want = (w + 1).max(self.words.len() + self.words.len() / 8);
            self.words.reserve_exact(want - self.words.len());
            self.words.resize(want, 0);
        }
        self.words[w] |= 1 << (key % 64);
    }

    #[inline]
    fn clear(&mut self, key: u32) {
        if let Some(w) = self.words.get_mut(key as usize / 64) {
            *w &= !(1 << (key % 64));
        }
    }

    fn memory_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

/// Most bytes per member an [`Index`] may cost when it is built (it is dropped above twice that).
pub(crate) const INDEX_BYTES_PER_MEMBER: usize = 4;
/// Below this many members a segment keeps no index (scanning it is cheap).
const MIN_INDEXED: usize = if cfg!(test) { 64 } else { 4096 };

fn index_bytes(span: usize) -> usize {
    span.div_ceil(64) * 8
}

fn index_wanted(len: usize, span: usize) -> bool {
    len >= MIN_INDEXED && index_bytes(span) <= INDEX_BYTES_PER_MEMBER * len
}

fn index_unwanted(len: usize, span: usize) -> bool {
    len < MIN_INDEXED / 2 || index_bytes(span) > 2 * INDEX_BYTES_PER_MEMBER * len
}

/// Keys listed by a query (see `analytics.rs`): every entry whose bucket was at or below `upto`
/// when listed, so that later queries find the members expired since without a scan.
pub(crate) struct Expiring {
    pub(crate) upto: i64,
    pub(crate) keys: Vec<u32>,
}

/// The entries of a segment, and the index of their keys when worthwhile.
pub(crate) struct Repr<C: Code> {
    kind: Kind<C>,
    index: Option<Index>,
    expiring: std::sync::Mutex<Option<Expiring>>,
}

/// Bytes a table would take to hold `n` entries at a typical load.
fn table_bytes_for<C: Code>(n: usize) -> usize {
    n * std::mem::size_of::<Slot<C>>() * 10 / 7
}

impl<C: Code> Repr<C> {
    /// An empty representation sized for `n` entries of users below `universe`.
    pub(crate) fn with_capacity(n: usize, universe: usize) -> Repr<C> {
        let kind =
            if n >= MIN_DENSE && universe * std::mem::size_of::<C>() <= table_bytes_for::<C>(n) {
                Kind::Dense(Dense::with_universe(universe))
            } else {
                Kind::Table(Table::with_capacity(n))
            };
        // Sized for the expected entries (a snapshot being loaded), filled as they come.
        let index = index_wanted(n, universe).then(|| Index::covering(universe));
        Repr {
            kind,
            index,
            expiring: std::sync::Mutex::new(None),
        }
    }

    /// The keys a query listed as expiring soon (see [`Expiring`]).
    pub(crate) fn expiring(&self) -> &std::sync::Mutex<Option<Expiring>> {
        &self.expiring
    }

    pub(crate) fn len(&self) -> usize {
        match &self.kind {
            Kind::Table(t) => t.len(),
            Kind::Dense(d) => d.len,
        }
    }

    /// One more than the largest key the representation may hold.
    fn span(&self) -> usize {
        match &self.kind {
            Kind::Table(t) if t.len == 0 => 0,
            Kind::Table(t) => t.max_key as usize + 1,
            Kind::Dense(d) => d.codes.len(),
        }
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        let index = self.index.as_ref().map_or(0, Index::memory_bytes);
        let listed = self
            .expiring
            .lock()
            .map_or(0, |l| l.as_ref().map_or(0, |l| l.keys.capacity() * 4));
        index
            + listed
            + match &self.kind {
                Kind::Table(t) => t.memory_bytes(),
                Kind::Dense(d) => d.memory_bytes(),
            }
    }

    #[cfg(test)]
    pub(crate) fn is_dense(&self) -> bool {
        matches!(self.kind, Kind::Dense(_))
    }

    /// The bitset of every key held (live or not), when the segment keeps one.
    pub(crate) fn index(&self) -> Option<&[u64]> {
        self.index.as_ref().map(|ix| ix.words.as_slice())
    }

    /// Builds the index when it has become worthwhile, drops it when it no longer is.
    fn review_index(&mut self) {
        let (len, span) = (self.len(), self.span());
        match &self.index {
            None if index_wanted(len, span) => {
                let mut ix = Index::covering(span);
                self.for_each(|k, _| ix.set(k));
                self.index = Some(ix);
            }
            Some(_) if index_unwanted(len, span) => self.index = None,
            _ => {}
        }
    }

    /// Starts fetching what an [`upsert`](Self::upsert) of `key` will touch first (the home
    /// slot of a table, the code of a dense array, the index word), so that a loop can issue it
    /// a few keys ahead and overlap the misses. Changes nothing.
    #[inline]
    pub(crate) fn prefetch(&self, key: u32) {
        match &self.kind {
            Kind::Table(t) => {
                if let Some(s) = t.slots.get(home(key, t.slots.len())) {
                    super::hint::prefetch(s);
                }
            }
            Kind::Dense(d) => {
                if let Some(c) = d.codes.get(key as usize) {
                    super::hint::prefetch(c);
                }
            }
        }
        if let Some(w) = self
            .index
            .as_ref()
            .and_then(|ix| ix.words.get(key as usize / 64))
        {
            super::hint::prefetch(w);
        }
    }

    #[inline]
    pub(crate) fn get(&self, key: u32) -> Option<C> {
        match &self.kind {
            Kind::Table(t) => t.get(key),
            Kind::Dense(d) => d.get(key),
        }
    }

    /// Removes the entry of `key`; returns its code. Does not shrink (a later
    /// [`retain`](Self::retain) does).
    pub(crate) fn remove(&mut self, key: u32) -> Option<C> {
        let code = match &mut self.kind {
            Kind::Table(t) => {
                if t.len == 0 {
                    return None;
                }
                let i = t.find(key).ok()?;
                let code = t.slots[i].code();
                t.remove_at(i);
                code
            }
            Kind::Dense(d) => {
                let code = d.get(key)?;
                d.codes[key as usize] = C::ZERO;
                d.len -= 1;
                code
            }
        };
        if let Some(ix) = &mut self.index {
            ix.clear(key);
        }
        Some(code)
    }

    /// Sets bit `key` of `bits` for every entry whose code is live: `code != 0` and
    /// `(top_code - code) mod M < k` (its bucket is within `k` buckets of the top). `bits`
    /// covers every key (`bits.len() * 64 > max key`). Branch-free over dense arrays, so the
    /// compiler vectorizes the liveness test.
    pub(crate) fn fill_bits(&self, bits: &mut [u64], top_code: i64, k: i64) {
        let live = |c: C| c.live(top_code, k);
        match &self.kind {
            Kind::Table(t) => {
                for s in t.slots.iter() {
                    let c = s.code();
                    if live(c) {
                        let key = s.key() as usize;
                        if let Some(w) = bits.get_mut(key / 64) {
                            *w |= 1 << (key % 64);
                        }
                    }
                }
            }
            Kind::Dense(d) => {
                for (w, chunk) in bits.iter_mut().zip(d.codes.chunks(64)) {
                    *w |= pack(chunk, live);
                }
            }
        }
    }

    /// Inserts or overwrites, switching representation when the table must grow.
    #[inline]
    pub(crate) fn put(&mut self, key: u32, code: C, existed: bool) {
        match &mut self.kind {
            Kind::Table(t) => {
                if !existed && t.full() {
                    self.grow(key);
                    return self.put(key, code, existed);
                }
                t.put(key, code);
            }
            Kind::Dense(d) => {
                let old_len = d.codes.len();
                d.put(key, code);
                if d.codes.len() != old_len {
                    self.maybe_sparse();
                }
            }
        }
        if !existed {
            if let Some(ix) = &mut self.index {
                ix.set(key);
            }
        }
    }

    /// Reads the entry of `key` and, if `f` returns a code, writes it: one probe sequence.
    #[inline]
    pub(crate) fn upsert(&mut self, key: u32, f: impl FnOnce(Option<C>) -> Option<C>) {
        match &mut self.kind {
            Kind::Table(t) => {
                if t.len > 0 {
                    match t.find(key) {
                        Ok(i) => {
                            if let Some(code) = f(Some(t.slots[i].code())) {
                                t.slots[i] = Slot { key, code };
                            }
                            return;
                        }
                        Err(i) if !t.full() => {
                            if let Some(code) = f(None) {
                                t.slots[i] = Slot { key, code };
                                t.len += 1;
                                t.max_key = t.max_key.max(key);
                                if let Some(ix) = &mut self.index {
                                    ix.set(key);
                                }
                            }
                            return;
                        }
                        Err(_) => {}
                    }
                }
                if let Some(code) = f(None) {
                    self.put(key, code, false);
                }
            }
            Kind::Dense(d) => {
                let old = d.get(key);
                if let Some(code) = f(old) {
                    if old.is_some() {
                        d.codes[key as usize] = code;
                    } else {
                        self.put(key, code, false);
                    }
                }
            }
        }
    }

    /// Makes room in a full table: grows it, or turns it dense when that is no bigger.
    #[cold]
    fn grow(&mut self, next_key: u32) {
        let Kind::Table(t) = &mut self.kind else {
            return;
        };
        let cap = t.grown_capacity();
        let universe = t.max_key.max(next_key) as usize + 1;
        let dense_bytes = universe * std::mem::size_of::<C>();
        if t.len >= MIN_DENSE && dense_bytes <= cap * std::mem::size_of::<Slot<C>>() {
            let mut d = Dense::with_universe(universe + universe / 8);
            t.for_each(|k, c| d.put(k, c));
            self.kind = Kind::Dense(d);
        } else {
            t.rebuild(cap);
        }
        self.review_index();
    }

    /// Turns a dense representation back into a table when that is much smaller.
    fn maybe_sparse(&mut self) {
        let Kind::Dense(d) = &self.kind else { return };
        if d.memory_bytes() > 3 * table_bytes_for::<C>(d.len) || d.len < MIN_DENSE / 2 {
            let mut t = Table::with_capacity(d.len * 100 / 70);
            d.for_each(|k, c| t.put(k, c));
            self.kind = Kind::Table(t);
        }
        self.review_index();
    }

    /// Keeps the entries for which `keep` is true, then shrinks if worthwhile.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(u32, C) -> bool) {
        let index = &mut self.index;
        let keep = |k: u32, c: C| {
            let kept = keep(k, c);
            if !kept {
                if let Some(ix) = index.as_mut() {
                    ix.clear(k);
                }
            }
            kept
        };
        match &mut self.kind {
            Kind::Table(t) => {
                t.retain(keep);
                if t.capacity() > 64 && t.len() * 10 < t.capacity() * 3 {
                    let cap = (t.len() * 100 / 60).max(8);
                    t.rebuild(cap);
                }
                self.review_index();
            }
            Kind::Dense(d) => {
                d.retain(keep);
                self.maybe_sparse();
            }
        }
    }

    pub(crate) fn for_each(&self, f: impl FnMut(u32, C)) {
        match &self.kind {
            Kind::Table(t) => t.for_each(f),
            Kind::Dense(d) => d.for_each(f),
        }
    }
}

/// The bits of up to 64 codes for which `f` holds (bit `i` for `chunk[i]`). Branch-free, so the
/// compiler vectorizes the test.
#[inline(always)]
fn pack<C: Code>(chunk: &[C], f: impl Fn(C) -> bool) -> u64 {
    let mut flags = [0u8; 64];
    for (b, &c) in flags.iter_mut().zip(chunk) {
        *b = u8::from(f(c));
    }
    // Eight 0/1 bytes into eight bits at a time.
    let mut word = 0u64;
    for (i, eight) in flags.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes([
            eight[0], eight[1], eight[2], eight[3], eight[4], eight[5], eight[6], eight[7],
        ]);
        word |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * i);
    }
    word
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn codes_round_trip_within_the_modulus() {
        for top in [-5i64, 0, 1, 65534, 65535, 65536, 1_000_000, 28_000_000] {
            let c = Coder::new::<u16>(top);
            for back in [0i64, 1, 2, 1000, 65533, 65534] {
                let code: u16 = c.encode(top - back);
                assert_ne!(code, 0);
                assert_eq!(c.decode(code), top - back, "top {top} back {back}");
            }
        }
    }

    proptest! {
        /// Tables and dense arrays behave like a map through inserts, removals and switches.
        #[test]
        fn repr_matches_a_map(
            ops in proptest::collection::vec((0u8..3, 0u32..20_000, 1u16..100), 1..3000),
            universe in 0usize..30_000,
            start in 0usize..6000,
        ) {
            let mut r: Repr<u16> = Repr::with_capacity(start, universe);
            let mut model = std::collections::HashMap::new();
            for (op, k, c) in ops {
                match op {
                    0 | 1 => {
                        let existed = r.get(k).is_some();
                        prop_assert_eq!(existed, model.contains_key(&k));
                        r.put(k, c, existed);
                        model.insert(k, c);
                    }
                    _ => {
                        r.retain(|kk, cc| (kk ^ u32::from(cc)) % 7 != (k % 7));
                        model.retain(|kk, cc| (*kk ^ u32::from(*cc)) % 7 != (k % 7));
                    }
                }
                prop_assert_eq!(r.len(), model.len());
                check_index(&r);
            }
            for (k, c) in &model {
                prop_assert_eq!(r.get(*k), Some(*c));
            }
            let mut n = 0;
            r.for_each(|k, c| { n += 1; assert_eq!(model.get(&k), Some(&c)); });
            prop_assert_eq!(n, model.len());
        }
    }

    /// The index, when kept, has exactly the bits of the keys held.
    fn check_index<C: Code>(r: &Repr<C>) {
        if let Some(ix) = r.index() {
            let mut want = vec![0u64; ix.len()];
            r.for_each(|k, _| want[k as usize / 64] |= 1 << (k % 64));
            assert_eq!(ix, &want[..]);
        }
    }

    #[test]
    fn index_is_kept_for_large_shares_and_dropped_for_small() {
        // Few keys spread far: no index.
        let mut r: Repr<u16> = Repr::with_capacity(0, 0);
        for k in 0..1000u32 {
            r.put(k * 1000, 1, false);
        }
        assert!(r.index().is_none());
        // Keys a large share of their span, through table growth: indexed, exactly.
        let mut r: Repr<u16> = Repr::with_capacity(0, 0);
        for k in (0..20_000u32).step_by(3) {
            r.put(k, 1 + (k % 1000) as u16, false);
        }
        assert!(r.index().is_some());
        check_index(&r);
        assert!(r.memory_bytes() >= 20_000 / 8);
        // Removals clear their bits; a shrink below the share drops the index.
        for k in (0..20_000u32).step_by(6) {
            assert!(r.remove(k).is_some());
        }
        check_index(&r);
        r.retain(|k, _| k % 900 == 0);
        assert!(r.index().is_none());
        // Sized for a snapshot's entries: indexed from the first put.
        let mut r: Repr<u32> = Repr::with_capacity(5000, 10_000);
        assert!(r.index().is_some());
        for k in 0..5000u32 {
            r.put(k * 2, 7, false);
        }
        check_index(&r);
        assert_eq!(
            r.index()
                .map(|ix| ix.iter().map(|w| w.count_ones()).sum::<u32>()),
            Some(5000)
        );
    }

    #[test]
    fn many_keys_switch_to_dense_and_back() {
        let mut r: Repr<u16> = Repr::with_capacity(0, 0);
        for k in 0..50_000u32 {
            r.put(k, 1 + (k % 1000) as u16, false);
        }
        assert!(r.is_dense());
        assert!(r.index().is_some());
        check_index(&r);
        assert_eq!(r.len(), 50_000);
        r.retain(|k, _| k % 100 == 0);
        check_index(&r);
        assert!(!r.is_dense());
        assert_eq!(r.len(), 500);
        for k in 0..50_000u32 {
            assert_eq!(r.get(k).is_some(), k % 100 == 0);
        }
    }
}
