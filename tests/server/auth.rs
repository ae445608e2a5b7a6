//! Auth against etcd 3.4, side by side: every `etcdctl user`, `role` and
//! `auth` command and the permission checks of etcd's own e2e auth tests
//! (`tests/e2e/ctl_v3_auth_test.go`), run on both servers with the same
//! flags; outputs must match once IDs are masked. Then what etcdctl cannot
//! show: tokens expiring, JWTs, the state surviving restarts and snapshots.

use std::time::Duration;

use cairn::proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, AuthenticateRequest, PutRequest, RangeRequest,
};

use crate::ctl_diff::Diff;
use crate::harness::{Kind, Member};

const ROOT: &str = "--user=root:root";
const TU: &str = "--user=test-user:pass";

/// etcd's e2e `authEnable` and `authSetupTestUser`.
fn enable_with_test_user(d: &mut Diff) {
    d.same_stdin(&["user", "add", "root", "--interactive=false"], "root\n");
    d.same(&["user", "grant-role", "root", "root"]);
    d.same(&["auth", "enable"]);
    d.same_stdin(
        &["user", "add", "test-user", "--interactive=false", ROOT],
        "pass\n",
    );
    d.same(&["role", "add", "test-role", ROOT]);
    d.same(&["user", "grant-role", "test-user", "test-role", ROOT]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "readwrite",
        "foo",
        ROOT,
    ]);
}

const TXN_OK: &str = "version(\"c2\") = \"1\"\n\nget s2\n\nget f2\n\n";
const TXN_BAD_COMPARE: &str = "version(\"c1\") = \"1\"\n\nget s2\n\nget f2\n\n";
const TXN_BAD_FAILURE: &str = "version(\"c2\") = \"1\"\n\nget s2\n\nget f1\n\n";

