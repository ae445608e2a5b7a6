//! Generated etcd v3 wire types (`mvccpb`, `authpb`, `etcdserverpb`) and cairn's Raft
//! entry payload (`raftpb`) and member-to-member service (`peerpb`). Nothing else lives here.
#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod raftpb {
    tonic::include_proto!("raftpb");
}

pub mod peerpb {
    include!(concat!(env!("OUT_DIR"), "/peer/peerpb.rs"));
}
