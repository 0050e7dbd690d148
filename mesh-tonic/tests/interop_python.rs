//! Interop with Python grpcio, in both directions, in plaintext and over TLS:
//! grpcio's client calling a `GrpcServer`, and a `MeshChannel` calling grpcio's server.
//!
//! The interpreter is `$MESH_PYTHON_GRPC`, else `target/py/bin/python` (the venv `.ci/run`
//! makes, with `grpcio` and `grpcio-tools`). Without one that imports both, the tests skip
//! with a message, unless `MESH_REQUIRE_PYTHON_GRPC=1` (set by `.ci/run`), which makes
//! that a failure. The Python stubs are generated at test time by `grpc_tools.protoc`
//! (bundled with grpcio-tools) from `proto/greeter.proto` into a temporary directory.
//!
//! grpcio's client checks the server certificate's DNS (or IP) SANs against the target or
//! `grpc.ssl_target_name_override`, so the server SVID in the TLS test carries a DNS SAN
//! beside its SPIFFE ID (still a valid SVID: one URI SAN). Our side verifies grpcio's
//! server by SPIFFE ID only.
#![cfg(feature = "test-util")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use mesh_core::Endpoint;
use mesh_core::discover::StaticDiscovery;
use mesh_spiffe::test_ca::TestCa;
use mesh_spiffe::{Authorizer, CredentialStore, Mtls, MtlsAcceptor, PeerIdentity};
use mesh_tonic::MeshChannel;
use mesh_tonic::server::GrpcServer;
use mesh_tonic::test_util::greeter::greeter_client::GreeterClient;
use mesh_tonic::test_util::greeter::greeter_server::{Greeter, GreeterServer};
use mesh_tonic::test_util::greeter::{HelloReply, HelloRequest};
use mesh_tower::server::{MeshServer, MeshServerBuilder};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tonic::{Code, Request, Response, Status};

const SERVER_ID: &str = "spiffe://example.org/ns/interop/sa/greeter";
const CLIENT_ID: &str = "spiffe://example.org/ns/interop/sa/client";
const DNS_NAME: &str = "greeter.mesh";

/// The Python environment, and the stubs generated for this test.
struct Python {
    interpreter: PathBuf,
    dir: tempfile::TempDir,
}

impl Python {
    /// `None` (after saying so loudly) when no grpcio interpreter is found and
    /// `MESH_REQUIRE_PYTHON_GRPC` is not set.
    async fn find() -> Option<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let interpreter = std::env::var_os("MESH_PYTHON_GRPC")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/py/bin/python"));
        let works = Command::new(&interpreter)
            .args(["-c", "import grpc, grpc_tools"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !works {
            let message = format!(
                "no Python with grpcio and grpcio-tools at {} (set MESH_PYTHON_GRPC, or: python3 -m venv target/py && target/py/bin/pip install 'grpcio==1.85.*' 'grpcio-tools==1.85.*')",
                interpreter.display()
            );
            if std::env::var_os("MESH_REQUIRE_PYTHON_GRPC").is_some_and(|v| v == "1") {
                panic!("MESH_REQUIRE_PYTHON_GRPC=1: {message}");
            }
            eprintln!("\n!!!!! SKIPPED: Python grpcio interop: {message} !!!!!\n");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        let out = Command::new(&interpreter)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .arg(format!("--python_out={}", dir.path().display()))
            .arg(format!("--grpc_python_out={}", dir.path().display()))
            .arg(proto.join("greeter.proto"))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "grpc_tools.protoc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self { interpreter, dir })
    }

    fn script(&self, name: &str) -> Command {
        let mut cmd = Command::new(&self.interpreter);
        cmd.arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/py")
                .join(name),
        )
        .env("PYTHONPATH", self.dir.path())
        .kill_on_drop(true);
        cmd
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }

    /// Runs the grpcio client once; its `OK …` / `ERR …` line.
    async fn call(&self, target: &str, name: &str, tls: &[String]) -> String {
        let out = self
            .script("greeter_client.py")
            .args([target, name])
            .args(tls)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if stdout.is_empty() {
            panic!("python client: {}", String::from_utf8_lossy(&out.stderr));
        }
        stdout
    }

    /// Starts the grpcio server; its address.
    async fn serve(&self, tls: &[String]) -> (Child, std::net::SocketAddr) {
        let mut child = self
            .script("greeter_server.py")
            .args(tls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("python server port");
        let port: u16 = line.strip_prefix("PORT ").unwrap().parse().unwrap();
        (child, ([127, 0, 0, 1], port).into())
    }
}

/// Our greeter: names the caller the mesh verified.
struct Hello;

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map_or("-".to_owned(), ToString::to_string);
        Ok(Response::new(HelloReply {
            message: format!("Hello {} from rust; peer={peer}", req.get_ref().name),
        }))
    }
}