#[test]
fn auth_behaves_like_etcd() {
    let mut d = Diff::with(&[]);
    // Before auth: users and roles are managed by anyone.
    d.same(&["auth", "enable"]);
    d.same(&["user", "list"]);
    d.same(&["role", "list"]);
    d.same(&["put", "hoo", "a"]);
    d.same_stdin(&["user", "add", "", "--interactive=false"], "x\n");
    d.same_stdin(&["user", "add", ":pw"], "");
    d.same(&["user", "add", "nopw", "--no-password"]);
    d.same(&["user", "get", "nopw"]);
    d.same(&["user", "grant-role", "nopw", "missing"]);
    d.same(&["auth", "enable"]);
    enable_with_test_user(&mut d);
    d.same(&["auth", "enable", ROOT]);

    // Who may do what (TestCtlV3AuthWriteKey, RoleUpdate, RoleGet, UserGet).
    let anonymous = d.same(&["put", "foo", "no-user"]);
    assert!(anonymous[1]
        .stderr
        .ends_with("Error: etcdserver: user name is empty\n"));
    d.same(&["get", "foo"]);
    d.same(&["put", "foo", "bar", ROOT]);
    d.same(&["get", "foo", ROOT]);
    let stranger = d.same(&["put", "foo", "bar", "--user=a:b"]);
    assert!(stranger[1]
        .stderr
        .contains("authentication failed, invalid user ID or password"));
    let allowed = d.same(&["put", "foo", "bar2", TU]);
    assert_eq!(allowed[1].stdout, "OK\n");
    d.same(&["get", "foo", TU]);
    d.same(&["put", "foo", "bar3", "--user=test-user:badpass"]);
    d.same(&["get", "foo", "--user=nopw:x"]);
    let denied = d.same(&["put", "hoo", "bar", TU]);
    assert!(denied[1]
        .stderr
        .ends_with("Error: etcdserver: permission denied\n"));
    d.same(&["get", "hoo", TU]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "readwrite",
        "hoo",
        ROOT,
    ]);
    d.same(&["put", "hoo", "bar", TU]);
    d.same(&["get", "hoo", TU, "-w", "json"]);
    d.same(&["role", "revoke-permission", "test-role", "hoo", ROOT]);
    d.same(&["role", "revoke-permission", "test-role", "hoo", ROOT]);
    d.same(&["put", "hoo", "bar", TU]);
    d.same(&["role", "get", "test-role", ROOT]);
    d.same(&["role", "get", "test-role", TU]);
    d.same(&["role", "get", "root", TU]);
    d.same(&["user", "get", "test-user", ROOT]);
    d.same(&["user", "get", "test-user", TU]);
    d.same(&["user", "get", "root", TU]);
    d.same(&["user", "get", "test-user", "--detail", ROOT]);
    d.same(&["user", "list", ROOT]);
    d.same(&["user", "list", TU]);
    d.same(&["role", "list", ROOT]);

    // Prefixes, ranges, from-key (TestCtlV3AuthPrefixPerm, FromKeyPerm).
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "readwrite",
        "/prefix/",
        "--prefix",
        ROOT,
    ]);
    d.same(&["put", "/prefix/0", "v", TU]);
    d.same(&["put", "/prefix0", "v", TU]);
    d.same(&["get", "/prefix/", "--prefix", TU]);
    d.same(&["get", "/", "--prefix", TU]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "readwrite",
        "z",
        "--from-key",
        ROOT,
    ]);
    d.same(&["put", "z0", "v", TU]);
    d.same(&["put", "\u{7f}\u{7f}", "v", TU]);
    d.same(&["put", "x", "v", TU]);
    d.same(&["get", "z", "--from-key", TU]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "read",
        "key",
        "key4",
        ROOT,
    ]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "write",
        "key",
        "key4",
        ROOT,
    ]);
    d.same(&["role", "get", "test-role", ROOT]);
    for k in ["key1", "key2", "key3", "key5"] {
        d.same(&["put", k, "v", ROOT]);
    }
    d.same(&["get", "key", "key3", TU]);
    d.same(&["get", "key", "key6", TU]);
    d.same(&["del", "key1", TU]);
    d.same(&["del", "key", "key5", TU]);
    d.same(&[
        "role",
        "revoke-permission",
        "test-role",
        "z",
        "--from-key",
        ROOT,
    ]);
    d.same(&["put", "z1", "v", TU]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role",
        "read",
        "",
        "--from-key",
        ROOT,
    ]);
    d.same(&["get", "a", "--from-key", "--keys-only", TU]);
    d.same(&[
        "role",
        "revoke-permission",
        "test-role",
        "",
        "--from-key",
        ROOT,
    ]);
    // An empty range [a, a): etcd 3.4.23 stores it; later 3.4 releases and 3.5
    // refuse it (isValidPermissionRange), as cairn does.
    let empty = d.members()[1].ctl(&[
        "role",
        "grant-permission",
        "test-role",
        "readwrite",
        "a",
        "a",
        ROOT,
    ]);
    assert!(
        empty
            .stderr
            .ends_with("\nError: etcdserver: invalid auth management\n"),
        "{empty:?}"
    );
    d.same(&["role", "grant-permission", "test-role", "bogus", "a", ROOT]);

    // Watches (TestCtlV3AuthAndWatch) and txns (TestCtlV3AuthTxn).
    let watch = d.same(&["watch", "key5", "--rev", "1", TU]);
    assert!(
        watch[1].stderr.contains("watch is canceled by the server"),
        "{watch:?}"
    );
    d.same(&["watch", "key", "key6", "--rev", "1", TU]);
    for k in ["c1", "s1", "f1", "c2", "s2", "f2"] {
        d.same(&["put", k, "v", ROOT]);
    }
    for k in ["c2", "s2", "f2"] {
        d.same(&[
            "role",
            "grant-permission",
            "test-role",
            "readwrite",
            k,
            ROOT,
        ]);
    }
    let txn = d.same_stdin(&["txn", "--interactive", TU], TXN_OK);
    assert!(txn[1].stdout.contains("SUCCESS\n\ns2\nv\n"), "{txn:?}");
    d.same_stdin(&["txn", "--interactive", TU], TXN_BAD_COMPARE);
    d.same_stdin(&["txn", "--interactive", TU], TXN_BAD_FAILURE);

    // Leases: revoking deletes the keys, so needs write on all of them.
    d.capture(
        &["lease", "grant", "100", TU],
        "lease",
        r"lease ([0-9a-f]+) granted",
    );
    d.same(&["put", "foo", "leased", "--lease={lease}", TU]);
    d.same(&["put", "bar", "leased", "--lease={lease}", ROOT]);
    d.same(&["put", "foo", "again", "--lease={lease}", TU]);
    d.same(&["lease", "revoke", "{lease}", TU]);
    d.same(&["lease", "revoke", "{lease}", ROOT]);

    // Root-only calls and what needs no root (as 3.4 has it).
    d.same(&["defrag", TU]);
    d.same(&["defrag", ROOT]);
    d.same(&["snapshot", "save", "t.db", TU]);
    d.same(&["endpoint", "hashkv", TU]);
    d.same(&["member", "add", "m2", "--peer-urls=http://127.0.0.1:1", TU]);
    d.same(&["member", "list", TU]);
    d.same(&["compaction", "2", TU]);
    d.same(&["alarm", "list", TU]);

    // Mistakes, in etcd's words.
    d.same(&["role", "add", "test-role", ROOT]);
    d.same_stdin(
        &["user", "add", "test-user", "--interactive=false", ROOT],
        "x\n",
    );
    d.same(&["user", "grant-role", "nobody", "test-role", ROOT]);
    d.same(&["user", "grant-role", "test-user", "nope", ROOT]);
    d.same(&["user", "revoke-role", "test-user", "nope", ROOT]);
    d.same(&["role", "grant-permission", "nope", "read", "k", ROOT]);
    d.same(&["role", "revoke-permission", "test-role", "nokey", ROOT]);
    d.same(&["role", "delete", "nope", ROOT]);
    d.same(&["user", "delete", "nope", ROOT]);
    d.same(&["role", "delete", "root", ROOT]);
    d.same(&["user", "revoke-role", "root", "root", ROOT]);
    d.same(&["user", "delete", "root", ROOT]);
    d.same(&["role", "delete", "root"]);
    d.same(&["role", "add", "x", TU]);
    d.same(&["auth", "disable", TU]);

    // Survives a restart (TestCtlV3AuthTestCacheReload).
    d.restart();
    d.same(&["put", "foo", "after-restart", TU]);
    d.same(&["put", "hoo", "after-restart", TU]);

    // Role and user changes while in use (RoleRevokeDuringOps, RevokeWithDelete,
    // UserDeleteDuringOps), passwords.
    d.same(&["role", "add", "test-role2", ROOT]);
    d.same(&[
        "role",
        "grant-permission",
        "test-role2",
        "readwrite",
        "hoo",
        ROOT,
    ]);
    d.same(&["user", "grant-role", "test-user", "test-role2", ROOT]);
    d.same(&["user", "grant-role", "test-user", "test-role2", ROOT]);
    d.same(&["user", "get", "test-user", ROOT]);
    d.same(&["put", "hoo", "bar", TU]);
    d.same(&["user", "revoke-role", "test-user", "test-role", ROOT]);
    d.same(&["put", "foo", "bar", TU]);
    d.same(&["put", "hoo", "bar2", TU]);
    d.same(&["role", "delete", "test-role2", ROOT]);
    d.same(&["user", "get", "test-user", ROOT]);
    d.same(&["put", "hoo", "bar3", TU]);
    d.same_stdin(
        &["user", "passwd", "test-user", "--interactive=false", ROOT],
        "newpass\n",
    );
    d.same(&["get", "foo", TU]);
    d.same(&["get", "foo", "--user=test-user:newpass"]);
    d.same(&["user", "delete", "test-user", ROOT]);
    d.same(&["get", "foo", "--user=test-user:newpass"]);

    // Disabled again: open to all (TestCtlV3AuthDisable).
    d.same(&["auth", "disable", ROOT]);
    d.same(&["auth", "disable"]);
    d.same(&["put", "hoo", "open", "--user=whoever:x"]);
    d.same(&["get", "hoo"]);
    d.same(&["user", "list"]);
    d.same(&["role", "get", "test-role"]);
    d.finish();
}

