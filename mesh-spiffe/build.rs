//! Generates the fake Workload API server's gRPC code (feature `test-util` only).
//!
//! `proto/workload.proto` is compiled to a `FileDescriptorSet` by `protox`, a protobuf
//! compiler in pure Rust, and `tonic-prost-build` turns that into prost messages and the
//! tonic server trait in `OUT_DIR`. No system `protoc` is involved, and builds without
//! `test-util` do no code generation at all (the build dependencies are optional and
//! enabled by that feature).

fn main() {
    // Without this, Cargo reruns the script whenever any file of the package changes.
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "test-util")]
    workload_api::generate();
}

#[cfg(feature = "test-util")]
mod workload_api {
    const PROTO: &str = "proto/workload.proto";

    pub(super) fn generate() {
        println!("cargo::rerun-if-changed={PROTO}");
        let fds = match protox::compile([PROTO], ["proto"]) {
            Ok(fds) => fds,
            Err(error) => panic!("compiling {PROTO}: {error:?}"),
        };
        let generated = tonic_prost_build::configure()
            .build_client(false)
            .build_server(true)
            .compile_fds(fds);
        if let Err(error) = generated {
            panic!("generating the Workload API server from {PROTO}: {error}");
        }
    }
}
