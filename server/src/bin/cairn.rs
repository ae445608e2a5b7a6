//! The `cairn` binary: parses etcd's flags, then runs the member.

use clap::Parser;

/// mimalloc: request handling allocates and frees many small buffers, and
/// glibc malloc showed up as ~10% of the server's CPU in profiles.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Go's flag package accepts `-name value` as well as `--name value`; etcd
/// users and scripts rely on both, so single-dash long flags are rewritten.
fn go_style_args() -> Vec<String> {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// `cairn snapshot save | restore | status`, as etcdctl and etcdutl have them.
fn snapshot_command(args: Vec<String>) -> ! {
    let cmd = cairn::snapshot::cmd::SnapshotCommand::parse_from(args);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(cairn::snapshot::cmd::run(cmd.cmd)) {
        Ok(out) => {
            println!("{out}");
            std::process::exit(0)
        }
        Err(e) => {
            let msg = e.to_string();
            eprintln!(
                "Error: {}",
                msg.strip_prefix("etcdserver: ").unwrap_or(&msg)
            );
            std::process::exit(1)
        }
    }
}

fn main() {
    let args = go_style_args();
    if args.get(1).map(String::as_str) == Some("snapshot") {
        snapshot_command(args[1..].to_vec());
    }
    let flags = cairn::Flags::parse_from(args);
    let config = match cairn::Config::from_flags(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cairn: {e}");
            std::process::exit(1);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| {
        let level = match config.log_level.as_str() {
            "panic" | "fatal" => "error",
            l => l,
        };
        tracing_subscriber::EnvFilter::new(format!("cairn={level},openraft=warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Single-threaded: a request stays on one thread from socket through
    // Raft, fsync and apply to response, free of cross-thread wakeups. More
    // client threads are started by the server (`--experimental-client-io-threads`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(cairn::serve(config, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }));
    if let Err(e) = result {
        eprintln!("cairn: {e}");
        std::process::exit(1);
    }
}
