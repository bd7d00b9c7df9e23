//! Dirty tracking: epochs of the pages written in a range, on any [`Mm`].
//!
//! A [`Tracker`] arms a range, then each call to [`Tracker::epoch`] returns the pages written
//! since the previous call (the first epoch: since arming) as a [`RangeSet`], and re-arms them.
//! Three methods, chosen by the feature probe ([`Selection`]) and reported in every epoch:
//!
//! - [`Method::AsyncWp`] (6.7+): the range is registered for WP on a uffd with
//!   `UFFD_FEATURE_WP_ASYNC` and write-protected exactly ([`crate::engine::protect::write_protect`]);
//!   the kernel resolves write faults itself by clearing the page's uffd-wp bit. An epoch is one
//!   `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`, category and return
//!   mask `PAGE_IS_WRITTEN`: it returns the written pages and write-protects them again in the
//!   same page-table walk, atomically per page table (a write racing with the scan is either
//!   returned now or faults after being re-protected and is returned next time: nothing is
//!   lost). When the output vector fills the kernel stops and says where in `walk_end`; the scan
//!   resumes there ([`crate::sys::pagemap::Pagemap::scan`]). Pages the kernel did not return
//!   are not re-protected (fs/proc/task_mmu.c re-protects only what it output), so resuming
//!   loses nothing. `CHECK_WPASYNC` turns a VMA that is not WP-async (unregistered behind the
//!   tracker's back) into EPERM instead of a silent skip.
//! - [`Method::SyncWp`]: a uffd without `WP_ASYNC`. A handler thread reads each WP fault,
//!   records the page, un-protects it and wakes the writer. An epoch takes the recorded pages
//!   and write-protects exactly them again. The handler and the epoch share one lock held from
//!   recording to un-protecting and from taking to re-protecting, so a page is writable only
//!   while it is in the current epoch's set; pending fault messages are drained into the
//!   closing epoch before it is taken.
//! - [`Method::SoftDirty`]: `clear_refs` 4 then pagemap bit 55. Not atomic: a write between
//!   reading the bits and clearing them is lost, so epochs are exact only with the writers
//!   paused at the boundary; and `clear_refs` clears the whole process. The last resort, for
//!   kernels without userfaultfd WP. (This project's test kernel is built without
//!   `CONFIG_MEM_SOFT_DIRTY`: the probe says so and this path is only tested on a test double.)
//!
//! Pinned pages ([`Mm::pinned`]) can be written through the pin without any fault, so each
//! epoch reports the pages pinned at its boundary in [`Epoch::pinned`], dirty whatever the page
//! tables say; they are left writable when arming.
//!
//! On any error, and when dropped, the tracker un-protects and unregisters everything it armed:
//! nothing is left write-protected. [`Tracker::close`] does the same and reports failures.

// This file: the `Tracker` (arming, the WP methods' register + exact protect, the epoch
// boundary, disarming). One file per method, with its epoch and its own arming step:
mod async_wp; // PAGEMAP_SCAN with WP_MATCHING: written pages returned and re-protected
mod soft_dirty; // clear_refs and pagemap bit 55 (and the test double that exercises it)
mod sync_wp; // the fault-handler thread, re-protecting the recorded pages
// Choosing the method (and the probe), and what the tracker takes and reports:
mod select;
mod types;

pub use select::{Method, Selection};
pub use types::{Epoch, Phase, TrackError, TrackOptions};

use std::sync::Arc;
use std::time::Instant;

use crate::engine::protect::{WpOptions, unprotect, write_protect};
use crate::range::{Range, RangeSet};
use crate::seam::RegisterMode;
use crate::seam::prelude::*;
use sync_wp::SyncHandler;

/// A dirty tracker over one range of an [`Mm`]. See the module docs.
#[derive(Debug)]
pub struct Tracker<M: Mm + ?Sized + 'static> {
    mm: Arc<M>,
    range: Range,
    method: Method,
    opts: TrackOptions,
    next_epoch: u64,
    registered: bool,
    protected: bool,
    disarmed: bool,
    /// Sync WP: pinned pages left writable.
    skipped: RangeSet,
    sync: Option<SyncHandler>,
}

