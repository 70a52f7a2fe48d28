//! Criterion benchmarks of eventbus live in `benches/`.