/// A token as etcd's clients send it.
fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("token", token.parse().unwrap());
    r
}

async fn token_of(url: &str, user: &str, password: &str) -> Result<String, tonic::Status> {
    let mut auth = AuthClient::connect(url.to_string()).await.unwrap();
    let r = auth
        .authenticate(AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await?;
    Ok(r.into_inner().token)
}

async fn put_with(url: &str, token: &str, key: &str) -> Result<(), tonic::Status> {
    let mut kv = KvClient::connect(url.to_string()).await.unwrap();
    let put = PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    kv.put(with_token(put, token)).await.map(|_| ())
}

/// Tokens as etcd 3.4 issues them with `flags`: what a token looks like,
/// that it works, what an unknown one gets, and (simple tokens) that an
/// idle one expires after `--auth-token-ttl`.
async fn token_transcript(kind: Kind, flags: &[&str], idle: Duration) -> Vec<String> {
    let m = Member::start_with(kind, flags);
    m.ctl_stdin(&["user", "add", "root", "--interactive=false"], "root\n");
    m.ctl(&["user", "grant-role", "root", "root"]);
    assert_eq!(
        m.ctl(&["auth", "enable"]).stdout,
        "Authentication Enabled\n"
    );
    let url = m.url();
    let token = token_of(&url, "root", "root").await.unwrap();
    let shape = if token.split('.').count() == 3 {
        "jwt".to_string()
    } else {
        let (prefix, index) = token.split_once('.').unwrap();
        let letters = prefix.len() == 16 && prefix.chars().all(|c| c.is_ascii_alphabetic());
        format!(
            "simple: 16 letters {letters}, index {}",
            index.parse::<u64>().is_ok()
        )
    };
    let mut out = vec![shape];
    out.push(format!(
        "put: {:?}",
        put_with(&url, &token, "a")
            .await
            .map_err(|s| s.message().to_string())
    ));
    let bad = put_with(&url, "nope.1", "a").await.unwrap_err();
    out.push(format!("unknown token: {:?} {}", bad.code(), bad.message()));
    let wrong = token_of(&url, "root", "x").await.unwrap_err();
    out.push(format!(
        "wrong password: {:?} {}",
        wrong.code(),
        wrong.message()
    ));
    // Used again within its TTL, it lives on; idle for longer, it is gone.
    tokio::time::sleep(idle).await;
    let after = put_with(&url, &token, "b").await;
    out.push(format!(
        "after {idle:?} idle: {:?}",
        after.map_err(|s| s.message().to_string())
    ));
    let mut kv = KvClient::connect(url.clone()).await.unwrap();
    let read = kv
        .range(with_token(
            RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            },
            &token_of(&url, "root", "root").await.unwrap(),
        ))
        .await
        .map(|r| r.into_inner().kvs.len());
    out.push(format!("new token reads: {read:?}"));
    out
}

