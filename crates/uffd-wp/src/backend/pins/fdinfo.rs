//! Parsers for the two `/proc` texts pin discovery reads: `/proc/PID/fdinfo/FD` of an io_uring
//! fd, and the `VmPin` line of `/proc/PID/status` (found with
//! [`crate::backend::procfs::status_field`]; reading the files is
//! [`crate::backend::procfs::ProcDir`]'s job).
//!
//! The io_uring part of fdinfo (io_uring/fdinfo.c, `io_uring_show_fdinfo`) on 6.18, checked on
//! this machine by registering buffers and reading it back:
//!
//! ```text
//! ino:    34347
//! ...
//! UserFiles:      0
//! UserBufs:       2
//!     0: 0x7ff8ac608000/12288
//!     1: 0x7ff8ac60b000/4096
//! PollList:
//! ```
//!
//! Each entry is `"%5u: 0x%llx/%u"`, or `"%5u: <none>"` for an empty slot of a sparse table.
//! The kernel prints the entries only if it gets the ring's `uring_lock` with a trylock: while
//! the ring is busy, `UserBufs: N` is followed by no entries at all. That, and any text cut
//! short, is [`FdinfoError::Truncated`]; the caller reads again.

/// One registered buffer as fdinfo lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserBuf {
    /// Its index in the ring's buffer table (`buf_index` of `READ_FIXED`).
    pub index: u32,
    /// Its first byte (`ubuf`), not necessarily page aligned; 0 for a kernel-registered buffer
    /// (a bio vector of a driver, not in the address space).
    pub addr: u64,
    /// Its length in bytes (at most 1 GiB, never 0).
    pub len: u64,
}

/// What the io_uring part of an fdinfo text says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingInfo {
    /// The ring's inode number (`ino:`), unique per ring: two fds of the same ring show the same
    /// one. `None` when the text has no `ino:` line.
    pub ino: Option<u64>,
    /// The size of the buffer table (`UserBufs:`), empty slots included.
    pub table_len: u32,
    /// The registered buffers, ascending by index; empty slots (`<none>`) are left out.
    pub bufs: Vec<UserBuf>,
}

/// Why an fdinfo or status text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdinfoError {
    /// No `UserBufs:` line: not an io_uring fdinfo, or a format this parser does not know.
    #[error("no UserBufs: line (not an io_uring fdinfo, or an unknown format)")]
    NoUserBufs,
    /// The table announces more entries than the text lists: the ring was busy (the kernel
    /// lists them only when a trylock of the ring's lock succeeds) or the text was cut short.
    #[error("UserBufs: {announced} but {listed} entries listed (ring busy or text truncated)")]
    Truncated {
        /// The `UserBufs:` count.
        announced: u32,
        /// Entries actually listed.
        listed: u32,
    },
    /// The text ends in the middle of the `UserBufs:` line.
    #[error("text cut short in the middle of line {line_no} (UserBufs:)")]
    CutShort {
        /// 1-based line number.
        line_no: usize,
    },
    /// A line the format does not allow.
    #[error("line {line_no}: {what}: {line:?}")]
    BadLine {
        /// 1-based line number.
        line_no: usize,
        /// The line (at most 120 characters of it).
        line: String,
        /// What is wrong with it.
        what: &'static str,
    },
    /// `/proc/PID/status` has a `VmPin:` line that is not `<number> kB`.
    #[error("status line {line:?} is not `VmPin: <n> kB`")]
    BadVmPin {
        /// The line (at most 120 characters of it).
        line: String,
    },
}

fn bad(line_no: usize, line: &str, what: &'static str) -> FdinfoError {
    FdinfoError::BadLine {
        line_no,
        line: line.chars().take(120).collect(),
        what,
    }
}

/// Whether a line is an entry of a table (`"%5u: ..."`): optional blanks, then a digit.
fn is_entry(line: &str) -> bool {
    line.trim_start_matches([' ', '\t'])
        .starts_with(|c: char| c.is_ascii_digit())
}

