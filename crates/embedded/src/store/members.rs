//! The memberships of one segment: user index → bucket of the latest ts.
//!
//! Buckets are stored as small *modular codes* relative to the ring top (`u16` when the ring is
//! short enough, else `u32`; code 0 means "absent"): a code identifies a bucket within
//! `Code::M` buckets below the top, and [`Members::advance`] sweeps out entries that could become
//! ambiguous before the top moves that far.
//!
//! Three representations, chosen by size and density (the share `s` of the user indices a
//! segment spans that it holds):
//! * [`Table`]: open addressing with linear probing and backward-shift deletion, slots packed as
//!   `(user u32, code)` (6 bytes with `u16` codes), any capacity (growth ×1.5, load ≤ 0.85):
//!   ≈ 8.6 bytes per member whatever `s`, for sparse segments;
//! * [`Packed`]: a bitmap-rank layout, one bit per user index of the span and the codes of the
//!   keys held in key order, in pages of [`PAGE_KEYS`] indices, each with the rank of its bit
//!   words: ≈ `2.06 + 0.19 / s` bytes per member (3.4 at `s` = 0.14, 2.5 at 0.5), for the
//!   middle;
//! * [`Dense`]: one code per user index, `2.1 / s` bytes per member with its index, for segments
//!   holding nearly every user they span.
//!
//! [`choose`] picks the smallest by estimated bytes when a representation is built or resized
//! (a table growing, a dense array or a packed layout covering more users, a packed layout
//! grown by an eighth, a retain: expiry and sweeps), leaving the one in place only for one a
//! quarter smaller (or for a smaller dense array), so that a segment near a boundary does not
//! switch back and forth.
//!
//! The key index analytics start from (see `analytics.rs`: expressions and overlaps copy it
//! instead of scanning the entries) is one bit per user index, set for every entry (live or
//! not): a packed layout's bits are that; a table or a dense array whose members are a large
//! enough share of the user indices they span keeps an [`Index`] for it, which costs at most
//! [`INDEX_BYTES_PER_MEMBER`] bytes per member and is built or dropped when the representation
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

/// User indices per page of a [`Packed`] representation.
pub(crate) const PAGE_KEYS: usize = 1024;
/// Bit words per page of a [`Packed`] representation.
pub(crate) const PAGE_WORDS: usize = PAGE_KEYS / 64;

/// The codes of one page of [`PAGE_KEYS`] user indices of a [`Packed`] representation, with
/// the rank of each of its bit words. One cache line: an upsert reads it, the bit word and the
/// code.
#[repr(C, align(64))]
pub(crate) struct Page<C: Code> {
    /// The codes of the page's keys in key order: `len` of them, the rest is room to insert.
    pub(crate) codes: Box<[C]>,
    /// Per bit word of the page: how many keys the page's words before it hold.
    pub(crate) prefix: [u16; PAGE_WORDS],
    pub(crate) len: u16,
}

impl<C: Code> Page<C> {
    fn empty() -> Page<C> {
        Page {
            codes: Box::default(),
            prefix: [0; PAGE_WORDS],
            len: 0,
        }
    }

    /// Makes room for exactly `n` codes (at least `len`); returns the change in codes allocated.
    fn resize_room(&mut self, n: usize) -> isize {
        let old = self.codes.len();
        let mut v = std::mem::take(&mut self.codes).into_vec();
        if n > old {
            v.reserve_exact(n - old);
        }
        v.resize(n, C::ZERO);
        self.codes = v.into_boxed_slice();
        n as isize - old as isize
    }
}

/// Codes a full page of `len` codes grows by: about 1/32 of it, a multiple of 8, at least 8.
fn page_step(len: usize) -> usize {
    (len / 32).max(8).next_multiple_of(8)
}

/// Where a key's code is, or would be inserted, in a [`Packed`] representation.
#[derive(Clone, Copy)]
struct Spot {
    /// Bit word of the key.
    w: usize,
    bit: u64,
    /// Position of its code in its page.
    i: usize,
    held: bool,
}

