//! Pin safety: which pages may be written without a write fault.
//!
//! A page pinned *before* it is write-protected (an io_uring fixed buffer, an O_DIRECT read in
//! flight, a DMA buffer) can be written by the kernel or a device through the pin: no write
//! fault, no uffd-wp fault, and pagemap bit 57 still reads "protected" afterwards
//! (shared/kernel-notes.md, "Pinned pages"; reproduced by the `pinned-io-uring` scenario and
//! the kernel tests). A monitor must never trust such a page. Pins taken *after* protection are
//! caught: GUP with `FOLL_WRITE` faults first.
//!
//! User space has no per-page pin indicator. The [`PinRegistry`] combines the two sources there
//! are:
//! - **declared** pins: the application says which ranges it pins (its own O_DIRECT, DMA or
//!   RDMA buffers), through an RAII [`PinGuard`] released on drop, panics included; the helpers
//!   of [`io`] declare the pins of the I/O they do for exactly its lifetime;
//! - **discovered** pins ([`discover`]): the io_uring registered buffers listed in
//!   `/proc/PID/fdinfo` of every io_uring fd, cross-checked against `VmPin` in
//!   `/proc/PID/status`. Pinned bytes no source explains are reported
//!   ([`PinView::unexplained_bytes`]); the strict option refuses to go on
//!   ([`PinScanError::Unexplained`]).
//!
//! # The DMA-safety view (for the write-protect, snapshot and dirty-tracking engines)
//! Engines ask [`crate::seam::Mm::pinned`] (on Linux: [`PinRegistry::pinned`], declared plus
//! discovered, refreshed per query) "which pages of this range are pinned", and
//! [`PinRegistry::view`] for the detail without a rescan: every pinned page of a range, split
//! into long-term pins ([`PinKind::LongTerm`]: io_uring buffers and declared long-term pins,
//! counted in `VmPin`, pinned until unregistered) and declared transient pins
//! ([`PinKind::Declared`]: held while the I/O runs), plus the unexplained remainder. The rules
//! the engines follow:
//! - write-protect with `skip_pinned`: pinned pages are left writable and reported `skipped`;
//! - dirty tracking: pinned pages are dirty in every epoch (a pin can write them unseen);
//! - snapshot: pinned pages are copied last and flagged (the pinning I/O may still write them);
//! - `unexplained_bytes > 0`: somewhere in the process a pin no source names can write pages
//!   unseen; every report that depends on protection says so (or, strict, refuses).
//!
//! Queries of the cached state ([`PinRegistry::pinned_cached`], [`PinRegistry::view`],
//! [`PinRegistry::pins_in`]) take a mutex and clip a sorted set: no system call. A refresh of a
//! process without long-term pins is one read of `/proc/PID/status` (`VmPin` 0: no fd walk).
//!
//! # Limits (David Hildenbrand's objection in the seed thread holds)
//! Pins from RDMA, vfio or a driver have no per-buffer source: they only show in `VmPin` (as
//! unexplained) unless declared. A ring inherited from another process lists buffers of that
//! process's address space; they are reported, but accounted there. Readable and writable pins
//! look the same in `/proc`: every io_uring buffer is treated as written by the device.

pub mod discover;
pub mod fdinfo;
pub mod io;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use serde::ser::SerializeMap;

pub use discover::{Discovery, PinScanError, ScanOptions, ScanPoint, discover, discover_with};

use crate::range::{Range, RangeSet};

/// Where a pin comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinSource {
    /// A registered buffer of an io_uring ring, found in `/proc/PID/fdinfo/FD`.
    IoUring {
        /// The ring's fd in the pinning process.
        fd: i32,
        /// The buffer's index in the ring's table.
        index: u32,
    },
    /// Declared by the application ([`PinRegistry::declare`]).
    Declared,
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::IoUring { fd, index } => write!(f, "io_uring fd {fd} buffer {index}"),
            PinSource::Declared => f.write_str("declared"),
        }
    }
}

/// How long a pin lasts and whether the kernel counts it in `VmPin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinKind {
    /// A long-term pin (`FOLL_LONGTERM`: io_uring fixed buffers, RDMA, vfio), counted in
    /// `VmPin`, held until the buffer is unregistered.
    LongTerm,
    /// A pin the application declared for the duration of its own I/O (O_DIRECT): not counted
    /// in `VmPin`.
    Declared,
}

/// One pin: the pages it covers, where it comes from, what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin {
    /// The pinned pages (a buffer's bytes rounded out to pages).
    pub range: Range,
    /// Where it comes from.
    pub source: PinSource,
    /// Long-term or declared.
    pub kind: PinKind,
    /// Whether the device or kernel may write the pages through the pin (an O_DIRECT write
    /// only reads them; io_uring buffers are pinned for writing).
    pub device_writes: bool,
}

