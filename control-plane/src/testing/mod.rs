//! Test support (feature `testing`).
pub mod fake_apiserver;
