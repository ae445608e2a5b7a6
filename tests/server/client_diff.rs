//! Differential test through the `etcd-client` crate: one scenario runs
//! against etcd 3.4 and against cairn; what it observes (values,
//! revisions, versions, error codes and messages, watch events) must match.
//! Member/cluster IDs and terms are checked for presence, not value.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions, WatchStream,
};

use crate::harness::{Kind, Member};

fn err(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("ERR {:?}: {}", s.code(), s.message()),
        other => format!("ERR {other}"),
    }
}

fn kvs(r: &etcd_client::GetResponse) -> String {
    let kvs: Vec<String> = r
        .kvs()
        .iter()
        .map(|kv| {
            format!(
                "{}={}@c{}m{}v{}l{}",
                String::from_utf8_lossy(kv.key()),
                String::from_utf8_lossy(kv.value()),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                (kv.lease() != 0) as u8
            )
        })
        .collect();
    format!(
        "rev={} count={} more={} [{}]",
        r.header().unwrap().revision(),
        r.count(),
        r.more(),
        kvs.join(" ")
    )
}

fn events(r: &etcd_client::WatchResponse) -> String {
    let evs: Vec<String> = r
        .events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            let t = if e.event_type() == EventType::Put {
                "PUT"
            } else {
                "DEL"
            };
            let prev = e
                .prev_kv()
                .map(|p| String::from_utf8_lossy(p.value()).into_owned())
                .unwrap_or("-".into());
            format!(
                "{t} {}={}@{} prev={prev}",
                String::from_utf8_lossy(kv.key()),
                String::from_utf8_lossy(kv.value()),
                kv.mod_revision()
            )
        })
        .collect();
    format!(
        "id={} created={} canceled={} compact={} [{}]",
        r.watch_id(),
        r.created(),
        r.canceled(),
        r.compact_revision(),
        evs.join(", ")
    )
}

async fn next(w: &mut WatchStream) -> String {
    match tokio::time::timeout(Duration::from_secs(10), w.message()).await {
        Ok(Ok(Some(r))) => events(&r),
        Ok(Ok(None)) => "stream ended".into(),
        Ok(Err(e)) => err(e),
        Err(_) => "timeout".into(),
    }
}

