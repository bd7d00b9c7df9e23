//! The layers of DESIGN.md, checked on the source: no module imports from a layer above its
//! own. A module's layer is its top-level folder (or file) under `src/`; what it imports is
//! every `crate::NAME` path in its non-test code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The library's layers, bottom to top. A module may import from its own layer and below.
const LAYERS: &[&str] = &[
    "range", "sys", "features", "helper", "seam", "backend", "engine", "dump", "scenario",
    "testing",
];

/// What the reference model's backend files may import from the library (its `lab.rs` also
/// hosts the model-only scenarios, which stand above the engines, and is checked apart).
const MODEL_MAY_IMPORT: &[&str] = &["range", "features", "seam"];

fn rank(layer: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == layer)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable source folder") {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file before its unit tests, without comments.
fn code(p: &Path) -> String {
    let text = std::fs::read_to_string(p).expect("readable source file");
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module named after `prefix` (`crate::` or `uffd_wp::`) in `code`,
/// including those inside `use prefix{a::.., b}` groups.
fn imports(code: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let after = &rest[i + prefix.len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(name);
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(name);
        }
        rest = &after[1.min(after.len())..];
    }
    found.retain(|n| !n.is_empty());
    found
}

fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

#[test]
fn no_library_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for f in &files {
        let layer = layer_of(&src, f);
        if layer == "lib" {
            continue;
        }
        let own = rank(&layer).unwrap_or_else(|| panic!("{layer} is in no layer of LAYERS"));
        for name in imports(&code(f), "crate::") {
            let Some(r) = rank(&name) else {
                continue; // an item of lib.rs (a re-export), not a module
            };
            checked += 1;
            if r > own {
                upward
                    .entry(f.strip_prefix(&src).unwrap().display().to_string())
                    .or_default()
                    .push(format!("{layer} -> {name}"));
            }
        }
    }
    assert!(checked > 100, "the scan found only {checked} imports");
    assert!(
        upward.is_empty(),
        "imports from a higher layer: {upward:#?}"
    );
}

#[test]
fn the_models_backend_imports_only_the_seam_and_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../uffd-wp-model/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut bad = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        if name == "lab.rs" || name == "tests.rs" {
            continue;
        }
        for m in imports(&code(f), "uffd_wp::") {
            if !MODEL_MAY_IMPORT.contains(&m.as_str()) {
                bad.push(format!("{}: uffd_wp::{m}", f.display()));
            }
        }
    }
    assert!(
        files.len() > 5,
        "model sources not found under {}",
        src.display()
    );
    assert!(
        bad.is_empty(),
        "the model backend reaches above the seam: {bad:#?}"
    );
}

/// The differential tester drives the kernel through the backend users run (`LinuxLab`,
/// `LinuxMm`), never through the raw kernel interface, so that it tests that backend.
#[test]
fn the_differential_tester_does_not_reach_sys() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../uffd-wp-compare/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut bad = Vec::new();
    for f in &files {
        for m in imports(&code(f), "uffd_wp::") {
            checked += 1;
            if m == "sys" {
                bad.push(f.display().to_string());
            }
        }
    }
    assert!(checked > 10, "the scan found only {checked} imports");
    assert!(bad.is_empty(), "uffd_wp::sys used by {bad:#?}");
}

#[test]
fn the_scan_sees_grouped_and_plain_imports() {
    let code = "use crate::{range::Range, seam};\nlet x = crate::engine::protect::f();";
    assert_eq!(imports(code, "crate::"), ["range", "seam", "engine"]);
}
