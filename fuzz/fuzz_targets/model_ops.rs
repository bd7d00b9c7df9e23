//! Operation sequences on the reference model: no panic, the model's invariants hold after
//! every operation, and the exact engine's report partitions the arena and equals the model's
//! page tables. Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run model_ops` (from this folder's parent);
//! the corpus in fuzz/corpus/model_ops is replayed by `cargo test -p uffd-wp-compare`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = uffd_wp_compare::fuzz_model(data) {
        panic!("{e}");
    }
});
