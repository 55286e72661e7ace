// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bit counting over `u64` words and an atomic dirty bitmap.
//!
//! Bit `i` of a bitmap lives in word `i / 64` at position `i % 64` (least significant bit
//! first), the layout of `KVM_GET_DIRTY_LOG`, of vm-memory's `AtomicBitmap` and of QEMU's
//! `unsigned long` bitmaps on 64-bit hosts.
//!
//! The counting functions are word-at-a-time: the partial head word and the partial tail word
//! are masked, every whole word in between is counted with one `count_ones`. A range of
//! length zero reads no word at all, whatever its offset (QEMU needed the fix "bitmap: fix
//! bitmap_count_one" for exactly that case: its word-aligned hints subtracted the popcount of
//! a whole word from the dirty counter).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::defs::{PAGE_SHIFT, PAGE_SIZE};

/// Number of bits in one bitmap word.
pub const BITS_PER_WORD: usize = u64::BITS as usize;

/// Mask of the bits at and above `bit` (0..64) within a word.
#[inline]
fn mask_from(bit: usize) -> u64 {
    u64::MAX << (bit % BITS_PER_WORD)
}

/// Mask of the bits at and below `bit` (0..64) within a word.
#[inline]
fn mask_through(bit: usize) -> u64 {
    u64::MAX >> (BITS_PER_WORD - 1 - bit % BITS_PER_WORD)
}

/// Number of bits `words` words hold, or `None` if that does not fit a `usize`.
#[inline]
fn capacity_bits(words: usize) -> Option<usize> {
    words.checked_mul(BITS_PER_WORD)
}

/// A non-empty run of bits `[start, start + len)` decomposed into word indices and masks.
///
/// `first == last` means the run lies inside one word and `head & tail` selects it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WordSpan {
    first: usize,
    last: usize,
    head: u64,
    tail: u64,
}

impl WordSpan {
    /// Splits `[start, start + len)` into words. `len` must be non-zero and the end must not
    /// overflow; both are checked and give `None`.
    #[inline]
    fn new(start: usize, len: usize) -> Option<Self> {
        let last_bit = start.checked_add(len.checked_sub(1)?)?;
        Some(WordSpan {
            first: start / BITS_PER_WORD,
            last: last_bit / BITS_PER_WORD,
            head: mask_from(start),
            tail: mask_through(last_bit),
        })
    }

    /// Calls `f(word_index, mask)` for every word of the span, in ascending order.
    #[inline]
    fn for_each(self, mut f: impl FnMut(usize, u64)) {
        if self.first == self.last {
            f(self.first, self.head & self.tail);
            return;
        }
        f(self.first, self.head);
        for i in self.first + 1..self.last {
            f(i, u64::MAX);
        }
        f(self.last, self.tail);
    }
}

/// Counts the set bits among the first `nbits` bits of `map`.
///
/// `nbits == 0` returns 0 without reading `map`.
///
/// # Panics
///
/// Panics if `nbits` is larger than the number of bits `map` holds
/// (`map.len() * 64`). Use [`checked_count_one_with_offset`] for a variant that returns
/// `None` instead.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::count_one;
///
/// let map = [u64::MAX, 0b1011];
/// assert_eq!(count_one(&map, 0), 0);
/// assert_eq!(count_one(&map, 64), 64);
/// assert_eq!(count_one(&map, 66), 66);
/// assert_eq!(count_one(&map, 128), 67);
/// ```
pub fn count_one(map: &[u64], nbits: usize) -> usize {
    count_one_with_offset(map, 0, nbits)
}

/// Counts the set bits in `[offset, offset + nbits)` of `map`.
///
/// Word at a time: the head word and the tail word are masked, the whole words between them
/// are counted directly. `nbits == 0` returns 0 without reading `map`, for any `offset` up to
/// the end of `map`.
///
/// # Panics
///
/// Panics if `offset + nbits` overflows or lies past the end of `map` (`map.len() * 64`
/// bits). Such a range is a bug in the caller, never a silent short count: a caller that
/// cannot prove its range is in bounds should use [`checked_count_one_with_offset`].
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::count_one_with_offset;
///
/// let map = [0xF0, u64::MAX];
/// assert_eq!(count_one_with_offset(&map, 4, 4), 4);
/// assert_eq!(count_one_with_offset(&map, 64, 0), 0);
/// assert_eq!(count_one_with_offset(&map, 60, 8), 4);
/// ```
pub fn count_one_with_offset(map: &[u64], offset: usize, nbits: usize) -> usize {
    match checked_count_one_with_offset(map, offset, nbits) {
        Some(n) => n,
        None => panic!(
            "bit range [{offset}, {offset} + {nbits}) is outside a bitmap of {} words",
            map.len()
        ),
    }
}