impl<M: Mm + ?Sized + 'static> Tracker<M> {
    /// Arms `range` with the best method the uffd's features allow
    /// ([`Method::for_features`]).
    pub fn start_auto(mm: Arc<M>, range: Range, opts: TrackOptions) -> Result<Self, TrackError> {
        let method = Method::for_features(mm.features());
        Self::start(mm, range, method, opts)
    }

    /// Arms `range` for `method`: the first epoch counts writes from now on.
    ///
    /// WP methods: registers the range for WP and write-protects all of it exactly, pinned
    /// pages excepted (every page, populated or not: the uffd needs `WP_UNPOPULATED`, which
    /// `WP_ASYNC` implies; without it an unpopulated page cannot be protected and arming fails
    /// with [`TrackError::Protect`]). Soft-dirty: clears the soft-dirty bits.
    pub fn start(
        mm: Arc<M>,
        range: Range,
        method: Method,
        opts: TrackOptions,
    ) -> Result<Self, TrackError> {
        let (need, forbid) = method.needs();
        let f = mm.features();
        if !f.contains(need) {
            return Err(TrackError::Unsupported {
                method,
                what: if method == Method::AsyncWp {
                    "a uffd with UFFD_FEATURE_WP_ASYNC"
                } else {
                    "a uffd with UFFD_FEATURE_PAGEFAULT_FLAG_WP"
                },
            });
        }
        if f.0 & forbid.0 != 0 {
            return Err(TrackError::Unsupported {
                method,
                what: "a uffd without UFFD_FEATURE_WP_ASYNC (async WP resolves faults itself)",
            });
        }
        let mut t = Tracker {
            mm,
            range,
            method,
            opts,
            next_epoch: 0,
            registered: false,
            protected: false,
            disarmed: false,
            skipped: RangeSet::new(),
            sync: None,
        };
        if let Err(e) = t.arm() {
            return Err(t.fail(e));
        }
        Ok(t)
    }

    fn arm(&mut self) -> Result<(), TrackError> {
        match self.method {
            Method::SoftDirty => self.arm_soft_dirty(),
            Method::AsyncWp => self.arm_wp(),
            Method::SyncWp => {
                self.arm_wp()?;
                self.start_handler()
            }
        }
    }

    /// WP methods: registers the range for WP and write-protects it exactly, pinned pages
    /// excepted (left writable, remembered in `skipped`).
    fn arm_wp(&mut self) -> Result<(), TrackError> {
        let range = self.range;
        self.mm
            .register(range, RegisterMode::WP)
            .map_err(|errno| TrackError::Register { range, errno })?;
        self.registered = true;
        self.protected = true;
        let opts = WpOptions {
            skip_pinned: true,
            on_error: self.opts.on_error,
        };
        let rep = write_protect(&*self.mm, range, &opts).map_err(|e| TrackError::Protect {
            phase: Phase::Arm,
            range,
            addr: e.addr(),
            bytes: range.len(),
            source: Some(e),
        })?;
        if !rep.complete() {
            return Err(TrackError::Protect {
                phase: Phase::Arm,
                range,
                addr: rep.not_protected.first_addr().unwrap_or(range.start()),
                bytes: rep.bytes_not_protected(),
                source: rep.error,
            });
        }
        self.skipped = rep.skipped;
        Ok(())
    }

    /// The tracked range.
    pub fn range(&self) -> Range {
        self.range
    }

    /// The method in use.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The backend.
    pub fn mm(&self) -> &Arc<M> {
        &self.mm
    }

    /// Whether an error or [`Tracker::close`] disarmed the tracker.
    pub fn is_disarmed(&self) -> bool {
        self.disarmed
    }

    /// Ends the current epoch: returns the pages written since the previous boundary (or since
    /// arming) and re-arms them. On error the tracker disarms itself (nothing stays protected)
    /// and every later call fails with [`TrackError::Disarmed`].
    pub fn epoch(&mut self) -> Result<Epoch, TrackError> {
        if self.disarmed {
            return Err(TrackError::Disarmed { range: self.range });
        }
        let t0 = Instant::now();
        let res = match self.method {
            Method::AsyncWp => self.epoch_async(),
            Method::SyncWp => self.epoch_sync(),
            Method::SoftDirty => self.epoch_soft_dirty(),
        };
        match res {
            Ok((dirty, pinned, faults)) => {
                let index = self.next_epoch;
                self.next_epoch += 1;
                Ok(Epoch {
                    index,
                    method: self.method,
                    range: self.range,
                    dirty,
                    pinned,
                    unexplained_pinned_bytes: self.mm.unexplained_pinned_bytes(),
                    elapsed: t0.elapsed(),
                    faults,
                })
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn pinned(&self) -> Result<RangeSet, TrackError> {
        let range = self.range;
        self.mm
            .pinned(range)
            .map(|p| p.clip(range))
            .map_err(|errno| TrackError::Pinned { range, errno })
    }

    /// Disarms after `first` and returns what to report.
    fn fail(&mut self, first: TrackError) -> TrackError {
        match self.disarm() {
            Ok(()) => first,
            Err(cleanup) => TrackError::Cleanup {
                first: Box::new(first),
                cleanup: Box::new(cleanup),
            },
        }
    }

    /// Un-protects and unregisters what was armed and stops the handler. Idempotent.
    fn disarm(&mut self) -> Result<(), TrackError> {
        if self.disarmed {
            return Ok(());
        }
        self.disarmed = true;
        let range = self.range;
        let mut first = None;
        if let Some(h) = &self.sync {
            h.stop();
        }
        if self.protected {
            // Un-protecting also wakes any writer blocked on a WP fault.
            let res = unprotect(&*self.mm, range, self.opts.on_error);
            let err = match res {
                Ok(rep) if rep.protected.is_empty() => None,
                Ok(rep) => Some(TrackError::Protect {
                    phase: Phase::Disarm,
                    range,
                    addr: rep.protected.first_addr().unwrap_or(range.start()),
                    bytes: rep.protected.bytes(),
                    source: rep.error,
                }),
                Err(e) => Some(TrackError::Protect {
                    phase: Phase::Disarm,
                    range,
                    addr: e.addr(),
                    bytes: range.len(),
                    source: Some(e),
                }),
            };
            first = first.or(err);
            self.protected = false;
        }
        if self.registered {
            if let Err(errno) = self.mm.unregister(range) {
                first.get_or_insert(TrackError::Unregister { range, errno });
            }
            self.registered = false;
        }
        if let Some(h) = self.sync.take() {
            h.join();
        }
        first.map_or(Ok(()), Err)
    }

    /// Disarms: un-protects and unregisters the range and stops the handler, reporting any
    /// failure. Dropping the tracker does the same and ignores failures.
    pub fn close(mut self) -> Result<(), TrackError> {
        self.disarm()
    }
}

impl<M: Mm + ?Sized + 'static> Drop for Tracker<M> {
    fn drop(&mut self) {
        let _ = self.disarm();
    }
}
