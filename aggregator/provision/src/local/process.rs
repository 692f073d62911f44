//! Processes of servers: finding them by their tag, telling whether one is still the
//! same process, and stopping a server's whole tree.

use std::collections::HashMap;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

pub(crate) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// SIGTERM to the process group, SIGKILL after `grace`, and SIGKILL to any descendant
/// (kernels run in their own sessions) still there; returns once they are gone (or
/// after a few seconds more). Never signals a pid whose start time is not `start`.
pub(crate) async fn stop_process(pid: u32, start: Option<u64>, grace: Duration) {
    if !alive(pid, start) {
        return;
    }
    let tree = descendants(pid);
    let Some(p) = Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = rustix::process::kill_process_group(p, Signal::TERM);
    let deadline = Instant::now() + grace;
    while alive(pid, start) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if alive(pid, start) {
        tracing::warn!(pid, "server did not stop after SIGTERM; sending SIGKILL");
        let _ = rustix::process::kill_process_group(p, Signal::KILL);
    }
    for (child, child_start) in &tree {
        if alive(*child, Some(*child_start))
            && let Some(c) = Pid::from_raw(*child as i32)
        {
            let _ = rustix::process::kill_process(c, Signal::KILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while (alive(pid, start) || tree.iter().any(|(c, s)| alive(*c, Some(*s))))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Environment variable that tags a server's processes with the server's id.
pub(crate) const SERVER_ID_ENV: &str = "KCLOUD_SERVER_ID";

/// A live process carrying [`SERVER_ID_ENV`]: a server's process or a descendant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stray {
    pid: u32,
    start: u64,
    /// Leads its own process group (the server's process, or a kernel in its session).
    leader: bool,
}

/// Live processes carrying [`SERVER_ID_ENV`], by server id.
pub(crate) fn tagged_processes() -> HashMap<String, Vec<Stray>> {
    let mut out: HashMap<String, Vec<Stray>> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let prefix = format!("{SERVER_ID_ENV}=");
    for pid in dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        // Other users' processes are unreadable, and cannot be ours.
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Some(id) = env
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
            .and_then(|id| std::str::from_utf8(id).ok())
        else {
            continue;
        };
        let Some(stat) = proc_stat(pid).filter(|s| !matches!(s.state, b'Z' | b'X' | b'x')) else {
            continue;
        };
        let leader = Pid::from_raw(pid as i32)
            .and_then(|p| rustix::process::getpgid(Some(p)).ok())
            .is_some_and(|g| g.as_raw_pid() as u32 == pid);
        out.entry(id.to_owned()).or_default().push(Stray {
            pid,
            start: stat.start,
            leader,
        });
    }
    out
}

/// Stops processes found by [`tagged_processes`]: each leader's group as a delete
/// does, then SIGKILL to any process still left.
pub(crate) async fn stop_strays(strays: &[Stray], grace: Duration) {
    for s in strays.iter().filter(|s| s.leader) {
        tracing::warn!(
            pid = s.pid,
            "stopping a server process that no record points to"
        );
        stop_process(s.pid, Some(s.start), grace).await;
    }
    for s in strays.iter().filter(|s| alive(s.pid, Some(s.start))) {
        if let Some(p) = Pid::from_raw(s.pid as i32) {
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
    }
}

/// What kcloud needs from `/proc/{pid}/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub(crate) state: u8,
    pub(crate) ppid: u32,
    /// Start time in clock ticks after boot.
    pub(crate) start: u64,
}

pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: *fields.first()?.as_bytes().first()?,
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The process exists, is not a zombie, and started at `start`.
pub(crate) fn alive(pid: u32, start: Option<u64>) -> bool {
    match (proc_stat(pid), start) {
        (Some(s), Some(start)) => s.start == start && !matches!(s.state, b'Z' | b'X' | b'x'),
        _ => false,
    }
}

/// Every descendant of `pid`, with start times.
fn descendants(pid: u32) -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let procs: Vec<(u32, ProcStat)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, proc_stat(p)?)))
        .collect();
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, s) in &procs {
            if s.ppid == parent && !out.iter().any(|(o, _)| o == p) {
                out.push((*p, s.start));
                frontier.push(*p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_odd_command_names() {
        let line = "4242 (we (ird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: b'S',
                ppid: 17,
                start: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        let me = proc_stat(std::process::id()).unwrap();
        assert!(alive(std::process::id(), Some(me.start)));
        assert!(!alive(std::process::id(), Some(me.start + 1)));
        assert!(!alive(std::process::id(), None));
    }
}
