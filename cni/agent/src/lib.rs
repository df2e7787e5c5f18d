//! The CNI node agent: fills the datapath's maps from Pods, Namespaces and NetworkPolicies