/// Counts the set bits in `[offset, offset + nbits)` of `map`, or returns `None` when the
/// range overflows or lies (even partly) past the end of `map`.
///
/// An empty range is in bounds when `offset <= map.len() * 64`, and counts 0 without reading
/// any word.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::checked_count_one_with_offset;
///
/// let map = [u64::MAX];
/// assert_eq!(checked_count_one_with_offset(&map, 0, 64), Some(64));
/// assert_eq!(checked_count_one_with_offset(&map, 64, 0), Some(0));
/// assert_eq!(checked_count_one_with_offset(&map, 1, 64), None);
/// assert_eq!(checked_count_one_with_offset(&map, usize::MAX, 2), None);
/// ```
pub fn checked_count_one_with_offset(map: &[u64], offset: usize, nbits: usize) -> Option<usize> {
    let end = offset.checked_add(nbits)?;
    if end > capacity_bits(map.len())? {
        return None;
    }
    if nbits == 0 {
        return Some(0);
    }
    let span = WordSpan::new(offset, nbits)?;
    if span.first == span.last {
        return Some((map[span.first] & span.head & span.tail).count_ones() as usize);
    }
    let head = (map[span.first] & span.head).count_ones() as usize;
    let tail = (map[span.last] & span.tail).count_ones() as usize;
    Some(head + tail + popcount(&map[span.first + 1..span.last]))
}

/// Total number of set bits in `words`.
#[inline]
fn popcount(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

/// A fixed-size bitmap of atomic words, shared between threads without a lock.
///
/// Every operation is one atomic read-modify-write (or load) per word it touches, so a
/// setter and a clearer working on the same word never lose each other's bits: a bit set
/// outside a cleared range survives the clear. Range operations report how many bits they
/// changed, which lets a counter kept beside the bitmap stay exact.
///
/// Bits at or past [`len`](Self::len) do not exist: operations on them are ignored (they
/// neither read nor write anything), the way vm-memory's `AtomicBitmap` treats them.
///
/// # Example
///
/// ```
/// use virtio_balloon::migration::DirtyBitmap;
///
/// let map = DirtyBitmap::new(200);
/// assert_eq!(map.set_range(10, 100), 100);
/// assert_eq!(map.clear_range(0, 20), 10);
/// assert!(map.test_and_clear(50));
/// assert!(!map.test(50));
/// assert_eq!(map.count(), 89);
/// assert_eq!(map.iter_set().next(), Some(20));
/// ```
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    nbits: usize,
}

impl DirtyBitmap {
    /// Creates a bitmap of `nbits` bits, all clear.
    pub fn new(nbits: usize) -> Self {
        let nwords = nbits.div_ceil(BITS_PER_WORD);
        DirtyBitmap {
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            nbits,
        }
    }

