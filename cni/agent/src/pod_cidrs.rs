//! The plugin's `node` request: this node's pod CIDRs, for a conflist whose host-local
//! ranges say `"subnet": "usePodCidr"` (`weft_cni::pod_cidr`).
//!
//! The answer comes from the same index [`crate::routing`] reads the other nodes' pod CIDRs
//! from, so a pod's address and the routes the other nodes hold towards it come from one
//! Node object. When this node's pod CIDRs are not known (the source has not synced, no Node
//! is named `--node`, or its `spec.podCIDRs` is empty) the answer is an error that says
//! which: the plugin fails ADD with it and the kubelet retries, rather than host-local
//! allocating from a range no other node routes here.

use std::collections::HashMap;
use std::sync::Arc;

use weft_cni::agent_proto::{Handler, Request, Response};
use weft_cni::result::IpNet;
use weft_controller::index::Index;
use weft_controller::source::Readiness;
use weft_model::Node;

/// The answer to `node` for node `me`, given the index's Nodes and whether the source has
/// synced (before that, a missing Node may only be not listed yet).
pub fn answer(nodes: &HashMap<String, Arc<Node>>, me: &str, synced: bool) -> Response {
    let err = |msg: String| Response::Error { msg };
    if !synced {
        return err(format!(
            "weft-cni-agent is not ready: the cluster source has not synced yet, so node {me}'s \
             spec.podCIDRs is not known; retry shortly"
        ));
    }
    let Some(node) = nodes.get(me) else {
        return err(format!(
            "node {me} (weft-cni-agent --node) is not known: the cluster source has no Node of \
             that name, so its spec.podCIDRs cannot be read; check that --node is this node's \
             Kubernetes name (the agent pod's spec.nodeName)"
        ));
    };
    if node.pod_cidrs.is_empty() {
        return err(format!(
            "node {me} has no pod CIDR yet: its Node's spec.podCIDRs is empty; it is set by \
             kube-controller-manager (--allocate-node-cidrs) or by whoever created the Node, \
             and pods on this node wait until then"
        ));
    }
    Response::Node {
        name: me.to_string(),
        pod_cidrs: node
            .pod_cidrs
            .iter()
            // A Cidr's address is its network address (what host-local requires).
            .map(|c| IpNet {
                addr: c.addr(),
                prefix: c.prefix_len(),
            })
            .collect(),
    }
}

/// The plugin's handler with `node` answered from the index; every other request goes to
/// the inner handler (the endpoints side does not know which node it is on).
pub struct WithPodCidrs<H> {
    inner: Arc<H>,
    node: String,
    index: Index,
    readiness: Readiness,
}

impl<H> WithPodCidrs<H> {
    pub fn new(inner: Arc<H>, node: String, index: Index, readiness: Readiness) -> Arc<Self> {
        Arc::new(WithPodCidrs {
            inner,
            node,
            index,
            readiness,
        })
    }
}

impl<H: Handler> Handler for WithPodCidrs<H> {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Node => {
                let synced = self.readiness.is_ready();
                let nodes = self.index.read().nodes.clone();
                let response = answer(&nodes, &self.node, synced);
                if let Response::Error { msg } = &response {
                    tracing::warn!(node = %self.node, "the plugin asked for this node's pod CIDRs (usePodCidr): {msg}");
                }
                response
            }
            other => self.inner.handle(other).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_controller::index::Change;
    use weft_model::Object;

    fn node(name: &str, cidrs: &[&str]) -> Node {
        Node {
            name: name.to_string(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
            internal_ips: vec!["192.168.77.11".parse().expect("ip")],
        }
    }

    /// Answers `ok` to everything: what reaches the endpoints side.
    struct Inner;

    impl Handler for Inner {
        async fn handle(&self, _: Request) -> Response {
            Response::Ok
        }
    }

    fn msg(r: Response) -> String {
        match r {
            Response::Error { msg } => msg,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn node_is_answered_from_the_index_with_this_nodes_cidrs() {
        let index = Index::new();
        index.apply([
            Change::Upsert(Object::Node(node(
                "node-1",
                &["10.77.1.0/24", "fd77:0:1::/64"],
            ))),
            Change::Upsert(Object::Node(node("node-2", &["10.77.2.0/24"]))),
        ]);
        let readiness = Readiness::default();
        readiness.set_ready();
        let h = WithPodCidrs::new(
            Arc::new(Inner),
            "node-1".into(),
            index.clone(),
            readiness.clone(),
        );
        assert_eq!(
            h.handle(Request::Node).await,
            Response::Node {
                name: "node-1".into(),
                pod_cidrs: vec![
                    "10.77.1.0/24".parse().expect("cidr"),
                    "fd77:0:1::/64".parse().expect("cidr")
                ],
            }
        );
        // Other requests are the inner handler's.
        assert_eq!(h.handle(Request::Status).await, Response::Ok);

        // The same index, another node: its own CIDRs, never node-1's.
        let h2 = WithPodCidrs::new(Arc::new(Inner), "node-2".into(), index.clone(), readiness);
        assert_eq!(
            h2.handle(Request::Node).await,
            Response::Node {
                name: "node-2".into(),
                pod_cidrs: vec!["10.77.2.0/24".parse().expect("cidr")],
            }
        );

        // A Node without pod CIDRs yet (a new node before node IPAM assigned any).
        index.apply([Change::Upsert(Object::Node(node("node-1", &[])))]);
        let m = msg(h.handle(Request::Node).await);
        assert!(
            m.contains("node-1") && m.contains("spec.podCIDRs is empty"),
            "{m}"
        );
    }

    #[test]
    fn unknown_node_and_unsynced_source_say_so() {
        let nodes: HashMap<String, Arc<Node>> = [(
            "node-2".to_string(),
            Arc::new(node("node-2", &["10.77.2.0/24"])),
        )]
        .into();
        let m = msg(answer(&nodes, "node-1", true));
        assert!(
            m.contains("node node-1") && m.contains("--node") && m.contains("spec.podCIDRs"),
            "{m}"
        );
        let m = msg(answer(&nodes, "node-2", false));
        assert!(m.contains("not synced") && m.contains("node-2"), "{m}");
    }
}