/// The bitmap-rank layout, for segments holding a middling share of the user indices they span:
/// `bits` has one bit per user index of the span, set for every key held (it is the key index
/// analytics start from: no separate [`Index`]); the codes of the keys held are kept in key
/// order, cut into [`Page`]s of [`PAGE_KEYS`] indices. The code of key `k` is at
/// `prefix[k / 64 mod PAGE_WORDS] + popcount(bits below k in its word)` of page
/// `k / PAGE_KEYS`: `get` and `upsert` are O(1), an insert or a removal shifts the codes of one
/// page. Memory: a code per member plus `1/8 + 1/16` byte per user index of the span.
pub(crate) struct Packed<C: Code> {
    /// `pages.len() * PAGE_WORDS` words.
    pub(crate) bits: Vec<u64>,
    pub(crate) pages: Vec<Page<C>>,
    len: usize,
    /// Codes allocated over all pages.
    room: usize,
    /// The length at which the representation is reviewed next (see [`Repr::review`]).
    review_at: usize,
}

/// When a representation of `len` entries is reviewed next as it grows.
fn next_review(len: usize) -> usize {
    len + len / 8 + MIN_DENSE / 4
}

impl<C: Code> Packed<C> {
    fn with_span(span: usize) -> Packed<C> {
        let mut p = Packed {
            bits: Vec::new(),
            pages: Vec::new(),
            len: 0,
            room: 0,
            review_at: next_review(0),
        };
        p.extend_pages(span.div_ceil(PAGE_KEYS));
        p
    }

    fn extend_pages(&mut self, pages: usize) {
        if pages <= self.pages.len() {
            return;
        }
        self.pages.reserve_exact(pages - self.pages.len());
        self.pages.resize_with(pages, Page::empty);
        self.bits
            .reserve_exact(pages * PAGE_WORDS - self.bits.len());
        self.bits.resize(pages * PAGE_WORDS, 0);
    }

    /// Covers `key`, growing the span by at least 1/8.
    fn cover(&mut self, key: u32) {
        let need = key as usize / PAGE_KEYS + 1;
        if need > self.pages.len() {
            self.extend_pages(need.max(self.pages.len() + self.pages.len() / 8));
        }
    }

    fn span(&self) -> usize {
        self.bits.len() * 64
    }

    fn memory_bytes(&self) -> usize {
        self.bits.capacity() * 8
            + self.pages.capacity() * std::mem::size_of::<Page<C>>()
            + self.room * std::mem::size_of::<C>()
    }

    /// Where `key`'s code is or would go; `None` beyond the span.
    #[inline(always)]
    fn locate(&self, key: u32) -> Option<Spot> {
        let k = key as usize;
        let w = k / 64;
        let word = *self.bits.get(w)?;
        let bit = 1u64 << (k % 64);
        let rank = self.pages[w / PAGE_WORDS].prefix[w % PAGE_WORDS];
        Some(Spot {
            w,
            bit,
            i: usize::from(rank) + (word & (bit - 1)).count_ones() as usize,
            held: word & bit != 0,
        })
    }

    #[inline]
    fn get(&self, key: u32) -> Option<C> {
        let s = self.locate(key)?;
        s.held.then(|| self.pages[s.w / PAGE_WORDS].codes[s.i])
    }

    #[inline]
    fn set(&mut self, s: Spot, code: C) {
        self.pages[s.w / PAGE_WORDS].codes[s.i] = code;
    }

    /// Inserts the code of the absent key at `s`; says whether the representation is due for a
    /// review.
    #[inline]
    fn insert(&mut self, s: Spot, code: C) -> bool {
        let page = &mut self.pages[s.w / PAGE_WORDS];
        let len = usize::from(page.len);
        if len == page.codes.len() {
            let grown = page.resize_room((len + page_step(len)).min(PAGE_KEYS));
            self.room = self.room.wrapping_add_signed(grown);
        }
        page.codes.copy_within(s.i..len, s.i + 1);
        page.codes[s.i] = code;
        page.len += 1;
        for p in &mut page.prefix[s.w % PAGE_WORDS + 1..] {
            *p += 1;
        }
        self.bits[s.w] |= s.bit;
        self.len += 1;
        self.len >= self.review_at
    }