    /// Number of bits in the bitmap.
    pub fn len(&self) -> usize {
        self.nbits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// Clips `[start, start + len)` to the bitmap and splits it into words, or `None` when
    /// nothing of it lies inside.
    #[inline]
    fn span(&self, start: usize, len: usize) -> Option<WordSpan> {
        if start >= self.nbits {
            return None;
        }
        let len = len.min(self.nbits - start);
        WordSpan::new(start, len)
    }

    /// Sets bit `bit`. Returns whether it was already set.
    #[inline]
    pub fn set(&self, bit: usize) -> bool {
        if bit >= self.nbits {
            return false;
        }
        let mask = 1u64 << (bit % BITS_PER_WORD);
        self.words[bit / BITS_PER_WORD].fetch_or(mask, Ordering::AcqRel) & mask != 0
    }

    /// Whether bit `bit` is set.
    #[inline]
    pub fn test(&self, bit: usize) -> bool {
        if bit >= self.nbits {
            return false;
        }
        let mask = 1u64 << (bit % BITS_PER_WORD);
        self.words[bit / BITS_PER_WORD].load(Ordering::Acquire) & mask != 0
    }

    /// Clears bit `bit`. Returns whether it was set.
    #[inline]
    pub fn test_and_clear(&self, bit: usize) -> bool {
        if bit >= self.nbits {
            return false;
        }
        let mask = 1u64 << (bit % BITS_PER_WORD);
        let word = &self.words[bit / BITS_PER_WORD];
        // A plain load first keeps the common "already clean" case free of a locked
        // read-modify-write.
        if word.load(Ordering::Acquire) & mask == 0 {
            return false;
        }
        word.fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets the bits in `[start, start + len)` (clipped to the bitmap). Returns how many of
    /// them were clear before.
    pub fn set_range(&self, start: usize, len: usize) -> usize {
        let mut newly_set = 0;
        if let Some(span) = self.span(start, len) {
            span.for_each(|i, mask| {
                let old = self.words[i].fetch_or(mask, Ordering::AcqRel);
                newly_set += (!old & mask).count_ones() as usize;
            });
        }
        newly_set
    }

    /// Clears the bits in `[start, start + len)` (clipped to the bitmap). Returns how many of
    /// them were set before.
    ///
    /// One `fetch_and` per word that has any of its bits in the range set, and none for
    /// words that are already clean; no lock. Bits outside the range are never touched, even
    /// when another thread sets them at the same moment.
    pub fn clear_range(&self, start: usize, len: usize) -> usize {
        let mut cleared = 0;
        if let Some(span) = self.span(start, len) {
            span.for_each(|i, mask| {
                let word = &self.words[i];
                if word.load(Ordering::Acquire) & mask != 0 {
                    let old = word.fetch_and(!mask, Ordering::AcqRel);
                    cleared += (old & mask).count_ones() as usize;
                }
            });
        }
        cleared
    }

    /// Clears the bits of `mask` in word `word` and returns which of them were set (0 for a
    /// word past the end).
    #[cfg_attr(not(feature = "kvm"), allow(dead_code))]
    pub(super) fn take_bits(&self, word: usize, mask: u64) -> u64 {
        match self.words.get(word) {
            Some(w) if w.load(Ordering::Acquire) & mask != 0 => {
                w.fetch_and(!mask, Ordering::AcqRel) & mask
            }
            _ => 0,
        }
    }

    /// ORs `src` into the bitmap, word `i` of `src` into word `first_word + i`. Bits of `src`
    /// that fall past the end of the bitmap are dropped. Returns how many bits became set.
    ///
    /// This is how a harvested dirty log (for example `KVM_GET_DIRTY_LOG` words) is merged.
    pub fn or_words(&self, first_word: usize, src: &[u64]) -> usize {
        let mut newly_set = 0;
        let dst = self.words.get(first_word..).unwrap_or(&[]);
        let last_word = self.nbits / BITS_PER_WORD;
        let tail_mask = mask_from(self.nbits) ^ u64::MAX;
        for (offset, (word, &bits)) in dst.iter().zip(src).enumerate() {
            // The final word may be partial: keep the bits past `len()` clear.
            let bits = if first_word + offset == last_word {
                bits & tail_mask
            } else {
                bits
            };
            if bits != 0 {
                let old = word.fetch_or(bits, Ordering::AcqRel);
                newly_set += (!old & bits).count_ones() as usize;
            }
        }
        newly_set
    }

    /// Sets every bit. Returns how many were clear before.
    pub fn set_all(&self) -> usize {
        self.set_range(0, self.nbits)
    }

    /// Clears every bit. Returns how many were set before.
    pub fn clear_all(&self) -> usize {
        self.clear_range(0, self.nbits)
    }

    /// Number of set bits in the whole bitmap (a snapshot: each word is read once).
    pub fn count(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }

    /// Number of set bits in `[start, start + len)` (clipped to the bitmap).
    pub fn count_range(&self, start: usize, len: usize) -> usize {
        let mut n = 0;
        if let Some(span) = self.span(start, len) {
            span.for_each(|i, mask| {
                n += (self.words[i].load(Ordering::Acquire) & mask).count_ones() as usize;
            });
        }
        n
    }

    /// Iterates over the indices of the set bits in ascending order, skipping zero words
    /// with one load each.
    ///
    /// Each word is read once when the iterator reaches it, so bits that other threads set
    /// or clear concurrently may or may not be seen.
    pub fn iter_set(&self) -> SetBits<'_> {
        self.iter_set_from(0)
    }

    /// Like [`iter_set`](Self::iter_set), starting at bit `start`.
    pub fn iter_set_from(&self, start: usize) -> SetBits<'_> {
        let word_index = start / BITS_PER_WORD;
        let current = match self.words.get(word_index) {
            Some(w) if start < self.nbits => w.load(Ordering::Acquire) & mask_from(start),
            _ => 0,
        };
        SetBits {
            words: &self.words,
            word_index,
            current,
        }
    }

