//! A small fake Kubernetes API server that speaks the real list/watch
//! protocol over plain HTTP, so the kube-rs watchers of
//! [`crate::source::kube`] run unmodified against it.
//!
//! - `GET /api/v1/{services,pods,namespaces}` and
//!   `GET /apis/discovery.k8s.io/v1/endpointslices` list:
//!   `{kind: XList, apiVersion, metadata: {resourceVersion}, items}`
//!   (`limit`/`continue` are accepted and ignored: one page).
//! - The same paths with `?watch=true&resourceVersion=N` stream
//!   newline-delimited `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK", "object"}`
//!   events newer than N, then live events.
//! - A watch from a resourceVersion older than the compaction point gets
//!   what the real server sends: one `ERROR` event whose object is a
//!   `Status` with code 410 (reason `Expired`), and the stream ends, which
//!   makes kube-rs re-list.
//!
//! - The same for `policy.weft.dev/v1alpha1` `servers` and
//!   `authorizationpolicies` (list and watch only), and for
//!   `gateway.networking.k8s.io/v1` `httproutes` and
//!   `grpcroutes` and `policy.weft.dev/v1alpha1` `backendpolicies`, whose
//!   status subresource takes `PATCH` (JSON merge patch) and `PUT` at
//!   `/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/status`:
//!   only `status` changes, the resourceVersion is bumped and watchers get
//!   `MODIFIED`, as on the real server ([`FakeApiServer::status_writes`]
//!   counts them, [`FakeApiServer::get`] reads an object back).
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` answers like the
//!   real server for the tokens registered with
//!   [`FakeApiServer::add_token`]: authenticated when the token's
//!   audiences intersect `spec.audiences` (`status.audiences` is the
//!   intersection), otherwise `authenticated: false` with the error the
//!   real server gives. Unknown tokens are not authenticated. A token
//!   registered with [`FakeApiServer::add_pod_token`] is a projected token
//!   bound to a pod: `status.user.extra` carries
//!   `authentication.kubernetes.io/pod-name` and `.../pod-uid` (and a
//!   node name), as the real server answers.
//!   [`FakeApiServer::fail_token_reviews`] makes it answer 403, as with
//!   missing RBAC.
//!
//! - For `weft check`: `GET /version` ([`FakeApiServer::set_version`]),
//!   and list (cluster-wide or in one namespace) and get of
//!   CustomResourceDefinitions, Deployments, DaemonSets,
//!   MutatingWebhookConfigurations, Secrets, ConfigMaps and Nodes
//!   ([`Resource::MORE`]), as of every kind above.
//!
//! Tests change state with [`FakeApiServer::apply`] / [`FakeApiServer::delete`],
//! send bookmarks with [`FakeApiServer::bookmark`], and break every watch
//! with [`FakeApiServer::expire_watches`], which can also change state
//! while no watch is connected (so only a re-list can reveal the change).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The collections the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Pods,
    Namespaces,
    HttpRoutes,
    GrpcRoutes,
    BackendPolicies,
    NetworkPolicies,
    Servers,
    AuthorizationPolicies,
    // Served for `weft check` (read with list and get; nothing watches them).
    CustomResourceDefinitions,
    Deployments,
    DaemonSets,
    MutatingWebhookConfigurations,
    Secrets,
    ConfigMaps,
    Nodes,
    /// `coordination.k8s.io/v1` Leases: also created (POST) and replaced (PUT, with the
    /// resourceVersion precondition), for leader election.
    Leases,
}

impl Resource {
    /// What the controller and the CNI agent watch.
    pub const ALL: [Resource; 10] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Pods,
        Resource::Namespaces,
        Resource::HttpRoutes,
        Resource::GrpcRoutes,
        Resource::BackendPolicies,
        Resource::NetworkPolicies,
        Resource::Servers,
        Resource::AuthorizationPolicies,
    ];

    /// The collections read by `weft check`, besides [`Resource::ALL`].
    pub const MORE: [Resource; 8] = [
        Resource::CustomResourceDefinitions,
        Resource::Deployments,
        Resource::DaemonSets,
        Resource::MutatingWebhookConfigurations,
        Resource::Secrets,
        Resource::ConfigMaps,
        Resource::Nodes,
        Resource::Leases,
    ];

    fn served() -> impl Iterator<Item = Resource> {
        Resource::ALL.into_iter().chain(Resource::MORE)
    }

    fn cluster_scoped(self) -> bool {
        matches!(
            self,
            Resource::Namespaces
                | Resource::CustomResourceDefinitions
                | Resource::MutatingWebhookConfigurations
                | Resource::Nodes
        )
    }

    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::Pods => "/api/v1/pods",
            Resource::Namespaces => "/api/v1/namespaces",
            Resource::HttpRoutes => "/apis/gateway.networking.k8s.io/v1/httproutes",
            Resource::GrpcRoutes => "/apis/gateway.networking.k8s.io/v1/grpcroutes",
            Resource::BackendPolicies => "/apis/policy.weft.dev/v1alpha1/backendpolicies",
            Resource::NetworkPolicies => "/apis/networking.k8s.io/v1/networkpolicies",
            Resource::Servers => "/apis/policy.weft.dev/v1alpha1/servers",
            Resource::AuthorizationPolicies => {
                "/apis/policy.weft.dev/v1alpha1/authorizationpolicies"
            }
            Resource::CustomResourceDefinitions => {
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            }
            Resource::Deployments => "/apis/apps/v1/deployments",
            Resource::DaemonSets => "/apis/apps/v1/daemonsets",
            Resource::MutatingWebhookConfigurations => {
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
            }
            Resource::Secrets => "/api/v1/secrets",
            Resource::ConfigMaps => "/api/v1/configmaps",
            Resource::Nodes => "/api/v1/nodes",
            Resource::Leases => "/apis/coordination.k8s.io/v1/leases",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::HttpRoutes | Resource::GrpcRoutes => "gateway.networking.k8s.io/v1",
            Resource::BackendPolicies | Resource::Servers | Resource::AuthorizationPolicies => {
                "policy.weft.dev/v1alpha1"
            }
            Resource::NetworkPolicies => "networking.k8s.io/v1",
            Resource::CustomResourceDefinitions => "apiextensions.k8s.io/v1",
            Resource::Deployments | Resource::DaemonSets => "apps/v1",
            Resource::MutatingWebhookConfigurations => "admissionregistration.k8s.io/v1",
            Resource::Leases => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::HttpRoutes => "HTTPRoute",
            Resource::GrpcRoutes => "GRPCRoute",
            Resource::BackendPolicies => "BackendPolicy",
            Resource::NetworkPolicies => "NetworkPolicy",
            Resource::Servers => "Server",
            Resource::AuthorizationPolicies => "AuthorizationPolicy",
            Resource::CustomResourceDefinitions => "CustomResourceDefinition",
            Resource::Deployments => "Deployment",
            Resource::DaemonSets => "DaemonSet",
            Resource::MutatingWebhookConfigurations => "MutatingWebhookConfiguration",
            Resource::Secrets => "Secret",
            Resource::ConfigMaps => "ConfigMap",
            Resource::Nodes => "Node",
            Resource::Leases => "Lease",
        }
    }

    /// `(resource, namespace, name)` of a namespaced collection
    /// (`{prefix}/namespaces/{ns}/{plural}`) or object path (`.../{name}`),
    /// or of a cluster-scoped object (`{prefix}/{plural}/{name}`).
    fn parse_path(path: &str) -> Option<(Resource, Option<String>, Option<String>)> {
        Resource::served().find_map(|r| {
            let (prefix, plural) = r.path().rsplit_once('/')?;
            let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
            let parts: Vec<&str> = rest.split('/').collect();
            match (r.cluster_scoped(), parts.as_slice()) {
                (false, ["namespaces", ns, p]) if *p == plural => {
                    Some((r, Some(ns.to_string()), None))
                }
                (false, ["namespaces", ns, p, name]) if *p == plural => {
                    Some((r, Some(ns.to_string()), Some(name.to_string())))
                }
                (true, [p, name]) if *p == plural => Some((r, None, Some(name.to_string()))),
                _ => None,
            }
        })
    }

    /// `(api prefix, plural)` of a namespaced custom resource with a
    /// status subresource.
    fn status_parts(self) -> Option<(&'static str, &'static str)> {
        let path = self.path();
        match self {
            Resource::HttpRoutes | Resource::GrpcRoutes | Resource::BackendPolicies => {
                path.rsplit_once('/')
            }
            _ => None,
        }
    }

    /// The collection an object of `kind` lives in.
    pub fn of_kind(kind: &str) -> Option<Resource> {
        Resource::served().find(|r| r.kind() == kind)
    }
}

type Key = (String, String);

/// A token the fake TokenReview knows.
struct FakeToken {
    username: String,
    audiences: Vec<String>,
    /// (pod name, pod UID) of a pod-bound projected token.
    pod: Option<(String, String)>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: HashMap<Resource, BTreeMap<Key, Value>>,
    /// (resourceVersion, resource, event line)
    log: Vec<(u64, Resource, Bytes)>,
    watchers: Vec<(Resource, mpsc::UnboundedSender<Bytes>)>,
    lists: HashMap<Resource, usize>,
    watches: HashMap<Resource, usize>,
    gone: HashMap<Resource, usize>,
    tokens: HashMap<String, FakeToken>,
    token_reviews: usize,
    fail_token_reviews: bool,
    status_writes: HashMap<Resource, usize>,
    /// What `GET /version` answers; `None`: 404.
    version: Option<Value>,
}

impl State {
    fn event(&mut self, resource: Resource, kind: &str, object: Value, broadcast: bool) {
        let line = Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
        self.log.push((self.rv, resource, line.clone()));
        if broadcast {
            self.watchers
                .retain(|(r, tx)| *r != resource || tx.send(line.clone()).is_ok());
        }
    }

    fn put(&mut self, mut object: Value, broadcast: bool) -> Resource {
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let Some(resource) = Resource::of_kind(&kind) else {
            panic!("fake API server does not serve kind {kind:?}");
        };
        self.rv += 1;
        object["apiVersion"] = json!(resource.api_version());
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = key_of(resource, &object);
        let existed = self
            .objects
            .entry(resource)
            .or_default()
            .insert(key, object.clone())
            .is_some();
        self.event(
            resource,
            if existed { "MODIFIED" } else { "ADDED" },
            object,
            broadcast,
        );
        resource
    }

    fn remove(&mut self, resource: Resource, namespace: &str, name: &str, broadcast: bool) -> bool {
        let key = (namespace.to_string(), name.to_string());
        let Some(mut object) = self.objects.entry(resource).or_default().remove(&key) else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.event(resource, "DELETED", object, broadcast);
        true
    }
}

fn key_of(resource: Resource, object: &Value) -> Key {
    let meta = &object["metadata"];
    let namespace = if resource.cluster_scoped() {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_string()
    };
    (
        namespace,
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// Changes made while every watch is broken (see
/// [`FakeApiServer::expire_watches`]).
pub struct Offline<'a>(&'a mut State);

impl Offline<'_> {
    pub fn apply(&mut self, object: Value) {
        self.0.put(object, false);
    }

    pub fn delete(&mut self, resource: Resource, namespace: &str, name: &str) -> bool {
        self.0.remove(resource, namespace, name, false)
    }
}

/// A running fake API server on loopback.
pub struct FakeApiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApiServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            version: Some(version_info(1, 31)),
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(route(&state, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(FakeApiServer { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube client pointed at this server over plain HTTP.
    pub fn client(&self) -> Result<kube::Client, kube::Error> {
        let uri: http::Uri = format!("http://{}", self.addr)
            .parse()
            .map_err(|e: http::uri::InvalidUri| kube::Error::Service(e.into()))?;
        let mut config = kube::Config::new(uri);
        config.connect_timeout = Some(std::time::Duration::from_secs(2));
        kube::Client::try_from(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (JSON with `kind` and `metadata.name`).
    pub fn apply(&self, object: Value) {
        self.lock().put(object, true);
    }

    /// Makes `GET /version` answer Kubernetes `1.minor` (`None`: not served at all).
    pub fn set_version(&self, version: Option<(u32, u32)>) {
        self.lock().version = version.map(|(major, minor)| version_info(major, minor));
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        self.lock().remove(resource, namespace, name, true)
    }

    /// Sends a BOOKMARK at the current resourceVersion on every watch.
    pub fn bookmark(&self) {
        let mut state = self.lock();
        let rv = state.rv.to_string();
        state.watchers.retain(|(r, tx)| {
            let object = json!({"kind": r.kind(), "apiVersion": r.api_version(), "metadata": {"resourceVersion": rv}});
            tx.send(Bytes::from(format!("{}\n", json!({"type": "BOOKMARK", "object": object}))))
                .is_ok()
        });
    }

    /// Ends every open watch, applies `offline` changes that no watch sees,
    /// and compacts history so that every watcher's next watch gets 410
    /// Gone and must re-list.
    pub fn expire_watches(&self, offline: impl FnOnce(&mut Offline<'_>)) {
        let mut state = self.lock();
        state.watchers.clear();
        offline(&mut Offline(&mut state));
        state.rv += 1;
        state.compacted = state.rv;
    }

    /// Makes `token` authenticate as `username` (e.g.
    /// `system:serviceaccount:ns:sa`) for `audiences`.
    pub fn add_token(&self, token: &str, username: &str, audiences: &[&str]) {
        self.insert_token(token, username, audiences, None);
    }

    /// Like [`FakeApiServer::add_token`], for a projected token the kubelet
    /// minted for pod `pod_name` (UID `pod_uid`): the review's
    /// `status.user.extra` names the pod.
    pub fn add_pod_token(
        &self,
        token: &str,
        username: &str,
        audiences: &[&str],
        pod_name: &str,
        pod_uid: &str,
    ) {
        self.insert_token(
            token,
            username,
            audiences,
            Some((pod_name.to_string(), pod_uid.to_string())),
        );
    }

    fn insert_token(
        &self,
        token: &str,
        username: &str,
        audiences: &[&str],
        pod: Option<(String, String)>,
    ) {
        self.lock().tokens.insert(
            token.to_string(),
            FakeToken {
                username: username.to_string(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                pod,
            },
        );
    }

    /// TokenReviews answered so far.
    pub fn token_reviews(&self) -> usize {
        self.lock().token_reviews
    }

    /// While set, TokenReview creation is refused with 403 Forbidden.
    pub fn fail_token_reviews(&self, fail: bool) {
        self.lock().fail_token_reviews = fail;
    }

    /// Status writes (PATCH or PUT on `/status`) accepted for a resource.
    pub fn status_writes(&self, resource: Resource) -> usize {
        self.lock()
            .status_writes
            .get(&resource)
            .copied()
            .unwrap_or(0)
    }

    /// The stored object, as a GET would return it.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&resource)
            .and_then(|m| m.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }

    /// Number of list requests served for a resource.
    pub fn lists(&self, resource: Resource) -> usize {
        self.lock().lists.get(&resource).copied().unwrap_or(0)
    }

    /// Number of watches answered with 410 Gone for a resource.
    pub fn gone(&self, resource: Resource) -> usize {
        self.lock().gone.get(&resource).copied().unwrap_or(0)
    }

    /// Number of live watch streams for a resource.
    pub fn open_watches(&self, resource: Resource) -> usize {
        self.lock()
            .watchers
            .iter()
            .filter(|(r, tx)| *r == resource && !tx.is_closed())
            .count()
    }
}

struct LineStream(mpsc::UnboundedReceiver<Bytes>);

impl Stream for LineStream {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

async fn route(
    state: &Mutex<State>,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    if req.method() == http::Method::POST && req.uri().path() == TOKEN_REVIEWS {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"kind": "Status", "status": "Failure", "message": e.to_string(), "code": 400}),
                )
            }
        };
        return token_review(state, &body);
    }
    if matches!(*req.method(), http::Method::PATCH | http::Method::PUT)
        && req.uri().path().ends_with("/status")
    {
        return write_status(state, req).await;
    }
    if matches!(*req.method(), http::Method::POST | http::Method::PUT) {
        return write_object(state, req).await;
    }
    handle(state, &req)
}

fn status_error(code: u16, reason: &str, message: String) -> Response<BoxBody<Bytes, Infallible>> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// `PATCH` (merge patch) or `PUT` on `{prefix}/namespaces/{ns}/{plural}/{name}/status`.
async fn write_status(
    state: &Mutex<State>,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let path = req.uri().path().to_string();
    let is_patch = req.method() == http::Method::PATCH;
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let target = Resource::ALL.into_iter().find_map(|r| {
        let (prefix, plural) = r.status_parts()?;
        let rest = path.strip_prefix(prefix)?.strip_prefix("/namespaces/")?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(ns), Some(p), Some(name), Some("status"), None) if p == plural => {
                Some((r, ns.to_string(), name.to_string()))
            }
            _ => None,
        }
    });
    let Some((resource, namespace, name)) = target else {
        return status_error(
            404,
            "NotFound",
            format!("the fake API server does not serve {path}"),
        );
    };
    if is_patch && content_type != "application/merge-patch+json" {
        return status_error(
            415,
            "UnsupportedMediaType",
            format!("the fake API server takes merge patches only, not {content_type:?}"),
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status_error(400, "BadRequest", e.to_string()),
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "body is not JSON".into());
    };
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let key = (namespace.clone(), name.clone());
    let Some(current) = state
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned()
    else {
        return status_error(
            404,
            "NotFound",
            format!("{} {namespace}/{name} not found", resource.kind()),
        );
    };
    let mut next = current.clone();
    if is_patch {
        let mut status = current.get("status").cloned().unwrap_or(Value::Null);
        if let Some(patch) = body.get("status") {
            json_patch::merge(&mut status, patch);
        }
        next["status"] = status;
    } else {
        // PUT: optimistic concurrency on resourceVersion, like the real server.
        let sent = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
        if !sent.is_empty()
            && sent
                != current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or("")
        {
            return status_error(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified",
                    resource.kind()
                ),
            );
        }
        next["status"] = body.get("status").cloned().unwrap_or(Value::Null);
    }
    if next == current {
        return json_response(StatusCode::OK, current);
    }
    *state.status_writes.entry(resource).or_default() += 1;
    state.put(next, true);
    let stored = state
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned()
        .unwrap_or(Value::Null);
    json_response(StatusCode::OK, stored)
}

/// `POST` of a new object to its namespaced collection (409 AlreadyExists when it exists),
/// or `PUT` of a whole object (404 when missing, 409 Conflict when the resourceVersion sent is
/// not the current one), as the real server does.
async fn write_object(
    state: &Mutex<State>,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let path = req.uri().path().to_string();
    let create = req.method() == http::Method::POST;
    let Some((resource, namespace, name)) = Resource::parse_path(&path) else {
        return status_error(
            404,
            "NotFound",
            format!("the fake API server does not serve {path}"),
        );
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status_error(400, "BadRequest", e.to_string()),
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "body is not JSON".into());
    };
    object["kind"] = json!(resource.kind());
    if let Some(ns) = &namespace {
        object["metadata"]["namespace"] = json!(ns);
    }
    let key = key_of(resource, &object);
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    let current = state
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned();
    let what = format!("{} {:?}", resource.kind(), key.1);
    match (create, name, &current) {
        (true, None, Some(_)) => {
            return status_error(409, "AlreadyExists", format!("{what} already exists"))
        }
        (true, None, None) => {}
        (false, Some(name), Some(current)) if name == key.1 => {
            let sent = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !sent.is_empty()
                && sent
                    != current["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
            {
                return status_error(
                    409,
                    "Conflict",
                    format!("Operation cannot be fulfilled on {what}: the object has been modified; please apply your changes to the latest version and try again"),
                );
            }
        }
        (false, Some(_), None) => {
            return status_error(404, "NotFound", format!("{what} not found"))
        }
        _ => {
            return status_error(
                400,
                "BadRequest",
                format!("cannot {} {path}", if create { "POST to" } else { "PUT" }),
            )
        }
    }
    state.put(object, true);
    let stored = state
        .objects
        .get(&resource)
        .and_then(|m| m.get(&key))
        .cloned()
        .unwrap_or(Value::Null);
    json_response(
        if create {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        stored,
    )
}

fn token_review(state: &Mutex<State>, body: &[u8]) -> Response<BoxBody<Bytes, Infallible>> {
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.token_reviews += 1;
    if state.fail_token_reviews {
        return json_response(
            StatusCode::FORBIDDEN,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:weft:weft-controller\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                   "reason": "Forbidden", "code": 403}),
        );
    }
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"kind": "Status", "status": "Failure", "message": "body is not JSON", "code": 400}),
        );
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let status = match state.tokens.get(token) {
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
        Some(FakeToken {
            username: user,
            audiences: auds,
            pod,
        }) => {
            let both: Vec<&String> = if wanted.is_empty() {
                auds.iter().collect()
            } else {
                auds.iter().filter(|a| wanted.contains(a)).collect()
            };
            if both.is_empty() {
                json!({"authenticated": false,
                       "error": format!("[invalid bearer token, token audiences {auds:?} is invalid for the target audiences {wanted:?}]")})
            } else {
                let mut user = json!({"username": user, "uid": "0000", "groups": ["system:serviceaccounts", "system:authenticated"]});
                if let Some((name, uid)) = pod {
                    user["extra"] = json!({
                        "authentication.kubernetes.io/pod-name": [name],
                        "authentication.kubernetes.io/pod-uid": [uid],
                        "authentication.kubernetes.io/node-name": ["fake-node"],
                    });
                }
                json!({"authenticated": true, "audiences": both, "user": user})
            }
        }
    };
    let mut out = review;
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    out["status"] = status;
    json_response(StatusCode::CREATED, out)
}

/// What the real server's `/version` answers (`gitVersion` and the rest).
fn version_info(major: u32, minor: u32) -> Value {
    json!({
        "major": major.to_string(), "minor": minor.to_string(),
        "gitVersion": format!("v{major}.{minor}.0"), "gitCommit": "fake",
        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64",
    })
}

/// `GET /version`, a namespaced list, or one object.
fn get_or_list_in(
    state: &Mutex<State>,
    path: &str,
) -> Option<Response<BoxBody<Bytes, Infallible>>> {
    let state = state.lock().unwrap_or_else(|e| e.into_inner());
    if path == "/version" {
        return Some(match &state.version {
            Some(v) => json_response(StatusCode::OK, v.clone()),
            None => status_error(
                404,
                "NotFound",
                "the server could not find the requested resource".into(),
            ),
        });
    }
    let (resource, namespace, name) = Resource::parse_path(path)?;
    let objects = state.objects.get(&resource);
    Some(match name {
        Some(name) => {
            let key = (namespace.clone().unwrap_or_default(), name.clone());
            match objects.and_then(|m| m.get(&key)) {
                Some(o) => json_response(StatusCode::OK, o.clone()),
                None => status_error(
                    404,
                    "NotFound",
                    format!("{} {name:?} not found", resource.kind()),
                ),
            }
        }
        None => {
            let ns = namespace.unwrap_or_default();
            let items: Vec<Value> = objects
                .map(|m| {
                    m.iter()
                        .filter(|((n, _), _)| *n == ns)
                        .map(|(_, o)| o.clone())
                        .collect()
                })
                .unwrap_or_default();
            json_response(
                StatusCode::OK,
                json!({
                    "kind": format!("{}List", resource.kind()),
                    "apiVersion": resource.api_version(),
                    "metadata": {"resourceVersion": state.rv.to_string()},
                    "items": items,
                }),
            )
        }
    })
}

fn handle(state: &Mutex<State>, req: &Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
    let path = req.uri().path();
    let watching = req
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    if !watching && req.method() == http::Method::GET {
        if let Some(rsp) = get_or_list_in(state, path) {
            return rsp;
        }
    }
    let Some(resource) = Resource::served().find(|r| r.path() == path) else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": format!("the fake API server does not serve {path}"), "reason": "NotFound", "code": 404}),
        );
    };
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    if !watch {
        *state.lists.entry(resource).or_default() += 1;
        let items: Vec<Value> = state
            .objects
            .get(&resource)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        return json_response(
            StatusCode::OK,
            json!({
                "kind": format!("{}List", resource.kind()),
                "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": state.rv.to_string()},
                "items": items,
            }),
        );
    }
    *state.watches.entry(resource).or_default() += 1;
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(state.rv);
    let (tx, rx) = mpsc::unbounded_channel();
    if from < state.compacted {
        *state.gone.entry(resource).or_default() += 1;
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", state.compacted),
            "reason": "Expired", "code": 410});
        let _ = tx.send(Bytes::from(format!(
            "{}\n",
            json!({"type": "ERROR", "object": status})
        )));
        drop(tx);
    } else {
        for (rv, r, line) in &state.log {
            if *r == resource && *rv > from {
                let _ = tx.send(line.clone());
            }
        }
        state.watchers.push((resource, tx));
    }
    let mut rsp = Response::new(StreamBody::new(LineStream(rx)).boxed());
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    rsp
}
