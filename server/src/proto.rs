//! Generated etcd v3 wire types (`mvccpb`, `etcdserverpb`) and cairn's Raft
//! entry payload (`raftpb`). Nothing else lives here.
#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod raftpb {
    tonic::include_proto!("raftpb");
}
