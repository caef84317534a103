//! The benchmark suite.
