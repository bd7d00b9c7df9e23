//! The lab capabilities the differential tester's driver uses (fixed placement, writes that
//! serve uffd-wp faults, advice, a pin taken and released, a punch across mappings and gaps)
//! do the same on the Linux lab and on the model's.

use uffd_wp::backend::linux::lab::LinuxLab;
use uffd_wp::range::{PAGE_SIZE, Range};
use uffd_wp::seam::lab::{Advice, Lab, LabConfig, MapKind, WpFault};
use uffd_wp::seam::{Errno, RegisterMode, WpMode};
use uffd_wp_model::Semantics;
use uffd_wp_model::lab::ModelLab;

const P: u64 = PAGE_SIZE;

/// `UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP`.
const WRITE_WP: u64 = 3;

fn pages(base: u64, a: u64, b: u64) -> Range {
    Range::from_bounds(base + a * P, base + b * P)
}

/// Per page of `r`: `.` none, `p` present, `P` present and uffd-wp, `m` marker or swap entry.
fn states(lab: &dyn Lab, r: Range) -> String {
    lab.mm()
        .page_states(r)
        .unwrap()
        .iter()
        .map(|s| match (s.present, s.uffd_wp) {
            (true, true) => 'P',
            (true, false) => 'p',
            (false, true) => 'm',
            _ => '.',
        })
        .collect()
}

/// Runs the capabilities on `lab`; returns the page states after each step.
fn exercise(lab: &mut dyn Lab) -> Vec<String> {
    // Eight free pages: mapped, then unmapped again.
    let all = lab.map(8 * P, P, MapKind::Anon).unwrap();
    lab.punch(all).unwrap();
    let base = all.start();
    let (anon, shmem) = (pages(base, 0, 4), pages(base, 4, 8));
    lab.map_at(anon, MapKind::Anon).unwrap();
    lab.map_at(shmem, MapKind::Memfd).unwrap();
    let again = lab.map_at(pages(base, 3, 5), MapKind::Anon).unwrap_err();
    assert_eq!(again.errno(), Errno::EXIST, "{again}");
    for r in [anon, shmem] {
        lab.mm().register(r, RegisterMode::WP).unwrap();
        lab.touch(r).unwrap();
    }
    lab.mm().writeprotect(all, WpMode::Protect).unwrap();
    let mut seen = vec![states(lab, all)];

    let faults = lab.write(base + P + 1, &[7]).unwrap();
    assert_eq!(
        faults,
        [WpFault {
            page: base + P,
            flags: WRITE_WP
        }]
    );
    let mut b = [0u8];
    lab.mm().read_memory(base + P + 1, &mut b).unwrap();
    assert_eq!(b, [7]);
    seen.push(states(lab, all));

    let buf = pages(base, 5, 6);
    let faults = lab.pin_fixed_buffer(buf).unwrap();
    assert_eq!(
        faults,
        [WpFault {
            page: buf.start(),
            flags: WRITE_WP
        }],
        "the pin faults the page in for write"
    );
    let w = lab.write_through_pin(buf.start(), &[9; 8]).unwrap();
    assert_eq!((w.bytes, w.landed, w.wp_faults), (8, true, 0));
    lab.unpin_fixed_buffer(buf).unwrap();
    assert_eq!(
        lab.unpin_fixed_buffer(buf).unwrap_err().errno(),
        Errno::FAULT,
        "released already"
    );
    seen.push(states(lab, all));

    // Anonymous memory drops its protection with its pages (no marker).
    lab.advise(pages(base, 0, 2), Advice::DontNeed).unwrap();
    seen.push(states(lab, all));
    // Across both mappings, then across the hole that left.
    lab.punch(pages(base, 3, 5)).unwrap();
    seen.push(states(lab, all));
    lab.punch(pages(base, 2, 7)).unwrap();
    seen.push(states(lab, all));
    seen
}

#[test]
fn the_linux_and_model_labs_agree() {
    let mut linux = match LinuxLab::open(LabConfig::default()) {
        Ok(l) => l,
        Err(e) => {
            assert!(
                !std::env::var("UFFD_WP_REQUIRE_KERNEL").is_ok_and(|v| v == "1"),
                "kernel feature userfaultfd with WP_UNPOPULATED is required: {e}"
            );
            eprintln!("SKIPPED: needs kernel feature userfaultfd with WP_UNPOPULATED: {e}");
            return;
        }
    };
    let mut model = ModelLab::open(Semantics::Linux, LabConfig::default()).unwrap();
    let on_model = exercise(&mut model);
    assert_eq!(
        on_model,
        [
            "PPPPPPPP", "PpPPPPPP", "PpPPPpPP", "..PPPpPP", "..P..pPP", ".......P"
        ]
    );
    assert_eq!(exercise(&mut linux), on_model);
}
