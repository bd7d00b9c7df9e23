//! Page-aligned half-open address ranges and sets of them.
//!
//! Every report of uffd-wp is made of [`RangeSet`]s: which pages are protected, skipped, not
//! protected. A [`Range`] is `[start, end)` in bytes; a [`RangeSet`] keeps its ranges sorted,
//! disjoint and coalesced (two touching ranges become one), so two sets that cover the same bytes
//! compare equal.

use std::fmt;

use serde::Serialize;

/// Size of a base page on the architectures uffd-wp supports (x86_64, aarch64 with 4 KiB pages).
pub const PAGE_SIZE: u64 = 4096;
/// Bytes mapped by one PMD entry (one page table of 512 PTEs).
pub const PMD_SIZE: u64 = 2 << 20;
/// Bytes mapped by one PUD entry (one PMD table of 512 entries).
pub const PUD_SIZE: u64 = 1 << 30;

/// Why a `(start, len)` pair is not a valid page range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, serde::Deserialize)]
pub enum RangeError {
    /// The start address is not a multiple of the page size.
    #[error("start {0:#x} is not page aligned")]
    UnalignedStart(u64),
    /// The length is not a multiple of the page size.
    #[error("length {0:#x} is not a multiple of the page size")]
    UnalignedLen(u64),
    /// The length is zero.
    #[error("length is zero")]
    Empty,
    /// `start + len` does not fit in the address space.
    #[error("start {start:#x} + length {len:#x} overflows the address space")]
    Overflow {
        /// Start address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A non-empty, page-aligned, half-open byte range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    start: u64,
    end: u64,
}

impl Range {
    /// A range from `start` of `len` bytes; both must be page aligned and `len` non-zero.
    pub fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if start % PAGE_SIZE != 0 {
            return Err(RangeError::UnalignedStart(start));
        }
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if len % PAGE_SIZE != 0 {
            return Err(RangeError::UnalignedLen(len));
        }
        let end = start
            .checked_add(len)
            .ok_or(RangeError::Overflow { start, len })?;
        Ok(Self { start, end })
    }

    /// A range from its bounds. Panics if they are unaligned or `end <= start`: for internal
    /// arithmetic on values already validated.
    pub fn from_bounds(start: u64, end: u64) -> Self {
        assert!(
            start < end && start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0,
            "invalid range bounds [{start:#x}, {end:#x})"
        );
        Self { start, end }
    }

    /// First byte.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.end
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Always false: a `Range` is never empty. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE
    }
    /// Whether `addr` lies inside.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &Range) -> Option<Range> {
        let s = self.start.max(other.start);
        let e = self.end.min(other.end);
        (s < e).then_some(Range { start: s, end: e })
    }

    /// Splits the range at every multiple of `boundary` (a power of two, at least a page):
    /// the pieces each lie within one `boundary`-aligned block.
    pub fn split_at_multiples(&self, boundary: u64) -> impl Iterator<Item = Range> + '_ {
        debug_assert!(boundary.is_power_of_two() && boundary >= PAGE_SIZE);
        let mut cur = self.start;
        std::iter::from_fn(move || {
            if cur >= self.end {
                return None;
            }
            let next = (cur | (boundary - 1)).saturating_add(1).min(self.end);
            let r = Range {
                start: cur,
                end: next,
            };
            cur = next;
            Some(r)
        })
    }

    /// The pages of the range, one `Range` each.
    pub fn page_iter(&self) -> impl Iterator<Item = Range> + '_ {
        self.split_at_multiples(PAGE_SIZE)
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A set of pages, stored as sorted, disjoint, coalesced ranges; serialized as the list of its
/// ranges.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(from = "Vec<Range>", into = "Vec<Range>")]
pub struct RangeSet {
    ranges: Vec<Range>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from ranges in any order, overlapping or not.
    pub fn from_ranges<I: IntoIterator<Item = Range>>(ranges: I) -> Self {
        let mut v: Vec<Range> = ranges.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<Range> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Self { ranges: out }
    }

    /// The set holding one range.
    pub fn single(r: Range) -> Self {
        Self { ranges: vec![r] }
    }

    /// Adds a range. Appending in ascending order (the common case) costs O(1).
    pub fn insert(&mut self, r: Range) {
        match self.ranges.last_mut() {
            None => self.ranges.push(r),
            Some(last) if r.start > last.end => self.ranges.push(r),
            Some(last) if r.start >= last.start => last.end = last.end.max(r.end),
            Some(_) => {
                let mut v = std::mem::take(&mut self.ranges);
                v.push(r);
                *self = Self::from_ranges(v);
            }
        }
    }

