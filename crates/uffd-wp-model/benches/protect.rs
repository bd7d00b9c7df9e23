//! Placeholder (the bench is written below).
fn main() {}
