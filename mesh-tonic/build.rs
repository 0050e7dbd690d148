//! Generates the test protos' gRPC code (feature `test-util` only).
//!
//! `proto/*.proto` are compiled to a `FileDescriptorSet` by `protox`, a protobuf compiler
//! in pure Rust, and `tonic-prost-build` turns that into prost messages, tonic clients and
//! server traits in `OUT_DIR`. No system `protoc` is involved, and builds without
//! `test-util` do no code generation at all.

fn main() {
    // Without this, Cargo reruns the script whenever any file of the package changes.
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "test-util")]
    protos::generate();
}

#[cfg(feature = "test-util")]
mod protos {
    const PROTOS: [&str; 2] = ["proto/echo.proto", "proto/greeter.proto"];

    pub(super) fn generate() {
        for proto in PROTOS {
            println!("cargo::rerun-if-changed={proto}");
        }
        let fds = match protox::compile(PROTOS, ["proto"]) {
            Ok(fds) => fds,
            Err(error) => panic!("compiling {PROTOS:?}: {error:?}"),
        };
        let generated = tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds);
        if let Err(error) = generated {
            panic!("generating gRPC code from {PROTOS:?}: {error}");
        }
    }
}
