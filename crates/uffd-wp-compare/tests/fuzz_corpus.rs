//! Replays the fuzz target's corpus (fuzz/corpus/model_ops, made by `cargo fuzz run model_ops`)
//! and a seeded batch of random inputs through the same check as the fuzz target.

use std::path::Path;

#[test]
fn fuzz_corpus_replays_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/model_ops");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the fuzz corpus is in the repository") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(e) = uffd_wp_compare::fuzz_model(&data) {
            panic!("{}: {e}", path.display());
        }
        n += 1;
    }
    assert!(n >= 100, "the corpus holds {n} inputs");
    eprintln!("replayed {n} corpus inputs");
}

#[test]
fn random_inputs_pass_the_fuzz_check() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for len in 0..400usize {
        let data: Vec<u8> = (0..len % 200)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        if let Err(e) = uffd_wp_compare::fuzz_model(&data) {
            panic!("input {data:?}: {e}");
        }
    }
}

#[test]
fn bytes_decode_into_operations() {
    // Map, register, protect: three operations, and the check passes on them.
    let data = [0u8, 0, 0, 7, 0, 6, 0, 7, 0, 8, 0, 7, 1];
    assert!(uffd_wp_compare::fuzz_model(&data).is_ok());
    let case = uffd_wp_compare::case_from_bytes(&data);
    assert_eq!(case.ops.len(), 3, "{case:?}");
}
