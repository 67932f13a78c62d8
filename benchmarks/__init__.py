"""kvstore's benchmarks: run each from the repository's top folder as a module,
`python -m benchmarks.bench_store [--quick]` (see docs/BENCHMARKS.md). Output goes through `benchmarks.report`."""
