//! The shared Kubernetes model: label selectors, named ports, NetworkPolicy evaluation, route and CRD types (no I/O)