    /// Inserts or overwrites; says whether the representation is due for a review (the span
    /// grew, or the length reached `review_at`).
    fn put(&mut self, key: u32, code: C) -> bool {
        let grew = key as usize >= self.span();
        if grew {
            self.cover(key);
        }
        match self.locate(key) {
            Some(s) if s.held => {
                self.set(s, code);
                grew
            }
            Some(s) => self.insert(s, code) || grew,
            None => grew,
        }
    }

    fn remove(&mut self, key: u32) -> Option<C> {
        let s = self.locate(key).filter(|s| s.held)?;
        let page = &mut self.pages[s.w / PAGE_WORDS];
        let len = usize::from(page.len);
        let code = page.codes[s.i];
        page.codes.copy_within(s.i + 1..len, s.i);
        page.len -= 1;
        for p in &mut page.prefix[s.w % PAGE_WORDS + 1..] {
            *p -= 1;
        }
        self.bits[s.w] &= !s.bit;
        self.len -= 1;
        Some(code)
    }

    /// Keeps the entries for which `keep` is true; gives back the room of pages that shrank.
    fn retain(&mut self, mut keep: impl FnMut(u32, C) -> bool) {
        let mut removed = 0;
        for (p, page) in self.pages.iter_mut().enumerate() {
            let len = usize::from(page.len);
            if len == 0 {
                continue;
            }
            let (mut read, mut write) = (0, 0);
            for j in 0..PAGE_WORDS {
                let w = p * PAGE_WORDS + j;
                page.prefix[j] = write as u16;
                let mut m = self.bits[w];
                let mut kept = m;
                while m != 0 {
                    let tz = m.trailing_zeros();
                    let c = page.codes[read];
                    read += 1;
                    if keep((w * 64) as u32 + tz, c) {
                        page.codes[write] = c;
                        write += 1;
                    } else {
                        kept &= !(1 << tz);
                    }
                    m &= m - 1;
                }
                self.bits[w] = kept;
            }
            removed += len - write;
            page.len = write as u16;
            if page.codes.len() - write > 2 * page_step(write) {
                let shrunk = page.resize_room(write.next_multiple_of(8));
                self.room = self.room.wrapping_add_signed(shrunk);
            }
        }
        self.len -= removed;
    }

    /// Calls `f(key, code)` for every entry, in key order.
    fn for_each(&self, mut f: impl FnMut(u32, C)) {
        for (p, page) in self.pages.iter().enumerate() {
            if page.len == 0 {
                continue;
            }
            let mut codes = page.codes.iter();
            let words = &self.bits[p * PAGE_WORDS..(p + 1) * PAGE_WORDS];
            for (j, &word) in words.iter().enumerate() {
                let base = ((p * PAGE_WORDS + j) * 64) as u32;
                let mut m = word;
                while m != 0 {
                    if let Some(&c) = codes.next() {
                        f(base + m.trailing_zeros(), c);
                    }
                    m &= m - 1;
                }
            }
        }
    }

    /// ORs into `bits` the keys whose code is `live`: full words through the branch-free
    /// [`pack`], the others bit by bit (one test per member, no branch on it).
    fn fill_bits(&self, bits: &mut [u64], live: impl Fn(C) -> bool) {
        for (p, page) in self.pages.iter().enumerate() {
            if page.len == 0 {
                continue;
            }
            let codes = &page.codes[..usize::from(page.len)];
            let words = &self.bits[p * PAGE_WORDS..(p + 1) * PAGE_WORDS];
            for (j, (&word, &at)) in words.iter().zip(&page.prefix).enumerate() {
                if word == 0 {
                    continue;
                }
                let at = usize::from(at);
                let out = if word == u64::MAX {
                    pack(&codes[at..at + 64], &live)
                } else {
                    let (mut m, mut i, mut out) = (word, at, 0u64);
                    while m != 0 {
                        out |= u64::from(live(codes[i])) << m.trailing_zeros();
                        i += 1;
                        m &= m - 1;
                    }
                    out
                };
                if let Some(b) = bits.get_mut(p * PAGE_WORDS + j) {
                    *b |= out;
                }
            }
        }
    }

