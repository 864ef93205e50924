//! The `main` of a bench with a counting mode for callgrind (`benches/lib.sh`'s
//! `callgrind_bench`): with `var=n` in the environment, `count(n)` runs instead of
//! criterion's benches.

/// Runs `count(n)` when `var` holds a number `n`, else the criterion `benches`.
pub fn main_with(var: &str, count: fn(u64), benches: fn()) {
    if let Some(n) = std::env::var(var).ok().and_then(|n| n.parse().ok()) {
        count(n);
        return;
    }
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