/// The scenario; returns what it saw, line by line.
async fn scenario(c: &mut Client) -> Vec<String> {
    let mut log = Vec::new();
    macro_rules! see {
        ($e:expr) => {
            log.push(format!("{}: {}", log.len(), $e))
        };
    }
    let put = |k: &str, v: &str| TxnOp::put(k, v, None);

    // Headers carry cluster, member, revision and term.
    let r = c.put("h", "1", None).await.unwrap();
    let h = r.header().unwrap();
    see!(format!(
        "header rev={} ids={} term={}",
        h.revision(),
        h.cluster_id() != 0 && h.member_id() != 0,
        h.raft_term() != 0
    ));
    // Status reports a parseable etcd version.
    let st = c.status().await.unwrap();
    see!(format!(
        "version major={}",
        st.version().split('.').next().unwrap()
    ));

    // Range options.
    for (k, v) in [("r/a", "3"), ("r/b", "1"), ("r/c", "2"), ("r/d", "2")] {
        c.put(k, v, None).await.unwrap();
    }
    c.put("r/a", "4", None).await.unwrap();
    let cases = vec![
        GetOptions::new().with_prefix(),
        GetOptions::new().with_prefix().with_limit(2),
        GetOptions::new().with_prefix().with_limit(4),
        GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_limit(1),
        GetOptions::new().with_prefix().with_keys_only(),
        GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Value, SortOrder::None)
            .with_limit(3),
        GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Version, SortOrder::Descend),
        GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1),
        GetOptions::new()
            .with_prefix()
            .with_min_mod_revision(4)
            .with_max_mod_revision(5),
        GetOptions::new()
            .with_prefix()
            .with_min_create_revision(4)
            .with_max_create_revision(4),
        GetOptions::new().with_prefix().with_revision(3),
        GetOptions::new().with_range("r/c"),
        GetOptions::new().with_from_key(),
        GetOptions::new().with_all_keys().with_serializable(),
        GetOptions::new().with_prefix().with_revision(99),
    ];
    for o in cases {
        see!(match c.get("r/", Some(o)).await {
            Ok(r) => kvs(&r),
            Err(e) => err(e),
        });
    }
    see!(kvs(&c.get("r/zz", None).await.unwrap()));

    // Errors, with etcd's codes and messages.
    see!(c
        .put("", "v", None)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .put("x", "v", Some(PutOptions::new().with_lease(4242)))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .put("x", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .put("big", vec![b'x'; 1_600_000], None)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    let many: Vec<TxnOp> = (0..129).map(|i| put(&format!("m{i}"), "v")).collect();
    see!(c
        .txn(Txn::new().and_then(many))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .txn(Txn::new().and_then(vec![put("d", "1"), put("d", "2")]))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .txn(Txn::new().and_then(vec![
            put("d1", "1"),
            TxnOp::delete("d", Some(DeleteOptions::new().with_prefix()))
        ]))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .delete("nothing", None)
        .await
        .map(|r| format!(
            "deleted={} rev={}",
            r.deleted(),
            r.header().unwrap().revision()
        ))
        .unwrap());

    // Transactions: compares on missing keys, nested txns, sub-revisions, reads of own writes.
    let t = Txn::new()
        .when(vec![
            Compare::version("t/x", CompareOp::Equal, 0),
            Compare::create_revision("t/x", CompareOp::Equal, 0),
            Compare::mod_revision("t/x", CompareOp::Less, 1),
            Compare::lease("t/x", CompareOp::Equal, 0),
        ])
        .and_then(vec![
            put("t/x", "1"),
            put("t/y", "2"),
            TxnOp::get("t/", Some(GetOptions::new().with_prefix())),
            TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::value("t/x", CompareOp::Equal, "1")])
                    .and_then(vec![put("t/z", "3")])
                    .or_else(vec![put("t/w", "3")]),
            ),
        ]);
    let r = c.txn(t).await.unwrap();
    see!(format!(
        "txn ok={} rev={}",
        r.succeeded(),
        r.header().unwrap().revision()
    ));
    for op in r.op_responses() {
        see!(match op {
            TxnOpResponse::Put(p) => format!("put rev={}", p.header().unwrap().revision()),
            TxnOpResponse::Get(g) => format!("get {}", kvs(&g)),
            TxnOpResponse::Delete(d) => format!("del {}", d.deleted()),
            TxnOpResponse::Txn(t) =>
                format!("txn ok={} n={}", t.succeeded(), t.op_responses().len()),
        });
    }
    see!(kvs(&c
        .get("t/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()));
    let r = c
        .txn(
            Txn::new()
                .when(vec![Compare::value("nope", CompareOp::NotEqual, "x")])
                .or_else(vec![TxnOp::get("t/x", None)]),
        )
        .await
        .unwrap();
    see!(format!(
        "missing value compare ok={} rev={}",
        r.succeeded(),
        r.header().unwrap().revision()
    ));
    let r = c
        .txn(Txn::new().when(vec![
            Compare::value("t/", CompareOp::Greater, "0").with_prefix(),
        ]))
        .await
        .unwrap();
    see!(format!("range compare ok={}", r.succeeded()));

    // Same value again bumps mod revision and version; delete resets.
    c.put("s", "same", None).await.unwrap();
    c.put("s", "same", None).await.unwrap();
    see!(kvs(&c.get("s", None).await.unwrap()));
    let d = c
        .delete("s", Some(DeleteOptions::new().with_prev_key()))
        .await
        .unwrap();
    see!(format!(
        "deleted={} prev={}",
        d.deleted(),
        d.prev_kvs().len()
    ));
    c.put("s", "new", None).await.unwrap();
    see!(kvs(&c.get("s", None).await.unwrap()));

    // Watches: replay + live, prev_kv, filters, progress, cancel.
    let base = c.get("w", None).await.unwrap().header().unwrap().revision();
    c.put("w/a", "1", None).await.unwrap();
    c.put("w/a", "2", None).await.unwrap();
    c.delete("w/a", None).await.unwrap();
    let mut w = c
        .watch(
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(base + 1)
                    .with_prev_key(),
            ),
        )
        .await
        .unwrap();
    see!(next(&mut w).await);
    see!(next(&mut w).await);
    w.watch(
        "w/",
        Some(
            WatchOptions::new()
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]),
        ),
    )
    .await
    .unwrap();
    see!(next(&mut w).await);
    w.watch(
        "w/b",
        Some(WatchOptions::new().with_filters([WatchFilterType::NoDelete])),
    )
    .await
    .unwrap();
    see!(next(&mut w).await);
    // Two watchers of the stream see each event; their order is unspecified
    // (etcd iterates a Go map).
    c.put("w/b", "x", None).await.unwrap();
    let mut two = [next(&mut w).await, next(&mut w).await];
    two.sort();
    see!(two.join(" | "));
    c.delete("w/b", None).await.unwrap();
    let mut two = [next(&mut w).await, next(&mut w).await];
    two.sort();
    see!(two.join(" | "));
    w.request_progress().await.unwrap();
    let p = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    see!(format!(
        "progress id={} events={} rev={}",
        p.watch_id(),
        p.events().len(),
        p.header().unwrap().revision()
    ));
    w.cancel(1).await.unwrap();
    see!(next(&mut w).await);

    // Leases.
    let g = c.lease_grant(1, None).await.unwrap();
    see!(format!("grant ttl={}", g.ttl()));
    see!(c
        .lease_grant(9_000_000_001, None)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    let ttl = c.lease_time_to_live(4242, None).await.unwrap();
    see!(format!(
        "ttl unknown: ttl={} granted={}",
        ttl.ttl(),
        ttl.granted_ttl()
    ));
    // The server answers TTL 0, which the client turns into an error.
    see!(match c.lease_keep_alive(4242).await {
        Ok(_) => "keepalive unknown: accepted".to_string(),
        Err(e) => err(e),
    });
    see!(c
        .lease_revoke(4242)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    // Expiry deletes every attached key in one revision.
    let l = c.lease_grant(2, None).await.unwrap().id();
    c.put("e/1", "v", Some(PutOptions::new().with_lease(l)))
        .await
        .unwrap();
    c.put("e/2", "v", Some(PutOptions::new().with_lease(l)))
        .await
        .unwrap();
    let mut w = c
        .watch(
            "e/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await
        .unwrap();
    w.message().await.unwrap();
    let expired = tokio::time::timeout(Duration::from_secs(15), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let revs: Vec<i64> = expired
        .events()
        .iter()
        .map(|e| e.kv().unwrap().mod_revision())
        .collect();
    see!(format!(
        "expired events={} same revision={}",
        revs.len(),
        revs.windows(2).all(|w| w[0] == w[1])
    ));
    see!(kvs(&c
        .get("e/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap())
    .split_once(' ')
    .unwrap()
    .1
    .to_string());

    // Fragmentation: two ~1 MiB events of one revision exceed the 1.5 MiB
    // request limit; with `fragment` they come in two responses.
    c.put("frag/a", vec![b'a'; 1 << 20], None).await.unwrap();
    c.put("frag/b", vec![b'b'; 1 << 20], None).await.unwrap();
    let d = c
        .delete("frag/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = d.header().unwrap().revision();
    for fragment in [false, true] {
        let mut o = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(rev);
        if fragment {
            o = o.with_fragment();
        }
        let mut w = c.watch("frag/", Some(o)).await.unwrap();
        w.message().await.unwrap();
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 2 {
            let r = tokio::time::timeout(Duration::from_secs(10), w.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            sizes.push(r.events().len());
        }
        see!(format!("fragment={fragment} events per response {sizes:?}"));
    }

    // Compaction: errors at and below it, watches from before it are canceled.
    let cur = c.get("x", None).await.unwrap().header().unwrap().revision();
    c.compact(cur - 5, None).await.unwrap();
    see!(c
        .compact(cur - 5, None)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .compact(cur + 100, None)
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    see!(c
        .get("r/a", Some(GetOptions::new().with_revision(cur - 6)))
        .await
        .map(|_| ())
        .map_err(err)
        .unwrap_err());
    let mut w = c
        .watch("r/a", Some(WatchOptions::new().with_start_revision(2)))
        .await
        .unwrap();
    see!(next(&mut w).await);
    see!(next(&mut w).await);
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_sees_the_same() {
    let etcd = Member::start(Kind::Etcd);
    let cairn = Member::start(Kind::Cairn);
    let expected = scenario(&mut etcd.client().await).await;
    let got = scenario(&mut cairn.client().await).await;
    let diffs: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|(e, g)| e != g)
        .map(|(e, g)| format!("  etcd : {e}\n  cairn: {g}"))
        .collect();
    assert!(
        diffs.is_empty() && expected.len() == got.len(),
        "{} of {} observations differ:\n{}",
        diffs.len(),
        expected.len(),
        diffs.join("\n")
    );
}

/// Watches started at a past revision while writes continue receive every
/// revision exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replay_races_no_event() {
    let m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    let writer = {
        let mut c = m.client().await;
        tokio::spawn(async move {
            for i in 0..600 {
                c.put(format!("race/{}", i % 7), i.to_string(), None)
                    .await
                    .unwrap();
            }
        })
    };
    let mut watchers = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        watchers.push(
            c.watch(
                "race/",
                Some(WatchOptions::new().with_prefix().with_start_revision(2)),
            )
            .await
            .unwrap(),
        );
    }
    writer.await.unwrap();
    for (n, w) in watchers.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < 600 {
            let r = tokio::time::timeout(Duration::from_secs(10), w.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            seen.extend(r.events().iter().map(|e| e.kv().unwrap().mod_revision()));
        }
        let expected: Vec<i64> = (2..602).collect();
        assert_eq!(
            seen, expected,
            "watcher {n} lost, duplicated or reordered events"
        );
    }
}

/// A watcher whose client stops reading falls behind; once it reads again
/// it still gets every revision exactly once, in order (resynced from
/// storage instead of queueing without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watcher_resyncs_without_loss() {
    let m = Member::start(Kind::Cairn);
    let mut c = m.client().await;
    let mut w = c
        .watch("slow/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    w.message().await.unwrap();
    let first = c
        .put("slow/first", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    // Sequential puts: one hub message each, far past the per-stream queue bound.
    let writes = 3000;
    for i in 1..writes {
        c.put(format!("slow/{}", i % 13), vec![b'v'; 4096], None)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < writes {
        let r = tokio::time::timeout(Duration::from_secs(20), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!r.canceled(), "watch canceled: {}", r.cancel_reason());
        seen.extend(r.events().iter().map(|e| e.kv().unwrap().mod_revision()));
    }
    let expected: Vec<i64> = (first..first + writes as i64).collect();
    assert_eq!(seen, expected);
    assert!(
        m.log().contains("resyncing from storage"),
        "the queue bound was never reached"
    );
}
