//! The Docker engine through its command line: the node agent's container runtime.

use std::process::Stdio;

/// The label on every container, volume and network of one control plane's run (tests/e2e/run.sh
/// looks for leftovers by its key).
pub fn run_label(run: &str) -> String {
    format!("cairn-e2e.run={run}")
}

/// Runs `docker ARGS`; its trimmed stdout, or its stderr as the error.
pub async fn docker<S: AsRef<str>>(args: &[S]) -> Result<String, String> {
    let out = tokio::process::Command::new("docker")
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        Err(format!(
            "docker {}: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The same, blocking (for `Drop`).
pub fn docker_sync(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Removes every container, then every volume, carrying `label`, and the network `net`.
pub fn remove_labelled(label: &str, net: Option<&str>) {
    let filter = format!("label={label}");
    if let Ok(ids) = docker_sync(&["ps", "-aq", "--filter", &filter]) {
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids);
            let _ = docker_sync(&args);
        }
    }
    if let Ok(vols) = docker_sync(&["volume", "ls", "-q", "--filter", &filter]) {
        let vols: Vec<&str> = vols.split_whitespace().collect();
        if !vols.is_empty() {
            let mut args = vec!["volume", "rm", "-f"];
            args.extend(vols);
            let _ = docker_sync(&args);
        }
    }
    if let Some(net) = net {
        let _ = docker_sync(&["network", "rm", net]);
    }
}

/// The state of a container, from `docker inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub id: String,
    pub running: bool,
    pub exit_code: i32,
    pub oom_killed: bool,
    pub started_at: String,
    pub finished_at: String,
}

pub async fn inspect(name: &str) -> Result<State, String> {
    let out = docker(&[
        "inspect",
        "-f",
        "{{.Id}}|{{.State.Running}}|{{.State.ExitCode}}|{{.State.OOMKilled}}|{{.State.StartedAt}}|{{.State.FinishedAt}}",
        name,
    ])
    .await?;
    let f: Vec<&str> = out.split('|').collect();
    if f.len() != 6 {
        return Err(format!("docker inspect {name}: unexpected {out:?}"));
    }
    Ok(State {
        id: f[0].to_string(),
        running: f[1] == "true",
        exit_code: f[2].parse().unwrap_or(-1),
        oom_killed: f[3] == "true",
        started_at: f[4].to_string(),
        finished_at: f[5].to_string(),
    })
}

/// The last `lines` lines of a container's output (stdout and stderr), at most `bytes` bytes.
pub async fn logs_tail(name: &str, lines: usize, bytes: usize) -> String {
    let out = tokio::process::Command::new("docker")
        .args(["logs", "--tail", &lines.to_string(), name])
        .stdin(Stdio::null())
        .output()
        .await;
    let Ok(out) = out else {
        return String::new();
    };
    let mut all = out.stdout;
    all.extend_from_slice(&out.stderr);
    let start = all.len().saturating_sub(bytes);
    String::from_utf8_lossy(&all[start..]).to_string()
}
