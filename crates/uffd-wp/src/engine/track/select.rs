//! Which tracking method: [`Method`], the uffd features each needs, and the kernel probe's
//! [`Selection`].

use serde::Serialize;

use super::TrackError;
use crate::backend::linux::Config;
use crate::features::{self, Features};

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING`.
    AsyncWp,
    /// Synchronous uffd-wp with a fault-handler thread.
    SyncWp,
    /// `clear_refs` 4 and pagemap bit 55.
    SoftDirty,
}

impl Method {
    /// Every method, best first.
    pub const ALL: [Method; 3] = [Method::AsyncWp, Method::SyncWp, Method::SoftDirty];

    /// The name used in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::AsyncWp => "async-wp",
            Method::SyncWp => "sync-wp",
            Method::SoftDirty => "soft-dirty",
        }
    }

    /// Parses [`Method::name`].
    pub fn from_name(s: &str) -> Option<Method> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }

    /// The method a uffd with these enabled features supports best: async WP needs `WP_ASYNC`
    /// on the uffd, sync WP a uffd with WP fault flags and without `WP_ASYNC` (an async uffd
    /// resolves the faults itself), soft-dirty no uffd at all.
    pub fn for_features(f: Features) -> Method {
        if f.contains(Features::WP_ASYNC) {
            Method::AsyncWp
        } else if f.contains(Features::PAGEFAULT_FLAG_WP) {
            Method::SyncWp
        } else {
            Method::SoftDirty
        }
    }

    /// The uffd features this method needs enabled, and those it must not have.
    pub(super) fn needs(self) -> (Features, Features) {
        match self {
            Method::AsyncWp => (
                Features::WP_ASYNC.with(Features::PAGEFAULT_FLAG_WP),
                Features::empty(),
            ),
            Method::SyncWp => (Features::PAGEFAULT_FLAG_WP, Features::WP_ASYNC),
            Method::SoftDirty => (Features::empty(), Features::empty()),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the feature probe found, and the method chosen from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// The chosen method.
    pub method: Method,
    /// Why it was chosen (a forced choice, or which better method is missing what).
    pub reason: String,
    /// The kernel offers `UFFD_FEATURE_WP_ASYNC`.
    pub wp_async: bool,
    /// `PAGEMAP_SCAN` works on /proc/self/pagemap.
    pub pagemap_scan: bool,
    /// The kernel offers userfaultfd write-protection (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
    pub uffd_wp: bool,
    /// Soft-dirty works (`CONFIG_MEM_SOFT_DIRTY`).
    pub soft_dirty: bool,
}

impl Selection {
    /// Chooses from the probe's findings: the best method available, or `forced` if it is
    /// available. Fails with [`TrackError::Unsupported`] when nothing (or not `forced`) is.
    pub fn choose(
        wp_async: bool,
        pagemap_scan: bool,
        uffd_wp: bool,
        soft_dirty: bool,
        forced: Option<Method>,
    ) -> Result<Selection, TrackError> {
        let missing = |m: Method| -> Option<&'static str> {
            match m {
                Method::AsyncWp if !uffd_wp || !wp_async => Some("UFFD_FEATURE_WP_ASYNC"),
                Method::AsyncWp if !pagemap_scan => Some("PAGEMAP_SCAN"),
                Method::SyncWp if !uffd_wp => Some("UFFD_FEATURE_PAGEFAULT_FLAG_WP"),
                Method::SoftDirty if !soft_dirty => Some("CONFIG_MEM_SOFT_DIRTY"),
                _ => None,
            }
        };
        let sel = |method, reason| Selection {
            method,
            reason,
            wp_async,
            pagemap_scan,
            uffd_wp,
            soft_dirty,
        };
        if let Some(m) = forced {
            return match missing(m) {
                None => Ok(sel(m, "asked for".to_string())),
                Some(what) => Err(TrackError::Unsupported { method: m, what }),
            };
        }
        let mut why = Vec::new();
        for m in Method::ALL {
            match missing(m) {
                None if why.is_empty() => return Ok(sel(m, "best available".to_string())),
                None => return Ok(sel(m, why.join("; "))),
                Some(what) => why.push(format!("no {m}: kernel lacks {what}")),
            }
        }
        Err(TrackError::Unsupported {
            method: Method::SoftDirty,
            what: "CONFIG_MEM_SOFT_DIRTY (and userfaultfd write-protection)",
        })
    }

    /// Probes this kernel and chooses.
    pub fn probe(forced: Option<Method>) -> Result<Selection, TrackError> {
        let offered = features::kernel_features().unwrap_or_default();
        Self::choose(
            offered.contains(Features::WP_ASYNC),
            features::pagemap_scan_works(),
            offered.contains(Features::PAGEFAULT_FLAG_WP),
            features::probe_soft_dirty(),
            forced,
        )
    }

    /// The [`LinuxMm`](crate::backend::linux::LinuxMm) configuration the chosen method needs.
    pub fn config(&self) -> Config {
        match self.method {
            Method::AsyncWp => Config::async_wp(),
            Method::SyncWp => Config::default(),
            Method::SoftDirty => Config {
                required: Features::empty(),
                ..Config::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_falls_back_in_order_and_says_why() {
        let s = Selection::choose(true, true, true, false, None).unwrap();
        assert_eq!(
            (s.method, s.reason.as_str()),
            (Method::AsyncWp, "best available")
        );
        let s = Selection::choose(true, false, true, false, None).unwrap();
        assert_eq!(s.method, Method::SyncWp);
        assert_eq!(s.reason, "no async-wp: kernel lacks PAGEMAP_SCAN");
        let s = Selection::choose(false, false, false, true, None).unwrap();
        assert_eq!(s.method, Method::SoftDirty);
        assert!(
            s.reason.contains("UFFD_FEATURE_PAGEFAULT_FLAG_WP"),
            "{}",
            s.reason
        );
        assert!(matches!(
            Selection::choose(false, false, false, false, None),
            Err(TrackError::Unsupported { .. })
        ));
        assert!(matches!(
            Selection::choose(true, true, true, false, Some(Method::SoftDirty)),
            Err(TrackError::Unsupported {
                method: Method::SoftDirty,
                what: "CONFIG_MEM_SOFT_DIRTY"
            })
        ));
        let s = Selection::choose(true, true, true, false, Some(Method::SyncWp)).unwrap();
        assert_eq!(s.method, Method::SyncWp);
        assert!(!s.config().required.contains(Features::WP_ASYNC));
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
        }
    }
}
