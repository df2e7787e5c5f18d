//! The eBPF datapath: C programs in cni/bpf, loaded, pinned and filled with aya
