//! Generates the etcd v3 wire types and gRPC services from `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // Raft entries and state-machine responses are serialized by openraft
        // with serde; deriving it on the wire types avoids a parallel model.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .build_client(false)
        // Malformed requests get InvalidArgument, not tonic's Internal.
        .codec_path("crate::codec::EtcdCodec")
        .compile_protos(
            &["proto/kv.proto", "proto/rpc.proto", "proto/raftpb.proto"],
            &["proto"],
        )?;
    Ok(())
}