#[tokio::test]
async fn simple_tokens_expire_as_with_etcd() {
    let flags = ["--auth-token-ttl", "2"];
    let etcd = token_transcript(Kind::Etcd, &flags, Duration::from_secs(4)).await;
    let cairn = token_transcript(Kind::Cairn, &flags, Duration::from_secs(4)).await;
    assert_eq!(etcd, cairn);
    assert!(cairn[0].contains("true, index true"), "{cairn:?}");
    assert!(cairn[4].contains("invalid auth token"), "{cairn:?}");
    eprintln!("{cairn:#?}");
}

#[tokio::test]
async fn jwt_tokens_as_with_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    let public = dir.path().join("jwt.pub");
    let run = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "openssl {args:?}");
    };
    run(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
    run(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let spec = format!(
        "jwt,pub-key={},priv-key={},sign-method=RS256,ttl=1s",
        public.display(),
        key.display()
    );
    let flags = ["--auth-token", spec.as_str()];
    let etcd = token_transcript(Kind::Etcd, &flags, Duration::from_secs(3)).await;
    let cairn = token_transcript(Kind::Cairn, &flags, Duration::from_secs(3)).await;
    assert_eq!(etcd, cairn);
    assert_eq!(cairn[0], "jwt");
    assert!(cairn[4].contains("invalid auth token"), "{cairn:?}");
    // A member without the right key does not start, in neither.
    let bad = ["--auth-token", "jwt,sign-method=RS256"];
    for kind in [Kind::Etcd, Kind::Cairn] {
        let m = Member::new(kind, &bad);
        let out = std::process::Command::new("timeout")
            .arg("20")
            .arg(kind.binary())
            .args(m.flags())
            .output()
            .unwrap();
        // 124: still running when the timeout stopped it.
        assert!(
            !out.status.success() && out.status.code() != Some(124),
            "{kind:?} started without JWT keys: {out:?}"
        );
    }
}

/// Auth state is in the snapshot: a member restored from a snapshot saved
/// with auth enabled still has the users and refuses what it refused.
#[test]
fn auth_survives_snapshot_restore() {
    let mut d = Diff::with(&[]);
    enable_with_test_user(&mut d);
    d.same(&["put", "foo", "v", TU]);
    let mut restored = Vec::new();
    for m in d.members() {
        let file = m.dir.path().join("auth.db");
        let out = m.ctl(&["snapshot", "save", file.to_str().unwrap(), ROOT]);
        assert_eq!(out.code, 0, "{out:?}");
        let r = Member::start_from_snapshot(m.kind, &file).unwrap();
        let denied = r.ctl(&["put", "hoo", "v", TU]);
        let allowed = r.ctl(&["get", "foo", TU]);
        let anonymous = r.ctl(&["get", "foo"]);
        restored.push((
            denied.stderr.lines().last().map(str::to_string),
            allowed.stdout,
            anonymous.code,
        ));
    }
    assert_eq!(restored[0], restored[1]);
    assert_eq!(restored[1].1, "foo\nv\n");
    assert_eq!(
        restored[1].0.as_deref(),
        Some("Error: etcdserver: permission denied")
    );
    d.finish();
}

/// What a client without credentials can throw at auth: forged tokens are
/// refused at once (not after the request timeout), wrong passwords in a
/// burst leave the member serving, passwords bcrypt would cut and hashes
/// that would make every login cost hours are refused.
#[tokio::test]
async fn hostile_tokens_and_passwords() {
    use cairn::proto::etcdserverpb::AuthUserAddRequest;
    let m = Member::start(Kind::Cairn);
    m.ctl_stdin(&["user", "add", "root", "--interactive=false"], "root\n");
    m.ctl(&["user", "grant-role", "root", "root"]);
    m.ctl(&["auth", "enable"]);
    let url = m.url();
    let t0 = std::time::Instant::now();
    for forged in [
        "AAAAAAAAAAAAAAAA.999999999",
        "x.18446744073709551615",
        "no-dot",
        "",
    ] {
        let e = put_with(&url, forged, "k").await.unwrap_err();
        assert_eq!(e.message(), "etcdserver: invalid auth token", "{forged:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let burst: Vec<_> = (0..64)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { token_of(&url, "root", "wrong").await })
        })
        .collect();
    for b in burst {
        let e = b.await.unwrap().unwrap_err();
        assert!(e.message().contains("authentication failed"), "{e:?}");
    }
    let root = token_of(&url, "root", "root").await.unwrap();
    put_with(&url, &root, "still-serving").await.unwrap();
    let mut auth = AuthClient::connect(url.clone()).await.unwrap();
    // etcd 3.5's AuthStatus: root's; enabled, at the revision of the last change
    // (root added and granted: 3).
    use cairn::proto::etcdserverpb::AuthStatusRequest;
    let status = auth
        .auth_status(with_token(AuthStatusRequest {}, &root))
        .await
        .unwrap()
        .into_inner();
    assert!(status.enabled);
    assert_eq!(status.auth_revision, 3);
    let anonymous = auth.auth_status(AuthStatusRequest {}).await.unwrap_err();
    assert_eq!(anonymous.message(), "etcdserver: user name is empty");
    let long = auth
        .user_add(with_token(
            AuthUserAddRequest {
                name: "long".into(),
                password: "x".repeat(73),
                ..Default::default()
            },
            &root,
        ))
        .await
        .unwrap_err();
    assert_eq!(long.message(), "bcrypt: password length exceeds 72 bytes");
    let costly = auth
        .user_add(with_token(
            AuthUserAddRequest {
                name: "costly".into(),
                hashed_password: format!("$2a$31${}", "a".repeat(53)),
                ..Default::default()
            },
            &root,
        ))
        .await
        .unwrap_err();
    assert!(
        costly.message().contains("bcrypt hash of cost"),
        "{costly:?}"
    );
}
