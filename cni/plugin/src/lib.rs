//! The CNI plugin (CNI spec 1.1.0): wires a pod's veth, addresses and routes, attaches the datapath
