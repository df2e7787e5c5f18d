//! Worlds for tests, shared with other crates behind the `testing` feature
//! (and always compiled for this crate's own tests), so that the model's
//! property tests and the datapath's namespace tests run the same worlds
//! and the same truth tables — written once.
//!
//! - [`random`]: proptest strategies for random worlds around a fixed
//!   [`random::Layout`] of pods and addresses (labels, namespace labels,
//!   named ports and policies random, every NetworkPolicy feature).
//! - [`e2e`]: the cases of Kubernetes' NetworkPolicy e2e suite (namespaces
//!   x, y, z with pods a, b, c) as truth tables, plus Weft's additions for
//!   what the suite does not cover (endPort, policyTypes defaults).
//!
//! ```toml
//! [dev-dependencies]
//! weft-model = { workspace = true, features = ["testing"] }
//! ```

pub mod e2e;
pub mod random;