impl Serialize for Pin {
    /// `{"start": ADDR, "len": LEN, "source": "...", "kind": "long-term"|"declared",
    /// "device_writes": bool}`, addresses as numbers.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("start", &self.range.start())?;
        m.serialize_entry("len", &self.range.len())?;
        m.serialize_entry("source", &self.source.to_string())?;
        m.serialize_entry("kind", &self.kind)?;
        m.serialize_entry("device_writes", &self.device_writes)?;
        m.end()
    }
}

/// Whose pins a registry discovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinTarget {
    /// This process.
    SelfProcess,
    /// Another process.
    Pid(u32),
}

impl PinTarget {
    /// The pid.
    pub fn pid(self) -> u32 {
        match self {
            PinTarget::SelfProcess => std::process::id(),
            PinTarget::Pid(p) => p,
        }
    }
}

/// When a registry scans `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// Before answering every [`PinRegistry::pinned`] query (the default): a pin registered
    /// just before a write-protect is seen by it. One `status` read when `VmPin` is 0.
    OnQuery,
    /// Only on [`PinRegistry::refresh`].
    Manual,
    /// Never: declared pins only.
    Off,
}

/// How a registry behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryOptions {
    /// When to scan.
    pub refresh: Refresh,
    /// Refuse ([`PinScanError::Unexplained`]) when `VmPin` holds bytes no source explains.
    pub strict: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            refresh: Refresh::OnQuery,
            strict: false,
        }
    }
}

/// The DMA-safety view of a range (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinView {
    /// The range asked about.
    pub range: Range,
    /// Every known pinned page of it.
    pub pinned: RangeSet,
    /// The pages under long-term pins (io_uring buffers, declared long-term pins).
    pub long_term: RangeSet,
    /// The pages under declared pins (transient or long-term).
    pub declared: RangeSet,
    /// `VmPin` of the process at the last scan (0 before any).
    pub vm_pin_bytes: u64,
    /// Long-term pinned bytes of the process (anywhere, not only in `range`) that no source
    /// explains, at the last scan.
    pub unexplained_bytes: u64,
}

/// Declared pins and the last discovery.
#[derive(Debug, Default)]
struct State {
    next_id: u64,
    declared: BTreeMap<u64, Pin>,
    /// Declarations made with [`PinRegistry::declare_range`] (no guard).
    manual: RangeSet,
    /// Union of `declared` and `manual`.
    declared_set: RangeSet,
    /// Union of the long-term declared pins.
    declared_long_term: RangeSet,
    discovery: Option<Discovery>,
    discovered_set: RangeSet,
}

impl State {
    fn recompute_declared(&mut self) {
        let mut set = self.manual.clone();
        let mut lt = RangeSet::new();
        for p in self.declared.values() {
            set.insert(p.range);
            if p.kind == PinKind::LongTerm {
                lt.insert(p.range);
            }
        }
        self.declared_set = set;
        self.declared_long_term = lt;
    }

    fn unexplained(&self) -> u64 {
        match &self.discovery {
            // Declared long-term pins explain their share of VmPin, except where a discovered
            // io_uring buffer (already counted) covers them: a PinnedRing's own buffers.
            Some(d) => d.unexplained_bytes.saturating_sub(
                self.declared_long_term
                    .difference(&self.discovered_set)
                    .bytes(),
            ),
            None => 0,
        }
    }
}

/// The pins of one process: declared and discovered. Shared (`Arc`) between the backend and the
/// guards; every method takes `&self`.
#[derive(Debug)]
pub struct PinRegistry {
    target: PinTarget,
    options: Mutex<RegistryOptions>,
    state: Mutex<State>,
}

/// A declared pin, released when dropped (also while unwinding from a panic).
#[derive(Debug)]
#[must_use = "the pin is released as soon as the guard is dropped"]
pub struct PinGuard {
    registry: Arc<PinRegistry>,
    id: u64,
    pin: Pin,
}

impl PinGuard {
    /// The pinned pages.
    pub fn range(&self) -> Range {
        self.pin.range
    }
    /// The pin.
    pub fn pin(&self) -> Pin {
        self.pin
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut st = self.registry.lock();
        st.declared.remove(&self.id);
        st.recompute_declared();
    }
}

impl PinRegistry {
    /// A registry for `target`.
    pub fn new(target: PinTarget, options: RegistryOptions) -> Arc<PinRegistry> {
        Arc::new(PinRegistry {
            target,
            options: Mutex::new(options),
            state: Mutex::new(State::default()),
        })
    }

    /// A registry for this process with the default options.
    pub fn for_self() -> Arc<PinRegistry> {
        Self::new(PinTarget::SelfProcess, RegistryOptions::default())
    }

