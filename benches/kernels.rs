//! Criterion benchmarks of the fused row kernels (kernels spec §9): `token_kl/f32/full/{1t,2t}`
//! (P-a), `token_kl/f32/forward/...`, `selected_logp/f32/full/...` and `exp_f32`, each with the
//! siblings `naive`, `fused`, `libtorch` and (full groups) `injected`, and `stream/{read,copy}`
//! (the machine's single-thread memory roof on the P-a buffer size).
//!
//! Shapes: `AMEND_BENCH=fast` (default), `medium` or `large` (2048×50257 is P-a). Restrict the
//! thread counts with `AMEND_BENCH_THREADS=1`. Every case checks once, before timing, that the
//! siblings agree. Results and the exact commands are in `docs/performance.md`.
//!
//! ```text
//! AMEND_BENCH=large AMEND_BENCH_THREADS=1 cargo bench --bench kernels -- 'token_kl/f32/full/1t/.*/2048x50257'
//! ```

use criterion::{criterion_group, criterion_main};

mod kernels {
    pub mod common;
    pub mod exp;
    pub mod selected_logp;
    pub mod stream;
    pub mod token_kl;
}

criterion_group!(
    benches,
    kernels::token_kl::full,
    kernels::token_kl::forward,
    kernels::selected_logp::full,
    kernels::exp::bench,
    kernels::stream::bench
);
criterion_main!(benches);