    /// The entries `each` lists (every key once, in any order) laid out over at least `span`:
    /// one pass sets the bits, then the pages are sized exactly, then a second pass places the
    /// codes.
    fn build(span: usize, each: impl Fn(&mut dyn FnMut(u32, C))) -> Packed<C> {
        let mut p = Packed::with_span(span);
        each(&mut |k, _| {
            p.cover(k);
            p.bits[k as usize / 64] |= 1 << (k % 64);
        });
        let mut len = 0;
        for (i, page) in p.pages.iter_mut().enumerate() {
            let mut n = 0u16;
            for (j, prefix) in page.prefix.iter_mut().enumerate() {
                *prefix = n;
                n += p.bits[i * PAGE_WORDS + j].count_ones() as u16;
            }
            page.len = n;
            if n > 0 {
                let room = page.resize_room(usize::from(n).next_multiple_of(8));
                p.room = p.room.wrapping_add_signed(room);
            }
            len += usize::from(n);
        }
        p.len = len;
        each(&mut |k, c| {
            if let Some(s) = p.locate(k) {
                p.set(s, c);
            }
        });
        p.review_at = next_review(len);
        p
    }

    /// What an upsert of `key` reads first, for a software prefetch (a line each): its bit word
    /// and its page; `None` beyond the span. The code itself is behind the page's pointer
    /// (`code_near`, once the page is cached).
    pub(crate) fn prefetch_targets(&self, key: u32) -> Option<(&u64, &Page<C>)> {
        let w = key as usize / 64;
        Some((self.bits.get(w)?, self.pages.get(w / PAGE_WORDS)?))
    }

    /// The first code of `key`'s bit word in its page (the key's own is at most 63 codes
    /// further), for a software prefetch; reads the page. `None` beyond the span or when the
    /// page holds no code from there.
    #[cfg(test)]
    pub(crate) fn code_near(&self, key: u32) -> Option<&C> {
        let w = key as usize / 64;
        let page = self.pages.get(w / PAGE_WORDS)?;
        page.codes.get(usize::from(page.prefix[w % PAGE_WORDS]))
    }
}

pub(crate) enum Kind<C: Code> {
    Table(Table<C>),
    Dense(Dense<C>),
    Packed(Packed<C>),
}

/// How a store lays out its segments' memberships.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The smallest representation for each segment's size and density (see [`choose`]).
    #[default]
    Auto,
    /// [`Packed`] whatever the size (tests: every operation and query over the packed layout).
    #[cfg_attr(not(test), allow(dead_code))]
    Packed,
}

/// A representation, without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Table,
    Packed,
    Dense,
}

/// Estimated bytes of representation `tag` holding `n` entries of keys below `span`: a table at
/// its typical load, a packed layout with its typical room, a dense array with its index.
fn estimate<C: Code>(tag: Tag, n: usize, span: usize) -> usize {
    let code = std::mem::size_of::<C>();
    match tag {
        Tag::Table => table_bytes_for::<C>(n),
        Tag::Packed => {
            n * code * 33 / 32
                + span.div_ceil(PAGE_KEYS) * (PAGE_WORDS * 8 + std::mem::size_of::<Page<C>>())
        }
        Tag::Dense => span * code + index_bytes(span),
    }
}