    /// A copy of the words (bits past `len()` are always zero).
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

/// Iterator over the set bits of a [`DirtyBitmap`], from [`DirtyBitmap::iter_set`].
#[derive(Debug)]
pub struct SetBits<'a> {
    words: &'a [AtomicU64],
    word_index: usize,
    current: u64,
}

impl Iterator for SetBits<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.current == 0 {
            self.word_index += 1;
            self.current = self.words.get(self.word_index)?.load(Ordering::Acquire);
        }
        let bit = self.current.trailing_zeros() as usize;
        // Clear the lowest set bit.
        self.current &= self.current - 1;
        Some(self.word_index * BITS_PER_WORD + bit)
    }
}

/// ORs a log with `page_size`-byte pages into a 4 KiB-page bitmap: every 4 KiB page that a
/// set bit's bytes touch becomes dirty. Returns the pages that became set, or `None` if
/// `page_size` is zero.
pub(super) fn merge_log(bitmap: &DirtyBitmap, page_size: u64, words: &[u64]) -> Option<usize> {
    if page_size == 0 {
        return None;
    }
    if page_size == PAGE_SIZE {
        return Some(bitmap.or_words(0, words));
    }
    let mut newly = 0;
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = (w * BITS_PER_WORD) as u64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            // Bytes [bit * ps, (bit + 1) * ps) of the region, as 4 KiB pages. A bit whose
            // bytes do not fit in u64 lies past any region: stop there.
            let (Some(lo), Some(hi)) =
                (bit.checked_mul(page_size), (bit + 1).checked_mul(page_size))
            else {
                return Some(newly);
            };
            let first = lo >> PAGE_SHIFT;
            let end = hi.div_ceil(PAGE_SIZE);
            if first >= bitmap.len() as u64 {
                return Some(newly);
            }
            newly += bitmap.set_range(first as usize, (end - first) as usize);
        }
    }
    Some(newly)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(map: &[u64], offset: usize, nbits: usize) -> usize {
        (offset..offset + nbits)
            .filter(|&i| map[i / 64] >> (i % 64) & 1 == 1)
            .count()
    }

    #[test]
    fn count_one_zero_bits_reads_nothing() {
        // An empty map has no word 0: reading it would panic.
        assert_eq!(count_one(&[], 0), 0);
        assert_eq!(count_one(&[u64::MAX], 0), 0);
        assert_eq!(count_one_with_offset(&[], 0, 0), 0);
        assert_eq!(count_one_with_offset(&[u64::MAX; 2], 64, 0), 0);
        assert_eq!(count_one_with_offset(&[u64::MAX; 2], 128, 0), 0);
        assert_eq!(count_one_with_offset(&[u64::MAX; 2], 65, 0), 0);
    }

    #[test]
    fn count_one_small_and_word_multiples() {
        let map = [0xFFu64, 0x1, u64::MAX];
        assert_eq!(count_one(&map, 1), 1);
        assert_eq!(count_one(&map, 8), 8);
        assert_eq!(count_one(&map, 63), 8);
        assert_eq!(count_one(&map, 64), 8);
        assert_eq!(count_one(&map, 65), 9);
        assert_eq!(count_one(&map, 128), 9);
        assert_eq!(count_one(&map, 129), 10);
        assert_eq!(count_one(&map, 192), 73);
    }

    #[test]
    fn offset_cases_of_the_counting_bits_section() {
        let map = [0xDEAD_BEEF_0123_4567u64, 0x8000_0000_0000_0001, u64::MAX, 0];
        let cases = [
            (0, 64),   // offset % 64 == 0, one whole word
            (64, 64),  // aligned, exactly one word
            (3, 10),   // inside one word
            (60, 8),   // crosses a word boundary
            (63, 1),   // last bit of a word
            (64, 1),   // first bit of a word
            (1, 255),  // ends on the last bit of the map
            (255, 1),  // the very last bit
            (0, 256),  // everything
            (70, 120), // head, whole word, tail
        ];
        for (offset, nbits) in cases {
            assert_eq!(
                count_one_with_offset(&map, offset, nbits),
                naive(&map, offset, nbits),
                "offset {offset} nbits {nbits}"
            );
        }
    }

    #[test]
    fn checked_rejects_out_of_bounds_and_overflow() {
        let map = [u64::MAX; 2];
        assert_eq!(checked_count_one_with_offset(&map, 0, 128), Some(128));
        assert_eq!(checked_count_one_with_offset(&map, 0, 129), None);
        assert_eq!(checked_count_one_with_offset(&map, 128, 0), Some(0));
        assert_eq!(checked_count_one_with_offset(&map, 129, 0), None);
        assert_eq!(checked_count_one_with_offset(&map, 127, 2), None);
        assert_eq!(checked_count_one_with_offset(&map, usize::MAX, 1), None);
        assert_eq!(checked_count_one_with_offset(&map, 1, usize::MAX), None);
        assert_eq!(checked_count_one_with_offset(&[], 0, 1), None);
    }

    #[test]
    #[should_panic(expected = "outside a bitmap of 2 words")]
    fn count_past_end_panics() {
        count_one_with_offset(&[0, 0], 100, 29);
    }

    #[test]
    #[should_panic(expected = "outside a bitmap of 1 words")]
    fn count_overflowing_range_panics() {
        count_one_with_offset(&[0], usize::MAX, 2);
    }

    #[test]
    #[should_panic(expected = "outside a bitmap of 1 words")]
    fn count_one_past_end_panics() {
        count_one(&[u64::MAX], 65);
    }

    #[test]
    fn bitmap_set_test_clear() {
        let map = DirtyBitmap::new(130);
        assert_eq!(map.len(), 130);
        assert!(!map.is_empty());
        assert!(!map.set(129));
        assert!(map.set(129));
        assert!(map.test(129));
        assert!(map.test_and_clear(129));
        assert!(!map.test_and_clear(129));
        assert!(!map.test(129));
        // Out-of-range bits do not exist.
        assert!(!map.set(130));
        assert!(!map.test(130));
        assert!(!map.test_and_clear(130));
        assert_eq!(map.count(), 0);
    }

    #[test]
    fn bitmap_ranges_report_changes() {
        let map = DirtyBitmap::new(300);
        assert_eq!(map.set_range(10, 20), 20);
        assert_eq!(map.set_range(0, 64), 44);
        assert_eq!(map.count(), 64);
        assert_eq!(map.set_range(250, 1000), 50);
        assert_eq!(map.count(), 114);
        assert_eq!(map.count_range(60, 200), 4 + 10);
        assert_eq!(map.clear_range(5, 0), 0);
        assert_eq!(map.clear_range(300, 5), 0);
        assert_eq!(map.clear_range(62, 191), 2 + 3);
        assert_eq!(map.count(), 109);
        assert_eq!(map.clear_all(), 109);
        assert_eq!(map.set_all(), 300);
        assert_eq!(map.count(), 300);
        assert_eq!(map.to_words()[4], (1 << 44) - 1);
        assert_eq!(map.clear_range(0, usize::MAX), 300);
    }

    #[test]
    fn empty_bitmap_is_harmless() {
        let map = DirtyBitmap::new(0);
        assert!(map.is_empty());
        assert_eq!(map.set_range(0, 10), 0);
        assert_eq!(map.clear_range(0, 10), 0);
        assert_eq!(map.or_words(0, &[u64::MAX]), 0);
        assert_eq!(map.count(), 0);
        assert_eq!(map.iter_set().next(), None);
        assert_eq!(map.iter_set_from(5).next(), None);
    }

    #[test]
    fn or_words_masks_the_tail_and_counts_new_bits() {
        let map = DirtyBitmap::new(100);
        map.set(0);
        assert_eq!(map.or_words(0, &[0b11, u64::MAX, u64::MAX]), 1 + 36);
        assert_eq!(map.count(), 38);
        assert!(!map.test(100));
        assert_eq!(map.to_words()[1] >> 36, 0);
        assert_eq!(map.or_words(1, &[u64::MAX]), 0);
        assert_eq!(map.or_words(7, &[u64::MAX]), 0);
    }

    #[test]
    fn iterator_skips_zero_words_and_starts_anywhere() {
        let map = DirtyBitmap::new(1000);
        for bit in [0, 63, 64, 500, 999] {
            map.set(bit);
        }
        assert_eq!(map.iter_set().collect::<Vec<_>>(), [0, 63, 64, 500, 999]);
        assert_eq!(map.iter_set_from(64).collect::<Vec<_>>(), [64, 500, 999]);
        assert_eq!(map.iter_set_from(65).collect::<Vec<_>>(), [500, 999]);
        assert_eq!(map.iter_set_from(1000).count(), 0);
        assert_eq!(map.iter_set_from(usize::MAX).count(), 0);
    }
}
