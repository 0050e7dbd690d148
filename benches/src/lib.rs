//! Benchmarks for mesh.
//!
//! Criterion benchmarks live in this package's `benches/` directory and load scripts beside
//! it. Every figure is reported as a ratio against a baseline measured in the same run
//! (our balancer against tower's `balance::p2c`, each layer against a bare `service_fn`,
//! the proxy against a direct connection). The package holds no benchmark yet.
