//! `weft`, the command a Weft user types.
//!
//! Today it has one subcommand, `weft demo`, which runs a two-proxy mesh on
//! loopback (two in-process apps, two `weft-proxy` children) and shows live
//! golden metrics read from the proxies' admin endpoints. `inject`,
//! `install`, `check`, `stat` and `policy explain` will join it.
//!
//! The binary (`src/main.rs`) only parses arguments and sets up logging; the
//! work lives here:
//!
//! - [`demo`]: the demo's apps, proxy processes and live table.
//! - [`inject`]: `weft inject`, the injector's patch over manifests, offline.
//! - [`promtext`]: a parser for the Prometheus text format the proxies serve.
//! - [`stats`]: rates, success rates and latency quantiles from two scrapes,
//!   meant to be shared with a future `weft stat`.

pub mod demo;
pub mod inject;
pub mod promtext;
pub mod stats;
