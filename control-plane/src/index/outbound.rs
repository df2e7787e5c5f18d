//! Placeholder: the compilation of routes into an outbound policy lands next.