/// A decimal `u64` of ASCII digits only (no sign, no blanks).
fn dec(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses one entry line after `UserBufs:`; `None` for an empty slot.
fn parse_entry(line_no: usize, line: &str) -> Result<(u32, Option<(u64, u64)>), FdinfoError> {
    let t = line.trim_start_matches([' ', '\t']);
    let (idx, rest) = t
        .split_once(':')
        .ok_or_else(|| bad(line_no, line, "entry without ':'"))?;
    let index = dec(idx)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| bad(line_no, line, "entry index is not a number"))?;
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| bad(line_no, line, "no blank after the index"))?;
    if rest == "<none>" {
        return Ok((index, None));
    }
    let (addr, len) = rest
        .split_once('/')
        .ok_or_else(|| bad(line_no, line, "entry is not 0xADDR/LEN"))?;
    let addr = addr
        .strip_prefix("0x")
        .filter(|h| !h.is_empty() && h.len() <= 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| bad(line_no, line, "address is not 0x<hex>"))?;
    let len = dec(len).ok_or_else(|| bad(line_no, line, "length is not a number"))?;
    if len == 0 || len > 1 << 30 {
        return Err(bad(line_no, line, "length outside (0, 1 GiB]"));
    }
    if addr.checked_add(len).is_none() {
        return Err(bad(line_no, line, "buffer overflows the address space"));
    }
    Ok((index, Some((addr, len))))
}

/// Parses the io_uring part of `/proc/PID/fdinfo/FD`. Never panics: any text gives either a
/// [`RingInfo`] or a typed error. The kernel ends every line with a newline, so a `UserBufs:`
/// line or an entry without one is a text cut short ([`FdinfoError::Truncated`]), never a
/// shorter number.
pub fn parse_io_uring_fdinfo(text: &str) -> Result<RingInfo, FdinfoError> {
    let mut ino = None;
    // (line number, line without its newline, whether it had one)
    let mut lines = text.split_inclusive('\n').enumerate().map(|(i, l)| {
        let done = l.ends_with('\n');
        (i + 1, l.strip_suffix('\n').unwrap_or(l), done)
    });
    let mut table_len = None;
    for (line_no, line, done) in lines.by_ref() {
        if let Some(v) = line.strip_prefix("ino:") {
            if done {
                ino = Some(dec(v.trim()).ok_or_else(|| bad(line_no, line, "ino is not a number"))?);
            }
        } else if let Some(v) = line.strip_prefix("UserBufs:") {
            if !done {
                return Err(FdinfoError::CutShort { line_no });
            }
            let n = dec(v.trim_start_matches([' ', '\t']))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(line_no, line, "UserBufs count is not a number"))?;
            table_len = Some(n);
            break;
        }
    }
    let announced = table_len.ok_or(FdinfoError::NoUserBufs)?;
    let mut bufs = Vec::new();
    let mut listed: u32 = 0;
    for (line_no, line, done) in lines {
        if !is_entry(line) {
            break;
        }
        if !done {
            // The last line, cut short: whatever it says may be a prefix of the real entry.
            break;
        }
        let (index, buf) = parse_entry(line_no, line)?;
        if index != listed {
            return Err(bad(line_no, line, "entry index out of sequence"));
        }
        if listed >= announced {
            return Err(bad(line_no, line, "more entries than UserBufs announces"));
        }
        listed += 1;
        if let Some((addr, len)) = buf {
            bufs.push(UserBuf { index, addr, len });
        }
    }
    if listed < announced {
        return Err(FdinfoError::Truncated { announced, listed });
    }
    Ok(RingInfo {
        ino,
        table_len: announced,
        bufs,
    })
}