    /// Adds every range of another set.
    pub fn extend(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert(*r);
        }
    }

    /// The ranges, ascending.
    pub fn iter(&self) -> std::slice::Iter<'_, Range> {
        self.ranges.iter()
    }

    /// The ranges as a slice, ascending.
    pub fn as_slice(&self) -> &[Range] {
        &self.ranges
    }

    /// Whether the set holds no page.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(Range::len).sum()
    }

    /// Total pages in the set.
    pub fn pages(&self) -> u64 {
        self.bytes() / PAGE_SIZE
    }

    /// The lowest address in the set.
    pub fn first_addr(&self) -> Option<u64> {
        self.ranges.first().map(Range::start)
    }

    /// Whether `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= addr);
        self.ranges.get(i).is_some_and(|r| r.contains(addr))
    }

    /// Whether every byte of `r` is in the set.
    pub fn covers(&self, r: &Range) -> bool {
        let i = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges
            .get(i)
            .is_some_and(|x| x.start <= r.start && r.end <= x.end)
    }

    /// Union of two sets.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_ranges(self.ranges.iter().chain(other.ranges.iter()).copied())
    }

    /// The pages in both sets.
    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            if let Some(x) = a.intersect(&b) {
                out.push(x);
            }
            if a.end <= b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        RangeSet { ranges: out }
    }

    /// The pages of this set that lie in `r`.
    pub fn clip(&self, r: Range) -> RangeSet {
        self.intersection(&RangeSet::single(r))
    }

    /// The pages of this set that are not in `other`.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for a in &self.ranges {
            let mut cur = a.start;
            while j < other.ranges.len() && other.ranges[j].end <= cur {
                j += 1;
            }
            let mut k = j;
            while cur < a.end {
                match other.ranges.get(k) {
                    Some(b) if b.start < a.end => {
                        if b.start > cur {
                            out.push(Range {
                                start: cur,
                                end: b.start,
                            });
                        }
                        cur = cur.max(b.end);
                        k += 1;
                    }
                    _ => {
                        out.push(Range {
                            start: cur,
                            end: a.end,
                        });
                        cur = a.end;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }

    /// `r` minus this set: the pages of `r` that are not in the set.
    pub fn complement_in(&self, r: Range) -> RangeSet {
        RangeSet::single(r).difference(self)
    }

    /// The set with every gap of at most `max_gap` bytes between two of its ranges filled:
    /// fewer, larger ranges covering at least the same pages.
    pub fn bridged(&self, max_gap: u64) -> RangeSet {
        let mut out: Vec<Range> = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            match out.last_mut() {
                Some(last) if r.start - last.end <= max_gap => last.end = r.end,
                _ => out.push(*r),
            }
        }
        RangeSet { ranges: out }
    }

    /// The set with every address shifted down by `base` (for reports relative to a request).
    pub fn offsets_from(&self, base: u64) -> Vec<[u64; 2]> {
        self.ranges
            .iter()
            .map(|r| [r.start - base, r.end - base])
            .collect()
    }
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ranges.iter()).finish()
    }
}

impl FromIterator<Range> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range>>(iter: I) -> Self {
        Self::from_ranges(iter)
    }
}

impl<'a> IntoIterator for &'a RangeSet {
    type Item = &'a Range;
    type IntoIter = std::slice::Iter<'a, Range>;
    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

impl Serialize for Range {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        [self.start, self.end].serialize(s)
    }
}

impl From<Vec<Range>> for RangeSet {
    fn from(v: Vec<Range>) -> Self {
        RangeSet::from_ranges(v)
    }
}

impl From<RangeSet> for Vec<Range> {
    fn from(s: RangeSet) -> Self {
        s.ranges
    }
}

/// From `[start, end]`, validated as [`Range::new`] does.
impl<'de> serde::Deserialize<'de> for Range {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let [start, end] = <[u64; 2]>::deserialize(d)?;
        if end <= start {
            return Err(serde::de::Error::custom(format!(
                "range [{start:#x}, {end:#x}) is empty"
            )));
        }
        Range::new(start, end - start).map_err(serde::de::Error::custom)
    }
}