/// The representation for `n` entries of keys below `span`: the smallest by [`estimate`]
/// (packed and dense only from [`MIN_DENSE`] entries). A representation in place (`cur`; `None`
/// when it is being rebuilt anyway) is left only for one clearly smaller, so a segment near a
/// boundary does not switch back and forth: a quarter smaller, or dense (the cheapest to
/// update) as soon as it is smaller.
fn choose<C: Code>(layout: Layout, cur: Option<Tag>, n: usize, span: usize) -> Tag {
    if layout == Layout::Packed {
        return Tag::Packed;
    }
    let allowed =
        |t: Tag| t == Tag::Table || n >= MIN_DENSE || (cur == Some(t) && n >= MIN_DENSE / 2);
    let best = [Tag::Table, Tag::Packed, Tag::Dense]
        .into_iter()
        .filter(|&t| allowed(t))
        .min_by_key(|&t| estimate::<C>(t, n, span))
        .unwrap_or(Tag::Table);
    let Some(cur) = cur.filter(|&c| allowed(c)) else {
        return best;
    };
    let (num, den) = if best == Tag::Dense { (1, 1) } else { (3, 4) };
    if best != cur && estimate::<C>(best, n, span) * den < estimate::<C>(cur, n, span) * num {
        best
    } else {
        cur
    }
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
    /// The key index of a table or a dense array (a packed layout's bits are its own).
    index: Option<Index>,
    layout: Layout,
    expiring: std::sync::Mutex<Option<Expiring>>,
}

/// Bytes a table would take to hold `n` entries at a typical load.
fn table_bytes_for<C: Code>(n: usize) -> usize {
    n * std::mem::size_of::<Slot<C>>() * 10 / 7
}

impl<C: Code> Repr<C> {
    /// An empty representation sized for `n` entries of users below `universe`.
    pub(crate) fn with_capacity(n: usize, universe: usize, layout: Layout) -> Repr<C> {
        let tag = choose::<C>(layout, None, n, universe);
        let kind = match tag {
            Tag::Table => Kind::Table(Table::with_capacity(n)),
            Tag::Dense => Kind::Dense(Dense::with_universe(universe)),
            Tag::Packed => {
                let mut p = Packed::with_span(universe);
                // Sized for a snapshot's entries: reviewed once they are in.
                p.review_at = p.review_at.max(n);
                Kind::Packed(p)
            }
        };
        // Sized for the expected entries (a snapshot being loaded), filled as they come.
        let index =
            (tag != Tag::Packed && index_wanted(n, universe)).then(|| Index::covering(universe));
        Repr {
            kind,
            index,
            layout,
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
            Kind::Packed(p) => p.len,
        }
    }

    fn tag(&self) -> Tag {
        match &self.kind {
            Kind::Table(_) => Tag::Table,
            Kind::Dense(_) => Tag::Dense,
            Kind::Packed(_) => Tag::Packed,
        }
    }

    /// One more than the largest key the representation may hold.
    fn span(&self) -> usize {
        match &self.kind {
            Kind::Table(t) if t.len == 0 => 0,
            Kind::Table(t) => t.max_key as usize + 1,
            Kind::Dense(d) => d.codes.len(),
            Kind::Packed(p) => p.span(),
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
                Kind::Packed(p) => p.memory_bytes(),
            }
    }

    #[cfg(test)]
    pub(crate) fn is_dense(&self) -> bool {
        matches!(self.kind, Kind::Dense(_))
    }

