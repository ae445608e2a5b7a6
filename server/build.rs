//! Generates the etcd v3 wire types and gRPC services from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Raft entries and state-machine responses are serialized by openraft
        // with serde; deriving it on the wire types avoids a parallel model.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        // Clients too: `cairn snapshot save` talks to a member like etcdctl does.
        .build_client(true)
        // Malformed requests get InvalidArgument, not tonic's Internal.
        .codec_path("crate::codec::EtcdCodec")
        // The HTTP/JSON gateway (`api::gateway`) maps JSON to these messages.
        .file_descriptor_set_path(
            std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("etcd_descriptor.bin"),
        )
        .compile_protos(
            &[
                "proto/kv.proto",
                "proto/auth.proto",
                "proto/rpc.proto",
                "proto/raftpb.proto",
            ],
            &["proto"],
        )?;
    // The peer service has a client too (members call each other). It goes
    // to a directory of its own: the imported packages' (empty) files would
    // overwrite the ones generated above.
    let peer_out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("peer");
    std::fs::create_dir_all(&peer_out)?;
    tonic_prost_build::configure()
        .out_dir(peer_out)
        .type_attribute(".peerpb", "#[derive(serde::Serialize, serde::Deserialize)]")
        .extern_path(".etcdserverpb", "crate::proto::etcdserverpb")
        .extern_path(".raftpb", "crate::proto::raftpb")
        .extern_path(".mvccpb", "crate::proto::mvccpb")
        .extern_path(".authpb", "crate::proto::authpb")
        .codec_path("crate::codec::EtcdCodec")
        // A call a peer's build lacks answers Unimplemented (tests stand in for older
        // builds by implementing only what those had).
        .generate_default_stubs(true)
        .compile_protos(&["proto/peer.proto"], &["proto"])?;
    Ok(())
}