/// Parses a byte size: a number with an optional binary suffix `K`, `M`, `G` (or `KiB`, `MiB`,
/// `GiB`), e.g. `256M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let cut = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(cut);
    let n: u64 = num.parse().map_err(|_| {
        format!("size {s:?}: expected a number with an optional K, M, G or T suffix")
    })?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => {
            return Err(format!(
                "size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_SIZE;

    fn r(a: u64, b: u64) -> Range {
        Range::from_bounds(a * P, b * P)
    }

    #[test]
    fn new_rejects_bad_input() {
        assert_eq!(Range::new(1, P), Err(RangeError::UnalignedStart(1)));
        assert_eq!(Range::new(0, 0), Err(RangeError::Empty));
        assert_eq!(Range::new(0, 5), Err(RangeError::UnalignedLen(5)));
        assert!(matches!(
            Range::new(u64::MAX - P + 1, 2 * P),
            Err(RangeError::Overflow { .. })
        ));
        assert_eq!(Range::new(P, 2 * P).unwrap(), r(1, 3));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn split_at_pud() {
        let big = Range::from_bounds(PUD_SIZE - P, 2 * PUD_SIZE + P);
        let parts: Vec<_> = big.split_at_multiples(PUD_SIZE).collect();
        assert_eq!(
            parts,
            vec![
                Range::from_bounds(PUD_SIZE - P, PUD_SIZE),
                Range::from_bounds(PUD_SIZE, 2 * PUD_SIZE),
                Range::from_bounds(2 * PUD_SIZE, 2 * PUD_SIZE + P),
            ]
        );
    }

    #[test]
    fn coalesces_and_differs() {
        let s = RangeSet::from_ranges([r(4, 6), r(0, 2), r(2, 3)]);
        assert_eq!(s.as_slice(), &[r(0, 3), r(4, 6)]);
        let d = RangeSet::single(r(0, 10)).difference(&s);
        assert_eq!(d.as_slice(), &[r(3, 4), r(6, 10)]);
        assert_eq!(s.bytes(), 5 * P);
        assert!(s.covers(&r(4, 6)) && !s.covers(&r(2, 5)));
    }

    /// Sets as bitmaps of 64 pages, the obvious model the RangeSet must agree with.
    fn to_bits(s: &RangeSet) -> u64 {
        s.iter()
            .flat_map(|x| x.start() / P..x.end() / P)
            .fold(0u64, |acc, p| acc | 1 << p)
    }

    fn from_bits(bits: u64) -> RangeSet {
        (0..64)
            .filter(|p| bits & (1 << p) != 0)
            .map(|p| r(p, p + 1))
            .collect()
    }

    proptest! {
        #[test]
        fn set_algebra_matches_bitmaps(a: u64, b: u64) {
            let (sa, sb) = (from_bits(a), from_bits(b));
            prop_assert_eq!(to_bits(&sa.union(&sb)), a | b);
            prop_assert_eq!(to_bits(&sa.intersection(&sb)), a & b);
            prop_assert_eq!(to_bits(&sa.difference(&sb)), a & !b);
            prop_assert_eq!(sa.pages(), u64::from(a.count_ones()));
            // canonical form: sorted, disjoint, never touching
            for w in sa.as_slice().windows(2) {
                prop_assert!(w[0].end() < w[1].start());
            }
            let mut inc = RangeSet::new();
            for x in sb.iter().rev() { inc.insert(*x); }
            prop_assert_eq!(inc, sb.clone());
            for p in 0..64u64 {
                prop_assert_eq!(sa.contains(p * P), a & (1 << p) != 0);
            }
        }

        #[test]
        fn bridging_fills_exactly_the_small_gaps(a: u64, gap in 0u64..8) {
            let sa = from_bits(a);
            let b = sa.bridged(gap * P);
            // Every page of the set stays; a page is added iff it lies in a gap of at most
            // `gap` pages between two of the set's pages.
            for p in 0..64u64 {
                let before = (0..p).rev().find(|q| a & (1 << q) != 0);
                let after = (p..64).find(|q| a & (1 << q) != 0);
                let filled = match (before, after) {
                    (_, Some(q)) if q == p => true,
                    (Some(x), Some(y)) => y - x - 1 <= gap,
                    _ => false,
                };
                prop_assert_eq!(b.contains(p * P), filled, "page {} of {:#x}, gap {}", p, a, gap);
            }
        }

        #[test]
        fn split_pieces_tile_the_range(start in 0u64..4096, len in 1u64..4096, shift in 0u32..10) {
            let big = r(start, start + len);
            let boundary = P << shift;
            let parts: Vec<_> = big.split_at_multiples(boundary).collect();
            prop_assert_eq!(parts.first().unwrap().start(), big.start());
            prop_assert_eq!(parts.last().unwrap().end(), big.end());
            for w in parts.windows(2) { prop_assert_eq!(w[0].end(), w[1].start()); }
            for p in &parts { prop_assert_eq!(p.start() / boundary, (p.end() - 1) / boundary); }
        }
    }
}
