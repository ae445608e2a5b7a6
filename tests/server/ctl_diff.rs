//! Differential test: the same etcdctl commands against etcd 3.4 and
//! cairn, started with the same flags; stdout, stderr and exit codes must
//! match once member/cluster IDs, terms, lease IDs and ports are masked.

use std::collections::HashMap;

use regex::Regex;

use crate::harness::{Kind, Member, Out};

pub(crate) struct Diff {
    members: [Member; 2],
    vars: [HashMap<String, String>; 2],
    masks: Vec<(Regex, &'static str)>,
    failures: Vec<String>,
    steps: usize,
}

impl Diff {
    fn new() -> Self {
        Self::with(&[])
    }

    /// etcd and cairn started with the same `extra` flags.
    pub(crate) fn with(extra: &[&str]) -> Self {
        let masks = [
            (r#""cluster_id":\d+"#, r#""cluster_id":N"#),
            (r#""member_id":\d+"#, r#""member_id":N"#),
            (r#""raft_term":\d+"#, r#""raft_term":N"#),
            (r#""ID":\d+"#, r#""ID":N"#),
            (r#""lease":\d+"#, r#""lease":N"#),
            (r"127\.0\.0\.1:\d+", "ENDPOINT"),
            // IDs print as %x: a leading zero digit is dropped (1 in 16 member IDs).
            (r"\b[0-9a-f]{13,16}\b", "HEXID"),
            (r"remaining\(-?\d+s\)", "remaining(Ns)"),
            (r"took = \S+", "took = T"),
            // `check datascale`: its progress bar and the memory it measured.
            (
                r"(?s)Start data scale check.*\n(PASS|FAIL)",
                "Start data scale check ... $1",
            ),
            (r"memory used : [\d.]+ MB", "memory used : N MB"),
            (r"(?m)^\{.level.:.*\n?", ""),
            // Status fields that legitimately differ: version, storage figures, terms.
            (r#""version":"[^"]*""#, r#""version":V"#),
            (
                r#""(dbSize|dbSizeInUse|raftIndex|raftAppliedIndex|raftTerm|leader)":\d+"#,
                r#""$1":N"#,
            ),
        ];
        Diff {
            members: [
                Member::start_with(Kind::Etcd, extra),
                Member::start_with(Kind::Cairn, extra),
            ],
            vars: [HashMap::new(), HashMap::new()],
            masks: masks
                .iter()
                .map(|(r, s)| (Regex::new(r).unwrap(), *s))
                .collect(),
            failures: Vec::new(),
            steps: 0,
        }
    }

    fn mask(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (r, with) in &self.masks {
            s = r.replace_all(&s, *with).into_owned();
        }
        // etcd lists a lease's keys in Go map order, which is random.
        let keys = Regex::new(r"attached keys\(\[([^\]]*)\]\)").unwrap();
        keys.replace_all(&s, |c: &regex::Captures| {
            let mut k: Vec<&str> = c[1].split(' ').collect();
            k.sort();
            format!("attached keys([{}])", k.join(" "))
        })
        .into_owned()
    }

    fn subst(&self, i: usize, arg: &str) -> String {
        let mut a = arg.to_string();
        for (k, v) in &self.vars[i] {
            a = a.replace(&format!("{{{k}}}"), v);
        }
        a
    }

    fn run(&mut self, args: &[&str], input: &str) -> [Out; 2] {
        self.steps += 1;
        let outs: Vec<Out> = (0..2)
            .map(|i| {
                let args: Vec<String> = args.iter().map(|a| self.subst(i, a)).collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.members[i].ctl_stdin(&args, &self.subst(i, input))
            })
            .collect();
        [outs[0].clone(), outs[1].clone()]
    }

    /// Runs a step on both servers and records any difference.
    pub(crate) fn same_stdin(&mut self, args: &[&str], input: &str) -> [Out; 2] {
        let outs = self.run(args, input);
        let e = (
            self.mask(&outs[0].stdout),
            self.mask(&outs[0].stderr),
            outs[0].code,
        );
        let c = (
            self.mask(&outs[1].stdout),
            self.mask(&outs[1].stderr),
            outs[1].code,
        );
        if e != c {
            self.failures.push(format!(
                "step {} `etcdctl {}`\n  etcd : {:?}\n  cairn: {:?}",
                self.steps,
                args.join(" "),
                e,
                c
            ));
        }
        outs
    }

    pub(crate) fn same(&mut self, args: &[&str]) -> [Out; 2] {
        self.same_stdin(args, "")
    }

    /// Runs a step and keeps `re`'s first group of each server's stdout as `{var}`.
    pub(crate) fn capture(&mut self, args: &[&str], var: &str, re: &str) {
        let outs = self.same(args);
        let re = Regex::new(re).unwrap();
        for (i, out) in outs.iter().enumerate() {
            let v = re
                .captures(&out.stdout)
                .unwrap_or_else(|| panic!("{var}: no match for {re} in {:?}", out.stdout))[1]
                .to_string();
            self.vars[i].insert(var.to_string(), v);
        }
    }

    /// Both servers killed and started again on their data.
    pub(crate) fn restart(&mut self) {
        for m in &mut self.members {
            m.restart();
        }
    }

    /// The two members (etcd's, cairn's).
    pub(crate) fn members(&self) -> &[Member; 2] {
        &self.members
    }

    pub(crate) fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} etcdctl steps differ between etcd and cairn:\n{}",
            self.failures.len(),
            self.steps,
            self.failures.join("\n")
        );
    }
}

const TXN_CREATE: &str = "mod(\"t1\") = \"0\"\n\nput t1 created\nget t1\n\nget t1\n\n";
const TXN_FAIL: &str =
    "value(\"t1\") = \"nope\"\n\nput t1 never\n\nget t1\nput t2 from-failure\n\n";
const TXN_MISSING_VALUE: &str = "value(\"missing\") != \"x\"\n\nput t3 a\n\nput t3 b\n\n";
const TXN_VERSION: &str =
    "version(\"t1\") = \"1\"\ncreate(\"t1\") > \"0\"\n\ndel t1\nput t4 x\n\n\n";
const TXN_DUP: &str = "\nput d 1\nput d 2\n\n\n";

#[test]
fn etcdctl_behaves_like_etcd() {
    let mut d = Diff::new();

    // Empty store: revision 1.
    d.same(&["get", "foo"]);
    d.same(&["get", "foo", "-w", "json"]);
    // Puts, versions, revisions.
    d.same(&["put", "foo", "bar"]);
    d.same(&["put", "foo", "bar"]);
    d.same(&["get", "foo", "-w", "json"]);
    d.same(&["put", "foo", "baz", "--prev-kv"]);
    d.same(&["put", "foo", "qux", "--prev-kv", "-w", "json"]);
    for (k, v) in [
        ("a", "3"),
        ("b", "1"),
        ("c", "2"),
        ("a/x", "9"),
        ("a/y", "8"),
    ] {
        d.same(&["put", k, v]);
    }
    // Range forms, limits, sorting, filters.
    d.same(&["get", "a", "--prefix"]);
    d.same(&["get", "a", "c"]);
    d.same(&["get", "b", "--from-key"]);
    d.same(&["get", "", "--prefix", "--limit", "2", "-w", "json"]);
    d.same(&["get", "", "--from-key", "--limit", "7", "-w", "json"]);
    d.same(&["get", "", "--prefix", "--sort-by", "VALUE"]);
    d.same(&[
        "get",
        "",
        "--prefix",
        "--sort-by",
        "VALUE",
        "--order",
        "DESCEND",
    ]);
    d.same(&[
        "get",
        "",
        "--prefix",
        "--sort-by",
        "CREATE",
        "--order",
        "DESCEND",
        "--limit",
        "2",
    ]);
    d.same(&[
        "get",
        "",
        "--prefix",
        "--sort-by",
        "MODIFY",
        "--order",
        "ASCEND",
    ]);
    d.same(&[
        "get",
        "",
        "--prefix",
        "--sort-by",
        "VERSION",
        "--order",
        "DESCEND",
        "-w",
        "json",
    ]);
    d.same(&["get", "", "--prefix", "--order", "DESCEND"]);
    d.same(&["get", "", "--prefix", "--keys-only"]);
    d.same(&["get", "", "--prefix", "--count-only", "-w", "json"]);
    d.same(&["get", "", "--prefix", "--print-value-only"]);
    d.same(&["get", "a", "--prefix", "--consistency", "s"]);
    d.same(&["get", "foo", "--rev", "3", "-w", "json"]);
    d.same(&["get", "foo", "--rev", "1"]);
    d.same(&["get", "foo", "--rev", "1000"]);
    d.same(&[
        "get",
        "",
        "--prefix",
        "--min-mod-rev",
        "6",
        "--max-mod-rev",
        "8",
    ]);
    d.same(&["get", "", "--prefix", "--min-create-rev", "7", "-w", "json"]);
    // Deletes: missing keys keep the revision; prev_kv; ranges.
    d.same(&["del", "nosuch", "-w", "json"]);
    d.same(&["del", "a/x", "--prev-kv"]);
    d.same(&["del", "a", "--prefix", "-w", "json"]);
    d.same(&["get", "", "--prefix", "-w", "json"]);
    // Delete resets the key: new create revision, version 1.
    d.same(&["put", "a", "again"]);
    d.same(&["get", "a", "-w", "json"]);
    // Put options and their errors.
    d.same(&["put", "b", "--ignore-value", "-w", "json"]);
    d.same(&["put", "missing", "--ignore-value"]);
    d.same(&["put", "missing", "v", "--ignore-lease"]);
    d.same(&["put", "", "v"]);
    d.same(&["get", ""]);
    d.same(&["del", ""]);
    d.same_stdin(&["put", "big"], &"x".repeat(1_600_000));
    // Transactions.
    d.same_stdin(&["txn"], TXN_CREATE);
    d.same_stdin(&["txn", "-w", "json"], TXN_FAIL);
    d.same_stdin(&["txn"], TXN_MISSING_VALUE);
    d.same_stdin(&["txn", "-w", "json"], TXN_VERSION);
    d.same_stdin(&["txn"], TXN_DUP);
    d.same(&["get", "t", "--prefix", "-w", "json"]);
    // Watch: history replay from a revision, prefixes, prev_kv.
    d.same(&["watch", "--rev", "2", "foo"]);
    d.same(&["watch", "--rev", "5", "--prefix", "a"]);
    d.same(&["watch", "--rev", "9", "--prefix", "a", "--prev-kv"]);
    d.same(&["watch", "--rev", "2", "b", "c", "-w", "json"]);
    // Leases.
    d.capture(
        &["lease", "grant", "600"],
        "L",
        r"lease ([0-9a-f]+) granted",
    );
    d.same(&["put", "l1", "v", "--lease", "{L}"]);
    d.same(&["put", "l2", "v", "--lease", "{L}"]);
    d.same(&["lease", "timetolive", "{L}", "--keys"]);
    d.same(&["lease", "list"]);
    d.same(&["lease", "keep-alive", "--once", "{L}"]);
    d.same(&["put", "l1", "--ignore-lease", "v2"]);
    d.same(&["get", "l1", "-w", "json"]);
    d.same(&["lease", "revoke", "{L}"]);
    d.same(&["get", "l", "--prefix"]);
    d.same(&["watch", "--rev", "1", "--prefix", "l"]);
    d.same(&["lease", "revoke", "{L}"]);
    d.same(&["lease", "timetolive", "1234"]);
    d.same(&["lease", "keep-alive", "--once", "1234"]);
    d.same(&["put", "k", "v", "--lease", "1234"]);
    d.same(&["lease", "grant", "1"]);
    d.same(&["lease", "grant", "9000000001"]);
    // Compaction.
    d.same(&["compact", "5"]);
    d.same(&["compact", "5"]);
    d.same(&["compact", "4"]);
    d.same(&["compact", "100000"]);
    d.same(&["get", "foo", "--rev", "4"]);
    d.same(&["get", "foo", "--rev", "5", "-w", "json"]);
    d.same(&["watch", "--rev", "3", "foo"]);
    d.same(&["compact", "8", "--physical"]);
    // Maintenance.
    d.same(&["endpoint", "health"]);
    d.same(&["endpoint", "status", "-w", "json"]);
    d.same(&["defrag"]);
    d.same(&["snapshot", "save", "snap.db"]);
    d.same(&["alarm", "list"]);
    d.same(&["member", "list", "-w", "json"]);
    // Auth before anyone enables it: no users, no roles.
    d.same(&["user", "list"]);
    d.same(&["role", "list", "-w", "json"]);
    d.same(&["auth", "disable"]);
    d.same(&["auth", "enable"]);
    d.same(&["user", "get", "root"]);
    d.same(&["user", "delete", "u"]);
    d.same(&["user", "grant-role", "u", "r"]);
    d.same(&["user", "revoke-role", "u", "r"]);
    d.same_stdin(&["user", "passwd", "u", "--interactive=false"], "pw\n");
    d.same(&["role", "get", "r"]);
    d.same(&["role", "delete", "r"]);
    d.same(&["role", "grant-permission", "r", "read", "k"]);
    d.same(&["role", "revoke-permission", "r", "k"]);
    d.same(&["--user", "u:pw", "get", "k"]);
    // Reads the server's resident memory from /metrics before and after
    // 10000 puts.
    d.same(&["check", "datascale", "--load", "s"]);
    // Users and roles with auth enabled: `auth.rs`.
    d.same(&["role", "add", "r"]);
    d.same(&["role", "list"]);
    d.finish();
}
