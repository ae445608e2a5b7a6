//! Differential test of etcd's HTTP/JSON gateway: the same `POST /v3/...`
//! requests, in the same order, against etcd 3.4 and cairn; status and body
//! must match once IDs and terms are masked.

use std::io::Read;
use std::time::Duration;

use regex::Regex;

use crate::harness::{http_send, Kind, Member};

/// POSTs `body` to `path`; the status code and body. A stream (watch) is
/// read for `wait` and then left.
fn post(port: u16, path: &str, body: &str, wait: Duration) -> (u16, String) {
    let headers = format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    let mut s = http_send(port, "POST", path, &headers, body, wait).expect("connects");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        },
    )
}

/// The payload of a chunked body (as much as arrived).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            out.push_str(&rest[..n.min(rest.len())]);
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    // etcd's gateway also sends a trailer after errors; not part of the body.
    out.split("Grpc-Trailer")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn http_gateway_answers_as_etcds() {
    let members = [Member::start(Kind::Etcd), Member::start(Kind::Cairn)];
    let masks: Vec<(Regex, &str)> = [
        (r#""(cluster_id|member_id)":"\d+""#, r#""$1":"N""#),
        (r#""raft_term":"\d+""#, r#""raft_term":"T""#),
        (r#""hash":\d+"#, r#""hash":H"#),
        // A lease's remaining TTL may be read across a second's boundary.
        (r#""TTL":"(59|60)""#, r#""TTL":"60""#),
    ]
    .iter()
    .map(|(r, w)| (Regex::new(r).unwrap(), *w))
    .collect();
    let short = Duration::from_secs(5);
    let stream = Duration::from_millis(1500);
    let steps: &[(&str, &str, Duration)] = &[
        ("kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#, short),
        (
            "kv/put",
            r#"{"key":"Zm9v","value":"YmF6","prev_kv":true}"#,
            short,
        ),
        (
            "kv/put",
            r#"{"key":"YQ==","value":"MQ==","lease":"0"}"#,
            short,
        ),
        ("kv/range", r#"{"key":"Zm9v"}"#, short),
        (
            "kv/range",
            r#"{"key":"YQ==","range_end":"Zm9w","keysOnly":true,"limit":"1"}"#,
            short,
        ),
        (
            "kv/range",
            r#"{"key":"AA==","range_end":"AA==","sort_order":"DESCEND","x":1}"#,
            short,
        ),
        ("kv/range", r#"{"key":"Zm9v","count_only":true}"#, short),
        ("kv/range", r#"{"key":""}"#, short),
        ("kv/range", r#"{"key":"Zm9v","revision":"100"}"#, short),
        (
            "kv/txn",
            r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"cQ=="}}],"failure":[{"requestRange":{"key":"Zm9v"}}]}"#,
            short,
        ),
        (
            "kv/txn",
            r#"{"compare":[{"result":"GREATER","target":"VERSION","key":"Zm9v","version":"0"}],"success":[{"requestDeleteRange":{"key":"Zm9v","prev_kv":true}}]}"#,
            short,
        ),
        ("kv/deleterange", r#"{"key":"bm9uZQ=="}"#, short),
        ("kv/put", r#"{"key":"Zm9v","value":"eA=="}"#, short),
        (
            "watch",
            r#"{"create_request":{"key":"Zm9v","start_revision":"2","prev_kv":true}}"#,
            stream,
        ),
        ("kv/compaction", r#"{"revision":"3"}"#, short),
        ("kv/compaction", r#"{"revision":"3"}"#, short),
        ("kv/range", r#"{"key":"Zm9v","revision":"2"}"#, short),
        (
            "watch",
            r#"{"create_request":{"key":"Zm9v","start_revision":"2"}}"#,
            stream,
        ),
        ("lease/grant", r#"{"TTL":"60","ID":"7"}"#, short),
        ("lease/grant", r#"{"TTL":"60","ID":"7"}"#, short),
        (
            "kv/put",
            r#"{"key":"bA==","value":"dg==","lease":"7"}"#,
            short,
        ),
        ("kv/lease/timetolive", r#"{"ID":"7","keys":true}"#, short),
        ("lease/leases", "{}", short),
        ("lease/keepalive", r#"{"ID":"7"}"#, stream),
        ("lease/revoke", r#"{"ID":"7"}"#, short),
        ("kv/lease/revoke", r#"{"ID":"7"}"#, short),
        ("kv/range", r#"{"key":"bA=="}"#, short),
        ("maintenance/hash", "{}", short),
        ("cluster/member/promote", r#"{"ID":"1"}"#, short),
        ("auth/user/list", "{}", short),
        ("auth/enable", "{}", short),
        (
            "auth/authenticate",
            r#"{"name":"root","password":"x"}"#,
            short,
        ),
        ("nothing/here", "{}", short),
    ];
    let mut failures = Vec::new();
    for (i, (path, body, wait)) in steps.iter().enumerate() {
        let answers: Vec<(u16, String)> = members
            .iter()
            .map(|m| {
                let (code, text) = post(m.client_port, &format!("/v3/{path}"), body, *wait);
                let masked = masks
                    .iter()
                    .fold(text, |t, (r, w)| r.replace_all(&t, *w).into_owned());
                (code, masked)
            })
            .collect();
        if answers[0] != answers[1] {
            failures.push(format!(
                "step {i} POST /v3/{path} {body}\n  etcd : {:?}\n  cairn: {:?}",
                answers[0], answers[1]
            ));
        }
    }
    // A put over the 1.5 MiB request limit (2.2 MB of JSON): etcd's error.
    let big = format!(
        r#"{{"key":"Ymln","value":"{}"}}"#,
        "QUFB".repeat((1_700_000 / 3) as usize)
    );
    let answers: Vec<(u16, String)> = members
        .iter()
        .map(|m| post(m.client_port, "/v3/kv/put", &big, short))
        .collect();
    assert_eq!(
        answers[0],
        (
            400,
            r#"{"error":"etcdserver: request is too large","message":"etcdserver: request is too large","code":3}"#
                .to_string()
        ),
        "etcd's answer"
    );
    assert_eq!(
        answers[1], answers[0],
        "cairn's answer to a put over the limit"
    );
    // A body that is not JSON: both refuse it as InvalidArgument (the
    // parser's message differs).
    for m in &members {
        let (code, text) = post(m.client_port, "/v3/kv/range", r#"{"key":"#, short);
        assert_eq!(code, 400, "{text}");
        assert!(text.ends_with(r#","code":3}"#), "{text}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} gateway steps differ between etcd and cairn:\n{}",
        failures.len(),
        steps.len(),
        failures.join("\n")
    );
}

/// `/version` has etcd's two fields and cairn's release and data format; `--version` says the
/// same.
#[test]
fn version_says_release_and_data_format() {
    let m = Member::start(Kind::Cairn);
    let answer = crate::harness::http_get(m.client_port, "/version").unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["etcdserver"], "3.5.13", "{body}");
    assert_eq!(v["etcdcluster"], "3.5.0", "{body}");
    assert_eq!(v["cairnserver"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(v["cairndataformat"], "2", "{body}");
    let out = std::process::Command::new(Kind::Cairn.binary())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        text.trim(),
        format!(
            "cairn {}\netcd API version: 3.5.13\ndata format: 2 (reads 1 to 2)",
            env!("CARGO_PKG_VERSION")
        )
    );
}
