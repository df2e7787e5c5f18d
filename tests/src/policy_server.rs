//! A small in-test Policy controller for the authorization tests: it serves
//! `Policy.ServerPolicy` with the `InboundServer` the test gives each port (changed live:
//! every open stream gets the new policy), and `grpc.health.v1` SERVING for
//! `weft.destination.Destination`, so a proxy pointed at it with `WEFT_PROXY_DESTINATION_ADDR`
//! becomes ready. `Destination` itself is not served (UNIMPLEMENTED). Builders for the
//! messages sit beside it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use weft_proto::destination::{self as dpb};
use weft_proto::policy::policy_server::{Policy, PolicyServer};
use weft_proto::policy::{
    authorization::Authentication, Authorization, InboundRoute, InboundServer, MeshTls,
    ServerPolicyRequest, Unauthenticated,
};

type Servers = HashMap<u32, InboundServer>;

/// The running fake controller; stops when dropped.
pub struct PolicyController {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<Servers>>,
    requests: Arc<Mutex<Vec<ServerPolicyRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Svc {
    state: Arc<watch::Sender<Servers>>,
    requests: Arc<Mutex<Vec<ServerPolicyRequest>>>,
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<InboundServer, Status>> + Send>>;

#[tonic::async_trait]
impl Policy for Svc {
    type ServerPolicyStream = BoxStream;

    async fn server_policy(
        &self,
        req: Request<ServerPolicyRequest>,
    ) -> Result<Response<BoxStream>, Status> {
        let req = req.into_inner();
        let port = req.port;
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(req);
        let rx = self.state.subscribe();
        // The whole policy first, then again at each change of this port's policy.
        let s = futures_util::stream::unfold(
            (rx, None::<InboundServer>, true),
            move |(mut rx, last, mut first)| async move {
                loop {
                    if !first && rx.changed().await.is_err() {
                        return None;
                    }
                    first = false;
                    let now = rx
                        .borrow_and_update()
                        .get(&port)
                        .cloned()
                        .unwrap_or_else(all_unauthenticated);
                    if last.as_ref() != Some(&now) {
                        return Some((Ok(now.clone()), (rx, Some(now), false)));
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(s)))
    }
}

impl PolicyController {
    /// Serves on a free loopback port.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(watch::channel(Servers::new()).0);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(
                "weft.destination.Destination",
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let svc = Svc {
            state: state.clone(),
            requests: requests.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(PolicyServer::new(svc))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
        Ok(Self {
            addr,
            state,
            requests,
            task,
        })
    }

    /// Sets (or replaces, live) the policy of inbound `port`.
    pub fn set(&self, port: u16, server: InboundServer) {
        self.state.send_modify(|m| {
            m.insert(u32::from(port), server);
        });
    }

    /// The proxy's setting for this controller: plaintext (`http://`), as this fake serves
    /// no TLS.
    pub fn env(&self) -> (String, String) {
        (
            "WEFT_PROXY_DESTINATION_ADDR".into(),
            format!("http://{}", self.addr),
        )
    }

    /// The ServerPolicy requests received so far.
    pub fn requests(&self) -> Vec<ServerPolicyRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for PolicyController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a port gets before the test sets one: the cluster default.
pub fn all_unauthenticated() -> InboundServer {
    InboundServer {
        source: "default:all-unauthenticated".into(),
        authorizations: vec![unauthenticated("default:all-unauthenticated")],
        ..Default::default()
    }
}

/// A Server `source` with these authorizations and no routes.
pub fn server(source: &str, authorizations: Vec<Authorization>) -> InboundServer {
    InboundServer {
        source: source.into(),
        authorizations,
        ..Default::default()
    }
}

pub fn unauthenticated(name: &str) -> Authorization {
    Authorization {
        name: name.into(),
        networks: vec![],
        authentication: Some(Authentication::Unauthenticated(Unauthenticated {})),
    }
}

fn mesh(name: &str, identities: &[&str], namespaces: &[&str], any: bool) -> Authorization {
    Authorization {
        name: name.into(),
        networks: vec![],
        authentication: Some(Authentication::MeshTls(MeshTls {
            identities: identities.iter().map(|s| s.to_string()).collect(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            any,
        })),
    }
}

/// Mesh clients with exactly these SPIFFE IDs.
pub fn identities(name: &str, ids: &[&str]) -> Authorization {
    mesh(name, ids, &[], false)
}

/// Mesh clients of these namespaces.
pub fn namespaces(name: &str, nss: &[&str]) -> Authorization {
    mesh(name, &[], nss, false)
}

/// Any mesh client.
pub fn any_authenticated(name: &str) -> Authorization {
    mesh(name, &[], &[], true)
}

/// An HTTPRoute rule `httproute/<ns>/<name>/0` matching `method` (empty: any) and the path
/// prefix, with its own authorizations.
pub fn route(
    ns: &str,
    name: &str,
    method: &str,
    prefix: &str,
    authorizations: Vec<Authorization>,
) -> InboundRoute {
    InboundRoute {
        r#ref: Some(dpb::RouteRef {
            kind: "httproute".into(),
            namespace: ns.into(),
            name: name.into(),
            rule: "0".into(),
        }),
        matches: vec![dpb::RouteMatch {
            method: method.into(),
            path: Some(dpb::PathMatch {
                kind: Some(dpb::path_match::Kind::Prefix(prefix.into())),
            }),
            ..Default::default()
        }],
        authorizations,
    }
}