    #[cfg(test)]
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self.kind, Kind::Packed(_))
    }

    /// The packed layout, when the segment has one.
    #[cfg(test)]
    pub(crate) fn packed(&self) -> Option<&Packed<C>> {
        match &self.kind {
            Kind::Packed(p) => Some(p),
            _ => None,
        }
    }

    /// The bitset of every key held (live or not), when the segment keeps one: a packed
    /// layout's bits, or the index of a table or a dense array.
    pub(crate) fn index(&self) -> Option<&[u64]> {
        match &self.kind {
            Kind::Packed(p) => Some(&p.bits),
            _ => self.index.as_ref().map(|ix| ix.words.as_slice()),
        }
    }

    /// Builds the index when it has become worthwhile, drops it when it no longer is.
    fn review_index(&mut self) {
        if matches!(self.kind, Kind::Packed(_)) {
            self.index = None;
            return;
        }
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
            // The bit word and the page's line (the code itself is behind the page: reading
            // the page to find it would wait for the miss this hides).
            Kind::Packed(p) => {
                if let Some((w, page)) = p.prefetch_targets(key) {
                    super::hint::prefetch(w);
                    super::hint::prefetch(page);
                }
                return;
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

    /// Switches to the representation [`choose`] picks for the current size, if another, then
    /// reviews the index.
    #[cold]
    fn review(&mut self) {
        let (n, span) = (self.len(), self.span());
        let want = choose::<C>(self.layout, Some(self.tag()), n, span);
        if want != self.tag() {
            self.switch(want, span);
        }
        if let Kind::Packed(p) = &mut self.kind {
            p.review_at = next_review(n);
        }
        self.review_index();
    }

    /// Rebuilds the entries as representation `to`, covering keys below `span`.
    fn switch(&mut self, to: Tag, span: usize) {
        let n = self.len();
        self.kind = match to {
            Tag::Table => {
                let mut t = Table::with_capacity(n * 100 / 70);
                self.for_each(|k, c| t.put(k, c));
                Kind::Table(t)
            }
            Tag::Dense => {
                let mut d = Dense::with_universe(span);
                self.for_each(|k, c| d.put(k, c));
                Kind::Dense(d)
            }
            Tag::Packed => Kind::Packed(Packed::build(span, |f| self.for_each(f))),
        };
    }

    #[inline]
    pub(crate) fn get(&self, key: u32) -> Option<C> {
        match &self.kind {
            Kind::Table(t) => t.get(key),
            Kind::Dense(d) => d.get(key),
            Kind::Packed(p) => p.get(key),
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
            Kind::Packed(p) => return p.remove(key),
        };
        if let Some(ix) = &mut self.index {
            ix.clear(key);
        }
        Some(code)
    }

    /// Sets bit `key` of `bits` for every entry whose code is live: `code != 0` and
    /// `(top_code - code) mod M < k` (its bucket is within `k` buckets of the top). `bits`
    /// covers every key (`bits.len() * 64 > max key`). Branch-free over dense arrays and full
    /// words of a packed layout, so the compiler vectorizes the liveness test.
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
            Kind::Packed(p) => p.fill_bits(bits, live),
        }
    }

    /// Inserts or overwrites, switching representation when the table must grow or the size
    /// calls for another.
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
                    self.review();
                }
            }
            Kind::Packed(p) => {
                if p.put(key, code) {
                    self.review();
                }
                return;
            }
        }
        if !existed {
            if let Some(ix) = &mut self.index {
                ix.set(key);
            }
        }
    }

    /// Reads the entry of `key` and, if `f` returns a code, writes it: one probe sequence (one
    /// rank computation when packed).
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
            Kind::Packed(p) => match p.locate(key) {
                Some(s) if s.held => {
                    if let Some(code) = f(Some(p.pages[s.w / PAGE_WORDS].codes[s.i])) {
                        p.set(s, code);
                    }
                }
                Some(s) => {
                    if let Some(code) = f(None) {
                        if p.insert(s, code) {
                            self.review();
                        }
                    }
                }
                None => {
                    if let Some(code) = f(None) {
                        self.put(key, code, false);
                    }
                }
            },
        }
    }

    /// Makes room in a full table: grows it, or turns it packed or dense when that is smaller.
    #[cold]
    fn grow(&mut self, next_key: u32) {
        let Kind::Table(t) = &mut self.kind else {
            return;
        };
        let span = t.max_key.max(next_key) as usize + 1;
        match choose::<C>(self.layout, None, t.len + 1, span) {
            Tag::Table => {
                let cap = t.grown_capacity();
                t.rebuild(cap);
            }
            to => self.switch(to, span + span / 8),
        }
        self.review_index();
    }

    /// Keeps the entries for which `keep` is true, then shrinks or switches if worthwhile.
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
                self.review();
            }
            Kind::Packed(p) => {
                p.retain(keep);
                self.review();
            }
        }
    }

    pub(crate) fn for_each(&self, f: impl FnMut(u32, C)) {
        match &self.kind {
            Kind::Table(t) => t.for_each(f),
            Kind::Dense(d) => d.for_each(f),
            Kind::Packed(p) => p.for_each(f),
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
            let mut r: Repr<u16> = Repr::with_capacity(start, universe, Layout::Auto);
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
        let mut r: Repr<u16> = Repr::with_capacity(0, 0, Layout::Auto);
        for k in 0..1000u32 {
            r.put(k * 1000, 1, false);
        }
        assert!(r.index().is_none());
        // Keys a large share of their span, through table growth: indexed, exactly.
        let mut r: Repr<u16> = Repr::with_capacity(0, 0, Layout::Auto);
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
        let mut r: Repr<u32> = Repr::with_capacity(5000, 10_000, Layout::Auto);
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
        let mut r: Repr<u16> = Repr::with_capacity(0, 0, Layout::Auto);
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

    /// Everything a representation answers agrees with `model`: length, every key's code and
    /// some absent keys, `for_each` (in key order when packed), the key bitset (exactly the keys
    /// held) and the live bits for a few windows.
    fn check_all(r: &Repr<u16>, model: &std::collections::BTreeMap<u32, u16>) {
        assert_eq!(r.len(), model.len());
        for (&k, &c) in model {
            assert_eq!(r.get(k), Some(c), "key {k}");
        }
        let end = model.keys().next_back().map_or(0, |k| k + 1);
        for k in [0, 1, 63, 64, 1023, 1024, end, end + 1, end + 5000] {
            assert_eq!(r.get(k), model.get(&k).copied(), "key {k}");
        }
        let mut seen = Vec::new();
        r.for_each(|k, c| seen.push((k, c)));
        if r.is_packed() {
            assert!(
                seen.windows(2).all(|w| w[0].0 < w[1].0),
                "packed lists keys in order"
            );
        }
        seen.sort_unstable();
        let want: Vec<(u32, u16)> = model.iter().map(|(&k, &c)| (k, c)).collect();
        assert_eq!(seen, want);
        check_index(r);
        if r.is_packed() {
            let ix = r.index().expect("a packed layout is its own index");
            assert_eq!(
                ix.iter().map(|w| w.count_ones() as usize).sum::<usize>(),
                model.len()
            );
        }
        let n = (end as usize).div_ceil(64) + 3;
        for (top_code, k) in [(150i64, 1i64), (150, 60), (40, 100), (10, 65_535), (150, 0)] {
            let mut want = vec![0u64; n];
            for (&key, &c) in model {
                if c.live(top_code, k) {
                    want[key as usize / 64] |= 1 << (key % 64);
                }
            }
            let mut got = vec![0u64; n];
            r.fill_bits(&mut got, top_code, k);
            assert_eq!(got, want, "live bits for ({top_code}, {k})");
        }
    }

    proptest! {
        /// Any layout, packed forced or chosen by size (switching between table, packed and
        /// dense as the keys' density changes), behaves like a map through puts, upserts,
        /// removals and retains, with an exact key bitset and exact live bits.
        #[test]
        fn repr_ops_match_a_btreemap(
            ops in proptest::collection::vec((0u8..40, 0u32..1_000_000, 1u16..150), 1..2500),
            range in prop_oneof![Just(200u32), Just(1500), Just(12_000)],
            forced in any::<bool>(),
        ) {
            let layout = if forced { Layout::Packed } else { Layout::Auto };
            let mut r: Repr<u16> = Repr::with_capacity(0, 0, layout);
            let mut model = std::collections::BTreeMap::new();
            for (step, (op, k, c)) in ops.into_iter().enumerate() {
                let key = k % range;
                match op {
                    // Far keys: the span grows, the density falls.
                    0 => {
                        let far = range * 4 + k % (range * 40);
                        r.put(far, c, model.contains_key(&far));
                        model.insert(far, c);
                    }
                    1 => prop_assert_eq!(r.remove(key), model.remove(&key)),
                    2 => {
                        let keep = |kk: u32, cc: u16| (kk ^ u32::from(cc)) % 5 != k % 5;
                        r.retain(keep);
                        model.retain(|kk, cc| keep(*kk, *cc));
                    }
                    3..=19 => {
                        // The latest code wins, as observations do.
                        r.upsert(key, |old| (old < Some(c)).then_some(c));
                        let e = model.entry(key).or_insert(c);
                        *e = (*e).max(c);
                    }
                    _ => {
                        let existed = r.get(key).is_some();
                        prop_assert_eq!(existed, model.contains_key(&key));
                        r.put(key, c, existed);
                        model.insert(key, c);
                    }
                }
                prop_assert_eq!(r.len(), model.len());
                if forced {
                    prop_assert!(r.is_packed());
                }
                if step % 97 == 0 {
                    check_all(&r, &model);
                }
            }
            check_all(&r, &model);
        }
    }

    /// By size: a fifth of the keys of a span is packed, every key of it dense, a fifth again
    /// packed, a few a table, and a fifth again packed (through table growth); the entries are
    /// exact at every step, and packed costs a fraction of a table.
    #[test]
    fn layouts_switch_by_density_both_ways() {
        let code = |k: u32| 1 + (k % 1000) as u16;
        let mut r: Repr<u16> = Repr::with_capacity(0, 0, Layout::Auto);
        let mut model = std::collections::BTreeMap::new();
        for k in (0..50_000u32).step_by(5) {
            r.upsert(k, |_| Some(code(k)));
            model.insert(k, code(k));
        }
        assert!(r.is_packed());
        check_all(&r, &model);
        // What a prefetch of key 4480 (the first of its word) would touch.
        let p = r.packed().expect("packed");
        let (word, page) = p.prefetch_targets(4480).expect("in the span");
        assert_eq!(*word, r.index().expect("bits")[4480 / 64]);
        assert!(std::ptr::eq(page, &p.pages[4480 / PAGE_KEYS]));
        assert_eq!(p.code_near(4480).copied(), r.get(4480));
        assert!(p.prefetch_targets(10_000_000).is_none());
        // ~2 bytes a code, 3/16 of a byte per key of the span, a little room.
        assert!(
            r.memory_bytes() < 10_000 * 2 + 50_000 * 3 / 16 + 2_000,
            "{}",
            r.memory_bytes()
        );
        for k in 0..r.span() as u32 {
            r.upsert(k, |_| Some(code(k)));
            model.insert(k, code(k));
        }
        // A retain that keeps everything reviews the layout.
        r.retain(|_, _| true);
        assert!(r.is_dense());
        check_all(&r, &model);
        r.retain(|k, _| k % 5 == 0);
        model.retain(|k, _| k % 5 == 0);
        assert!(r.is_packed());
        check_all(&r, &model);
        r.retain(|k, _| k % 500 == 0);
        model.retain(|k, _| k % 500 == 0);
        assert!(!r.is_packed() && !r.is_dense());
        check_all(&r, &model);
        for k in (0..50_000u32).step_by(5) {
            r.put(k, code(k), model.contains_key(&k));
            model.insert(k, code(k));
        }
        assert!(r.is_packed());
        check_all(&r, &model);
        // Removals and a shrinking retain give back the pages' room.
        let before = r.memory_bytes();
        r.retain(|k, _| k % 10 == 0);
        model.retain(|k, _| k % 10 == 0);
        check_all(&r, &model);
        assert!(
            r.memory_bytes() < before,
            "{} !< {before}",
            r.memory_bytes()
        );
    }

    /// A packed layout sized for a snapshot's entries covers them from the start and is
    /// reviewed only once they are in; keys inserted in any order land in key order.
    #[test]
    fn packed_sized_for_a_load_takes_keys_in_any_order() {
        let mut r: Repr<u16> = Repr::with_capacity(20_000, 100_000, Layout::Auto);
        assert!(r.is_packed());
        let span = r.span();
        let mut model = std::collections::BTreeMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        while model.len() < 20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = (x % 100_000) as u32;
            let c = 1 + (x >> 40) as u16 % 500;
            r.upsert(k, |old| (old < Some(c)).then_some(c));
            let e = model.entry(k).or_insert(c);
            *e = (*e).max(c);
        }
        assert!(r.is_packed());
        assert_eq!(r.span(), span);
        check_all(&r, &model);
    }
}