/// The `VmPin` of a `/proc/PID/status` text in bytes; `None` when the process has no address
/// space (a zombie, or a kernel thread: the kernel prints no `Vm*` lines then).
pub fn parse_vm_pin(status: &str) -> Result<Option<u64>, FdinfoError> {
    let Some(raw) = crate::backend::procfs::status_field(status, "VmPin") else {
        return Ok(None);
    };
    let badline = || FdinfoError::BadVmPin {
        line: format!("VmPin:{raw}").chars().take(120).collect(),
    };
    let v = raw.trim();
    let kb = v.strip_suffix("kB").ok_or_else(badline)?.trim_end();
    let kb = dec(kb).ok_or_else(badline)?;
    kb.checked_mul(1024).map(Some).ok_or_else(badline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Captured on this machine (6.18): two buffers on one ring.
    const REAL: &str = concat!(
        "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t34347\nSqMask:\t0x7\n",
        "SqHead:\t0\nSqTail:\t0\nCachedSqHead:\t0\nCqMask:\t0xf\nCqHead:\t0\nCqTail:\t0\n",
        "CachedCqTail:\t0\nSQEs:\t0\nCQEs:\t0\nSqThread:\t-1\nSqThreadCpu:\t-1\n",
        "SqTotalTime:\t0\nSqWorkTime:\t0\nUserFiles:\t0\nUserBufs:\t2\n",
        "    0: 0x7ff8ac608000/12288\n",
        "    1: 0x7ff8ac60b000/4096\n",
        "PollList:\nCqOverflowList:\nNAPI:\tdisabled\n",
    );

    #[test]
    fn parses_the_real_format() {
        let r = parse_io_uring_fdinfo(REAL).unwrap();
        assert_eq!(r.ino, Some(34347));
        assert_eq!(r.table_len, 2);
        assert_eq!(
            r.bufs,
            vec![
                UserBuf {
                    index: 0,
                    addr: 0x7ff8ac608000,
                    len: 12288
                },
                UserBuf {
                    index: 1,
                    addr: 0x7ff8ac60b000,
                    len: 4096
                }
            ]
        );
    }

    #[test]
    fn sparse_slots_and_empty_tables() {
        let t = "UserBufs:\t3\n    0: <none>\n    1: 0x1000/1\n    2: <none>\nPollList:\n";
        let r = parse_io_uring_fdinfo(t).unwrap();
        assert_eq!(r.table_len, 3);
        assert_eq!(
            r.bufs,
            vec![UserBuf {
                index: 1,
                addr: 0x1000,
                len: 1
            }]
        );
        let r = parse_io_uring_fdinfo("UserBufs:\t0\nPollList:\n").unwrap();
        assert!(r.bufs.is_empty());
    }

    #[test]
    fn busy_ring_is_truncated() {
        // What the kernel prints when the trylock fails: the count, no entries.
        let t = "UserFiles:\t0\nUserBufs:\t2\nPollList:\n";
        assert_eq!(
            parse_io_uring_fdinfo(t),
            Err(FdinfoError::Truncated {
                announced: 2,
                listed: 0
            })
        );
        let cut = &REAL[..REAL.find("    1:").unwrap()];
        assert_eq!(
            parse_io_uring_fdinfo(cut),
            Err(FdinfoError::Truncated {
                announced: 2,
                listed: 1
            })
        );
    }

    #[test]
    fn malformed_lines_are_typed_errors() {
        for (t, what) in [
            ("UserBufs:\tx\n", "UserBufs count is not a number"),
            ("UserBufs:\t1\n    0: 7000/1\n", "address is not 0x<hex>"),
            (
                "UserBufs:\t1\n    0: 0x7000/0\n",
                "length outside (0, 1 GiB]",
            ),
            ("UserBufs:\t1\n    0: 0x7000/-1\n", "length is not a number"),
            (
                "UserBufs:\t1\n    1: 0x7000/1\n",
                "entry index out of sequence",
            ),
            (
                "UserBufs:\t1\n    0: 0x7000/1\n    1: 0x8000/1\n",
                "more entries than UserBufs announces",
            ),
            (
                "UserBufs:\t1\n    0: 0xffffffffffffffff/2\n",
                "buffer overflows the address space",
            ),
            ("ino:\tz\nUserBufs:\t0\n", "ino is not a number"),
        ] {
            match parse_io_uring_fdinfo(t) {
                Err(FdinfoError::BadLine { what: w, .. }) => assert_eq!(w, what, "{t:?}"),
                other => panic!("{t:?}: {other:?}"),
            }
        }
        assert_eq!(
            parse_io_uring_fdinfo("pos:\t0\nflags:\t0\n"),
            Err(FdinfoError::NoUserBufs)
        );
    }

    #[test]
    fn vm_pin() {
        assert_eq!(
            parse_vm_pin("Name:\tx\nVmPin:\t      16 kB\n"),
            Ok(Some(16384))
        );
        assert_eq!(parse_vm_pin("Name:\tx\nState:\tZ (zombie)\n"), Ok(None));
        assert!(matches!(
            parse_vm_pin("VmPin:\t 12 MB\n"),
            Err(FdinfoError::BadVmPin { .. })
        ));
        assert!(matches!(
            parse_vm_pin("VmPin:\t99999999999999999999 kB\n"),
            Err(FdinfoError::BadVmPin { .. })
        ));
    }

    /// A well-formed table of buffers, rendered the way the kernel prints it.
    fn render(bufs: &[Option<(u64, u64)>]) -> String {
        let mut s = format!("ino:\t7\nUserFiles:\t0\nUserBufs:\t{}\n", bufs.len());
        for (i, b) in bufs.iter().enumerate() {
            match b {
                Some((a, l)) => s.push_str(&format!("{i:5}: 0x{a:x}/{l}\n")),
                None => s.push_str(&format!("{i:5}: <none>\n")),
            }
        }
        s.push_str("PollList:\nCqOverflowList:\n");
        s
    }

    fn buf() -> impl Strategy<Value = Option<(u64, u64)>> {
        prop_oneof![
            1 => Just(None),
            4 => (0u64..1 << 47, 1u64..=1 << 30).prop_map(Some),
        ]
    }

    proptest! {
        /// Well-formed text parses to exactly what was rendered.
        #[test]
        fn well_formed_round_trips(bufs in proptest::collection::vec(buf(), 0..20)) {
            let r = parse_io_uring_fdinfo(&render(&bufs)).unwrap();
            let want: Vec<UserBuf> = bufs
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.map(|(addr, len)| UserBuf { index: i as u32, addr, len }))
                .collect();
            prop_assert_eq!(r.bufs, want);
            prop_assert_eq!(r.table_len as usize, bufs.len());
            prop_assert_eq!(r.ino, Some(7));
        }

        /// Any prefix of a well-formed text (a read cut short) gives a typed error or exactly
        /// the full text's result (when the cut fell after the table): never a panic, never a
        /// wrong buffer.
        #[test]
        fn truncated_text_never_lies(bufs in proptest::collection::vec(buf(), 1..10), cut in 0.0f64..1.0) {
            let full = render(&bufs);
            let at = (full.len() as f64 * cut) as usize;
            let full_r = parse_io_uring_fdinfo(&full).unwrap();
            match parse_io_uring_fdinfo(&full[..at]) {
                Ok(r) => {
                    prop_assert_eq!(&r.bufs, &full_r.bufs);
                    prop_assert_eq!(r.table_len, full_r.table_len);
                }
                Err(FdinfoError::Truncated { announced, listed }) => {
                    prop_assert_eq!(announced as usize, bufs.len());
                    prop_assert!((listed as usize) < bufs.len());
                }
                Err(FdinfoError::CutShort { .. }) => {
                    prop_assert!(full[..at].ends_with(|c: char| c != '\n'));
                }
                Err(FdinfoError::NoUserBufs) => {
                    prop_assert!(at <= full.find("UserBufs:").unwrap() + "UserBufs:".len());
                }
                Err(e) => prop_assert!(false, "cut at {}: {:?}", at, e),
            }
        }

        /// Arbitrary bytes (lossily decoded), and well-formed text with one byte changed, give a
        /// result or a typed error, never a panic; a result always satisfies the invariants.
        #[test]
        fn garbage_never_panics(
            junk in proptest::collection::vec(any::<u8>(), 0..400),
            bufs in proptest::collection::vec(buf(), 0..6),
            pos in any::<usize>(),
            byte in any::<u8>(),
        ) {
            for text in [String::from_utf8_lossy(&junk).into_owned(), {
                let mut b = render(&bufs).into_bytes();
                if !b.is_empty() {
                    let i = pos % b.len();
                    b[i] = byte;
                }
                String::from_utf8_lossy(&b).into_owned()
            }] {
                if let Ok(r) = parse_io_uring_fdinfo(&text) {
                    prop_assert!(r.bufs.len() <= r.table_len as usize);
                    for w in r.bufs.windows(2) {
                        prop_assert!(w[0].index < w[1].index);
                    }
                    for b in &r.bufs {
                        prop_assert!(b.len > 0 && b.len <= 1 << 30);
                        prop_assert!(b.addr.checked_add(b.len).is_some());
                    }
                }
                let _ = parse_vm_pin(&text);
            }
        }
    }
}
