//! Generates the gRPC code for `proto/quorate/v1/*.proto` with a vendored
//! `protoc`, so a fresh machine needs nothing but the Rust toolchain; and
//! the client side of the small etcd subset in `proto/anchors/etcd/` that
//! `quorate bench --target etcd` speaks (not in the reflection descriptor
//! set: quorate does not serve it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let protos = [proto_root.join("quorate/v1/coordinator.proto"), proto_root.join("quorate/v1/raft.proto")];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    // For gRPC server reflection (`crate::pb::FILE_DESCRIPTOR_SET`).
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    config.file_descriptor_set_path(out_dir.join("quorate_descriptor.bin"));
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &protos,
        std::slice::from_ref(&proto_root),
    )?;
    let etcd = [proto_root.join("anchors/etcd/rpc.proto")];
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure().build_client(true).build_server(false).compile_with_config(
        config,
        &etcd,
        &[proto_root.join("anchors/etcd")],
    )?;
    for p in protos.iter().chain(&etcd) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}