    /// The state, whatever a panicking holder left (every update keeps it consistent), so
    /// that guards still release their pins after a panic.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whose pins these are.
    pub fn target(&self) -> PinTarget {
        self.target
    }

    /// The options.
    pub fn options(&self) -> RegistryOptions {
        *self.options.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the options.
    pub fn set_options(&self, o: RegistryOptions) {
        *self.options.lock().unwrap_or_else(PoisonError::into_inner) = o;
    }

    /// Declares `r` pinned, writable by the device, not counted in `VmPin` (the application's
    /// own O_DIRECT read or DMA target), until the guard is dropped.
    pub fn declare(self: &Arc<Self>, r: Range) -> PinGuard {
        self.declare_pin(r, PinKind::Declared, true)
    }

    /// Declares a pin of `r` of `kind` until the guard is dropped. A [`PinKind::LongTerm`]
    /// declaration (the application's own RDMA or vfio registration) also explains its bytes
    /// of `VmPin`.
    pub fn declare_pin(self: &Arc<Self>, r: Range, kind: PinKind, device_writes: bool) -> PinGuard {
        let pin = Pin {
            range: r,
            source: PinSource::Declared,
            kind,
            device_writes,
        };
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.declared.insert(id, pin);
        st.recompute_declared();
        drop(st);
        PinGuard {
            registry: Arc::clone(self),
            id,
            pin,
        }
    }

    /// Declares `r` pinned without a guard, until [`PinRegistry::undeclare_range`]. Prefer
    /// [`PinRegistry::declare`]: a guard cannot be forgotten.
    pub fn declare_range(&self, r: Range) {
        let mut st = self.lock();
        st.manual.insert(r);
        st.recompute_declared();
    }

    /// Withdraws the pages of `r` from the declarations made with
    /// [`PinRegistry::declare_range`].
    pub fn undeclare_range(&self, r: Range) {
        let mut st = self.lock();
        st.manual = st.manual.difference(&RangeSet::single(r));
        st.recompute_declared();
    }

    /// The declared pins (guards and [`PinRegistry::declare_range`]), by start.
    pub fn declared(&self) -> Vec<Pin> {
        let st = self.lock();
        let mut v: Vec<Pin> = st.declared.values().copied().collect();
        v.extend(st.manual.iter().map(|r| Pin {
            range: *r,
            source: PinSource::Declared,
            kind: PinKind::Declared,
            device_writes: true,
        }));
        v.sort_by_key(|p| (p.range.start(), p.range.end()));
        v
    }

    /// Scans the target now and keeps the result. On failure the previous state is kept
    /// unchanged. With the strict option, unexplained long-term pinned bytes are an error (the
    /// discovered pins are kept: they are true).
    pub fn refresh(&self) -> Result<Discovery, PinScanError> {
        let opts = ScanOptions {
            skip_without_vm_pin: true,
            ..ScanOptions::default()
        };
        let d = discover_with(self.target.pid(), &opts, &mut |_| {})?;
        let mut st = self.lock();
        st.discovered_set = d.pins.iter().map(|p| p.range).collect();
        st.discovery = Some(d.clone());
        let unexplained = st.unexplained();
        drop(st);
        if self.options().strict && unexplained > 0 {
            return Err(PinScanError::Unexplained {
                pid: d.pid,
                vm_pin_bytes: d.vm_pin_bytes,
                unexplained_bytes: unexplained,
            });
        }
        Ok(d)
    }

    /// The pinned pages of `r`, declared and discovered, after a scan when the options say so
    /// ([`Refresh::OnQuery`]). What [`crate::seam::Mm::pinned`] answers on Linux.
    pub fn pinned(&self, r: Range) -> Result<RangeSet, PinScanError> {
        match self.options().refresh {
            Refresh::OnQuery => {
                self.refresh()?;
            }
            Refresh::Manual | Refresh::Off => {
                let unexplained = self.lock().unexplained();
                if self.options().strict && unexplained > 0 {
                    let d = self.last_discovery();
                    return Err(PinScanError::Unexplained {
                        pid: self.target.pid(),
                        vm_pin_bytes: d.map_or(0, |d| d.vm_pin_bytes),
                        unexplained_bytes: unexplained,
                    });
                }
            }
        }
        Ok(self.pinned_cached(r))
    }

    /// The pinned pages of `r` known now (no scan).
    pub fn pinned_cached(&self, r: Range) -> RangeSet {
        let st = self.lock();
        st.declared_set.clip(r).union(&st.discovered_set.clip(r))
    }

    /// The known pins overlapping `r` (declared, then discovered), each clipped to `r`.
    pub fn pins_in(&self, r: Range) -> Vec<Pin> {
        let mut v = self.declared();
        if let Some(d) = &self.lock().discovery {
            v.extend(d.pins.iter().copied());
        }
        v.into_iter()
            .filter_map(|p| p.range.intersect(&r).map(|range| Pin { range, ..p }))
            .collect()
    }

    /// The DMA-safety view of `r` from the known state (no scan).
    pub fn view(&self, r: Range) -> PinView {
        let st = self.lock();
        let discovered = st.discovered_set.clip(r);
        let declared = st.declared_set.clip(r);
        PinView {
            range: r,
            pinned: declared.union(&discovered),
            long_term: discovered.union(&st.declared_long_term.clip(r)),
            declared,
            vm_pin_bytes: st.discovery.as_ref().map_or(0, |d| d.vm_pin_bytes),
            unexplained_bytes: st.unexplained(),
        }
    }

    /// Long-term pinned bytes no source explains, at the last scan (declared long-term pins
    /// count as explained).
    pub fn unexplained_bytes(&self) -> u64 {
        self.lock().unexplained()
    }

    /// The last successful scan.
    pub fn last_discovery(&self) -> Option<Discovery> {
        self.lock().discovery.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::PAGE_SIZE;

    fn r(a: u64, b: u64) -> Range {
        Range::from_bounds(0x1000_0000 + a * PAGE_SIZE, 0x1000_0000 + b * PAGE_SIZE)
    }

    fn manual_registry() -> Arc<PinRegistry> {
        PinRegistry::new(
            PinTarget::SelfProcess,
            RegistryOptions {
                refresh: Refresh::Off,
                strict: false,
            },
        )
    }

    #[test]
    fn guards_release_on_drop_and_overlaps_are_counted() {
        let reg = manual_registry();
        let a = reg.declare(r(0, 4));
        let b = reg.declare(r(2, 6));
        assert_eq!(reg.pinned(r(0, 10)).unwrap(), RangeSet::single(r(0, 6)));
        drop(a);
        assert_eq!(reg.pinned(r(0, 10)).unwrap(), RangeSet::single(r(2, 6)));
        assert_eq!(reg.pinned_cached(r(3, 4)), RangeSet::single(r(3, 4)));
        drop(b);
        assert!(reg.pinned(r(0, 10)).unwrap().is_empty());
        assert!(reg.declared().is_empty());
    }

    #[test]
    fn guards_release_on_panic() {
        let reg = manual_registry();
        let reg2 = Arc::clone(&reg);
        let res = std::panic::catch_unwind(move || {
            let _g = reg2.declare(r(0, 1));
            assert_eq!(reg2.pinned_cached(r(0, 1)).pages(), 1);
            panic!("I/O failed");
        });
        assert!(res.is_err());
        assert!(reg.pinned_cached(r(0, 1)).is_empty());
        // A panic while the state lock is held poisons it; guards still release.
        let g = reg.declare(r(5, 6));
        let reg3 = Arc::clone(&reg);
        let _ = std::thread::spawn(move || {
            let _st = reg3.lock();
            panic!("poison");
        })
        .join();
        drop(g);
        assert!(reg.pinned_cached(r(0, 10)).is_empty());
    }

    #[test]
    fn view_splits_long_term_and_declared() {
        let reg = manual_registry();
        let _t = reg.declare(r(0, 2));
        let _l = reg.declare_pin(r(4, 6), PinKind::LongTerm, true);
        let v = reg.view(r(1, 5));
        assert_eq!(v.pinned, [r(1, 2), r(4, 5)].into_iter().collect());
        assert_eq!(v.long_term, RangeSet::single(r(4, 5)));
        assert_eq!(v.declared, v.pinned);
        let pins = reg.pins_in(r(1, 5));
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[0].range, r(1, 2));
        assert_eq!(pins[1].kind, PinKind::LongTerm);
        assert_eq!(pins[0].source.to_string(), "declared");
    }

    #[test]
    fn manual_declarations_keep_the_old_semantics() {
        let reg = manual_registry();
        reg.declare_range(r(0, 8));
        reg.undeclare_range(r(2, 4));
        assert_eq!(
            reg.pinned_cached(r(0, 8)),
            [r(0, 2), r(4, 8)].into_iter().collect()
        );
    }

    #[test]
    fn source_names() {
        assert_eq!(
            PinSource::IoUring { fd: 7, index: 2 }.to_string(),
            "io_uring fd 7 buffer 2"
        );
        let p = Pin {
            range: r(0, 1),
            source: PinSource::IoUring { fd: 3, index: 0 },
            kind: PinKind::LongTerm,
            device_writes: true,
        };
        let v = serde_json::to_value(p).unwrap();
        assert_eq!(v["start"], 0x1000_0000u64);
        assert_eq!(v["len"], PAGE_SIZE);
        assert_eq!(v["source"], "io_uring fd 3 buffer 0");
        assert_eq!(v["kind"], "long-term");
    }
}
