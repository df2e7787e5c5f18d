//! TLS from the proxy to its controller, so that nothing else can pose as the control plane
//! and the identity token never crosses the network in the clear.
//!
//! The controller presents certificates issued from the mesh's own issuer, and the proxy
//! verifies them against the trust anchors it already holds, with the mesh's server-name
//! scheme (see [`super::tls`]): the identity service must present
//! `spiffe://<td>/ns/<controller-ns>/sa/identity`, written in the SNI as
//! `identity.<controller-ns>.serviceaccount.identity.<td>`; the destination service (which
//! also serves `Policy`) `destination.<controller-ns>.serviceaccount.identity.<td>`.
//! `<controller-ns>` is `WEFT_PROXY_CONTROLLER_NAMESPACE` (default `weft`), `<td>` the
//! trust domain of the proxy's own identity.
//!
//! The identity channel sends no client certificate (the proxy has none before Certify);
//! the destination channel presents the workload certificate (mutual TLS), read from the
//! identity client's state at each handshake, so it fails until a certificate is held.
//!
//! The handshake happens inside the channel's connector: a refusal surfaces as the call's
//! `UNAVAILABLE` status, whose source chain names the controller and the verification error
//! ([`status_reason`]).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::tls::{self, TlsError};
use crate::identity::{CertState, TrustAnchors};

/// How long connecting and the TLS handshake to the controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which controller service a channel talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Identity,
    Destination,
}

impl Service {
    /// The ServiceAccount-like name in the controller's certificate for this service.
    pub fn name(self) -> &'static str {
        match self {
            Service::Identity => "identity",
            Service::Destination => "destination",
        }
    }
}

/// `spiffe://<td>/ns/<controller-ns>/sa/<service>`: what the controller's service presents.
pub fn controller_identity(trust_domain: &str, namespace: &str, service: Service) -> String {
    format!(
        "spiffe://{trust_domain}/ns/{namespace}/sa/{}",
        service.name()
    )
}

/// The trust domain of a SPIFFE ID (`spiffe://<td>/...`).
pub fn trust_domain(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("cluster.local")
}

/// How a channel reaches a controller service over TLS.
#[derive(Clone)]
pub struct ControllerTls {
    /// What the service must present (verified, and written in the SNI).
    pub expected: String,
    name: ServerName<'static>,
    anchors: watch::Receiver<Arc<TrustAnchors>>,
    /// The workload certificate to present (mutual TLS); `None` for the identity service.
    cert: Option<watch::Receiver<CertState>>,
}

impl std::fmt::Debug for ControllerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerTls")
            .field("expected", &self.expected)
            .field("client_cert", &self.cert.is_some())
            .finish_non_exhaustive()
    }
}

impl ControllerTls {
    /// TLS to the service that must present `expected` (a SPIFFE ID with a server name).
    pub fn new(
        expected: String,
        anchors: watch::Receiver<Arc<TrustAnchors>>,
        cert: Option<watch::Receiver<CertState>>,
    ) -> Result<Self, TlsError> {
        let name = tls::server_name(&expected)?;
        Ok(Self {
            expected,
            name,
            anchors,
            cert,
        })
    }

    /// The client config for the next connection, from the current anchors.
    fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let anchors = self.anchors.borrow().clone();
        let mut config = tls::controller_client_config(self.cert.clone(), &anchors)?;
        config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

/// A lazily connected channel to `addr` (`host:port`): TLS per `tls`, plaintext when `None`
/// (an `http://` address: development only). Fails only when `addr` makes no URI.
pub fn channel(
    addr: &str,
    tls: Option<ControllerTls>,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = tune(Endpoint::from_shared(format!("http://{addr}"))?);
    let Some(tls) = tls else {
        return Ok(endpoint.connect_lazy());
    };
    let addr: Arc<str> = Arc::from(addr);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (addr, tls) = (addr.clone(), tls.clone());
        async move {
            let connect = async {
                let tcp = TcpStream::connect(&*addr).await?;
                let _ = tcp.set_nodelay(true);
                let config = tls.config().map_err(std::io::Error::other)?;
                TlsConnector::from(config)
                    .connect(tls.name.clone(), tcp)
                    .await
                    .map_err(|e| {
                        std::io::Error::other(format!(
                            "TLS with the controller at {addr} (expecting {}, {}) failed: {e}",
                            tls.name.to_str(),
                            tls.expected
                        ))
                    })
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TLS connection to the controller at {addr} within {CONNECT_TIMEOUT:?}"),
                    )
                })??;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A gRPC status with the causes tonic keeps in its source chain (a connect error's
/// message alone says only "transport error").
pub fn status_reason(s: &tonic::Status) -> String {
    let mut out = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_names() {
        let id = controller_identity("cluster.local", "weft", Service::Identity);
        assert_eq!(id, "spiffe://cluster.local/ns/weft/sa/identity");
        assert_eq!(
            tls::server_name(&id).unwrap().to_str(),
            "identity.weft.serviceaccount.identity.cluster.local"
        );
        let id = controller_identity("example.org", "weft-system", Service::Destination);
        assert_eq!(
            tls::server_name(&id).unwrap().to_str(),
            "destination.weft-system.serviceaccount.identity.example.org"
        );
        assert_eq!(
            trust_domain("spiffe://example.org/ns/a/sa/b"),
            "example.org"
        );
    }
}
