//! Free loopback ports, for the test binaries of tests/server, tests/operator and tests/e2e
//! (each includes this file, and each uses only some of it).
#![allow(dead_code)]

use std::net::TcpListener;

/// `n` distinct free TCP ports on 127.0.0.1: every listener is held until all are chosen, so
/// none is handed out twice.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// One free TCP port on 127.0.0.1 (bound once, released, then used).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}