fn mtls(ca: &TestCa, svid: mesh_spiffe::Svid) -> Mtls {
    Mtls::new(CredentialStore::with(svid, ca.bundle_set().unwrap()))
}

async fn rust_server(mesh: MeshServerBuilder) -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    GrpcServer::builder(mesh)
        .add_service(GreeterServer::new(Hello))
        .serve(listener)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_calls_our_server_in_plaintext() {
    let Some(py) = Python::find().await else {
        return;
    };
    let server = rust_server(MeshServer::builder().plaintext()).await;
    let reply = py.call(&server.local_addr().to_string(), "py", &[]).await;
    assert_eq!(reply, "OK Hello py from rust; peer=-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_calls_our_server_over_mtls() {
    let Some(py) = Python::find().await else {
        return;
    };
    let mut ca = TestCa::new("example.org").unwrap();
    let server_svid = ca.leaf().uri(SERVER_ID).dns(DNS_NAME).build().unwrap();
    let acceptor = MtlsAcceptor::new(
        &mtls(&ca, server_svid),
        Authorizer::trust_domain(ca.trust_domain().clone()),
    )
    .unwrap();
    let server = rust_server(MeshServer::builder().mtls(acceptor)).await;
    let (cert, key) = ca.issue(CLIENT_ID).unwrap().to_pem();
    let tls = [
        "--ca".to_owned(),
        py.write("ca.pem", &ca.bundle().unwrap().to_pem()),
        "--cert".to_owned(),
        py.write("client.pem", &cert),
        "--key".to_owned(),
        py.write("client.key", &key),
        "--override".to_owned(),
        DNS_NAME.to_owned(),
    ];
    let target = server.local_addr().to_string();
    let reply = py.call(&target, "py", &tls).await;
    assert_eq!(reply, format!("OK Hello py from rust; peer={CLIENT_ID}"));
    // Without a client certificate the handshake is refused.
    let reply = py.call(&target, "py", &tls[..2]).await;
    assert!(reply.starts_with("ERR UNAVAILABLE"), "{reply}");
}

async fn call_python(channel: MeshChannel, name: &str) -> Result<String, Status> {
    let mut client = GreeterClient::new(channel);
    let reply = client.say_hello(HelloRequest { name: name.into() }).await?;
    Ok(reply.into_inner().message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_channel_calls_a_grpcio_server_in_plaintext() {
    let Some(py) = Python::find().await else {
        return;
    };
    let (_child, addr) = py.serve(&[]).await;
    let channel = MeshChannel::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
        .service_name("greeter")
        .plaintext()
        .build()
        .unwrap();
    let reply = call_python(channel.clone(), "rust").await.unwrap();
    assert_eq!(reply, "Hello rust from python; peer=-");
    // grpcio's trailers-only RESOURCE_EXHAUSTED with pushback, as a Status.
    let status = call_python(channel, "busy").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_channel_calls_a_grpcio_server_over_mtls() {
    let Some(py) = Python::find().await else {
        return;
    };
    let mut ca = TestCa::new("example.org").unwrap();
    let (cert, key) = ca.issue(SERVER_ID).unwrap().to_pem();
    let tls = [
        "--ca".to_owned(),
        py.write("ca.pem", &ca.bundle().unwrap().to_pem()),
        "--cert".to_owned(),
        py.write("server.pem", &cert),
        "--key".to_owned(),
        py.write("server.key", &key),
        "--mtls".to_owned(),
    ];
    let (_child, addr) = py.serve(&tls).await;
    let client_svid = ca.issue(CLIENT_ID).unwrap();
    let channel = MeshChannel::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
        .service_name("greeter")
        .mtls(mtls(&ca, client_svid))
        .server_identity(SERVER_ID.parse().unwrap())
        .build()
        .unwrap();
    let reply = call_python(channel, "rust").await.unwrap();
    assert_eq!(reply, format!("Hello rust from python; peer={CLIENT_ID}"));

    // A server with another identity is refused: UNAVAILABLE, naming the service.
    let svid = ca.issue(CLIENT_ID).unwrap();
    let other = MeshChannel::builder(Box::pin(StaticDiscovery::new([Endpoint::new(addr)])))
        .service_name("greeter")
        .mtls(mtls(&ca, svid))
        .server_identity("spiffe://example.org/ns/interop/sa/other".parse().unwrap())
        .build()
        .unwrap();
    let status = call_python(other, "rust").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("greeter: "), "{status:?}");
}
