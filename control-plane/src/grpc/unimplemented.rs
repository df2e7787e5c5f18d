//! Placeholders for the parts of the API that later issues implement. They
//! answer `UNIMPLEMENTED` with a message a proxy can log as is.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_proto::policy::policy_server::Policy;
use weft_proto::policy::{InboundServer, ServerPolicyRequest};

/// `Policy.ServerPolicy`: not implemented yet.
#[derive(Clone, Debug, Default)]
pub struct PolicyService;

#[tonic::async_trait]
impl Policy for PolicyService {
    type ServerPolicyStream = Pin<Box<dyn Stream<Item = Result<InboundServer, Status>> + Send>>;

    async fn server_policy(
        &self,
        _req: Request<ServerPolicyRequest>,
    ) -> Result<Response<Self::ServerPolicyStream>, Status> {
        Err(Status::unimplemented(
            "weft-controller does not serve Policy.ServerPolicy yet; proxies apply their default inbound policy",
        ))
    }
}
