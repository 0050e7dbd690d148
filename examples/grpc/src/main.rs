//! A tonic greeter served by `mesh-tonic` over SPIFFE mTLS and called through a
//! `MeshChannel`, in one process:
//!
//! ```text
//! cargo run -p mesh-grpc-example
//! ```
//!
//! An in-memory test CA issues the SVIDs (`spiffe://example.org/ns/demo/sa/greeter` for
//! the server, `…/sa/web` and `…/sa/batch` for two clients). The server is a
//! `GrpcServer` over `MeshServer`, with an authorization policy that lets only `web`
//! call `helloworld.Greeter/SayHello`; its handler reads the caller's `PeerIdentity`
//! and the `AuthzDecision` that admitted it from `tonic::Request::extensions()`. The
//! clients are tonic's generated `GreeterClient`, unchanged, over `MeshChannel`: `web`
//! is greeted, `batch` gets `PERMISSION_DENIED`.
//!
//! The greeter's code comes from `mesh-tonic`'s `test-util` feature, generated from
//! `mesh-tonic/proto/greeter.proto` by its `build.rs` with `protox` and
//! `tonic-prost-build`: no system `protoc`. A service of your own does the same in its
//! own `build.rs`.
#![allow(clippy::print_stdout)]

use mesh_core::Endpoint;
use mesh_core::config::{
    AuthorizationPolicy, AuthorizationRule, DefaultAction, GrpcMatch, RouteMatch,
};
use mesh_core::discover::StaticDiscovery;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, PeerIdentity};
use mesh_tonic::MeshChannel;
use mesh_tonic::server::GrpcServer;
use mesh_tonic::test_util::greeter::greeter_client::GreeterClient;
use mesh_tonic::test_util::greeter::greeter_server::{Greeter, GreeterServer};
use mesh_tonic::test_util::greeter::{HelloReply, HelloRequest};
use mesh_tower::authz::{AuthzDecision, Policy};
use mesh_tower::server::MeshServer;
use tonic::{Request, Response, Status};

type Error = Box<dyn std::error::Error + Send + Sync>;

const SERVER: &str = "spiffe://example.org/ns/demo/sa/greeter";
const WEB: &str = "spiffe://example.org/ns/demo/sa/web";
const BATCH: &str = "spiffe://example.org/ns/demo/sa/batch";

struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        // Set by the mesh from the verified certificate and the policy: a client cannot
        // forge them.
        let peer = req.extensions().get::<PeerIdentity>().cloned();
        let decision = req.extensions().get::<AuthzDecision>().cloned();
        let (Some(peer), Some(decision)) = (peer, decision) else {
            return Err(Status::unauthenticated("no verified peer"));
        };
        println!("server: call from {peer}, admitted by rule {decision}");
        Ok(Response::new(HelloReply {
            message: format!("Hello {}, you are {peer}", req.get_ref().name),
        }))
    }
}

fn policy() -> Result<Policy, Error> {
    let rule = AuthorizationRule {
        name: "web-says-hello".into(),
        clients: vec![WEB.parse()?],
        unauthenticated: false,
        routes: vec![RouteMatch {
            grpc: Some(GrpcMatch {
                service: "helloworld.Greeter".into(),
                method: Some("SayHello".into()),
            }),
            ..RouteMatch::default()
        }],
    };
    let config = AuthorizationPolicy {
        default: DefaultAction::Deny,
        rules: vec![rule],
    };
    Ok(Policy::new("greeter", &config)?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mut ca = TestCa::new("example.org")?;
    let mut mtls = |id: &str| -> Result<Mtls, Error> {
        Ok(Mtls::new(CredentialStore::with(
            ca.issue(id)?,
            ca.bundle_set()?,
        )))
    };
    let (server_mtls, web_mtls, batch_mtls) = (mtls(SERVER)?, mtls(WEB)?, mtls(BATCH)?);

    // The server: any client of the trust domain gets through TLS; the policy decides
    // per method.
    let acceptor = MtlsAcceptor::new(
        &server_mtls,
        Authorizer::trust_domain("example.org".parse()?),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = GrpcServer::builder(
        MeshServer::builder()
            .mtls(acceptor)
            .authorization(policy()?),
    )
    .add_service(GreeterServer::new(Hello))
    .serve(listener)
    .await?;
    let addr = server.local_addr();
    println!("server: greeter on {addr} as {SERVER}");

    // The clients: tonic's generated client over a MeshChannel.
    let channel = |mtls: Mtls| {
        MeshChannel::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
            .service_name("greeter")
            .mtls(mtls)
            .server_identity(SERVER.parse()?)
            .build()
            .map_err(Error::from)
    };
    let mut web = GreeterClient::new(channel(web_mtls)?);
    let reply = web
        .say_hello(HelloRequest { name: "web".into() })
        .await?
        .into_inner();
    println!("web:    {}", reply.message);

    let mut batch = GreeterClient::new(channel(batch_mtls)?);
    match batch
        .say_hello(HelloRequest {
            name: "batch".into(),
        })
        .await
    {
        Ok(reply) => println!(
            "batch:  unexpectedly greeted: {}",
            reply.into_inner().message
        ),
        Err(status) => println!("batch:  {:?}: {}", status.code(), status.message()),
    }

    let report = server.shutdown().await;
    println!("server: shut down ({} connections forced)", report.forced);
    Ok(())
}
