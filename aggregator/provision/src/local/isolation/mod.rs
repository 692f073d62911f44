//! How the local provisioner keeps servers apart from each other and from the
//! platform (`--isolation sandbox`, the default): each server runs as an unprivileged
//! uid of its owner ([`identity`]), in a sandbox of its own ([`sandbox`]), in a cgroup
//! of its own that limits it and through which it is killed whole ([`cgroup`]), seeing
//! only its own GPU files ([`devices`]).
//!
//! Without the means (not root, no `bwrap`/`setpriv`, no writable cgroup v2) the
//! aggregator refuses to start the local provisioner unless told `--isolation none`.

mod cgroup;
mod devices;
pub(crate) mod identity;
pub(crate) mod sandbox;

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use kcloud_core::isolation::{Isolation, IsolationMode};
use kcloud_core::settings::LocalSettings;
use kcloud_core::{Error, Result};

pub(crate) use cgroup::{Cgroups, Limits};
pub(crate) use devices::device_files;
pub(crate) use sandbox::Sandbox;

/// `--isolation`: how local servers are confined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    /// Own uid, sandbox and cgroup per server; refused at start where impossible.
    Sandbox,
    /// Servers run as the aggregator's user, unconfined: for a machine whose users
    /// trust each other (or a developer's laptop without root).
    None,
}

/// The means of isolation found at start.
pub(crate) enum Confinement {
    None,
    Sandbox {
        sandbox: Box<Sandbox>,
        cgroups: Cgroups,
        settings: LocalSettings,
    },
}

impl Confinement {
    /// What `level` needs, found on this host; a clear error when it is not there.
    pub(crate) fn new(
        level: IsolationLevel,
        settings: &LocalSettings,
        data_dir: &Path,
    ) -> Result<Confinement> {
        if level == IsolationLevel::None {
            return Ok(Confinement::None);
        }
        let refuse = |why: String| {
            Error::Config(format!(
                "the local provisioner cannot isolate servers here: {why}. Without it every \
                 server runs as this process's user and can read the platform's secrets \
                 and other users' files. Fix that, or start with --isolation none where \
                 the machine's users trust each other"
            ))
        };
        if !rustix::process::geteuid().is_root() {
            return Err(refuse(
                "it must run as root to start each server as its owner's uid".into(),
            ));
        }
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let path = std::env::var_os("PATH");
        let cgroups = Cgroups::detect(&cgroup_name(&data_dir)).map_err(refuse)?;
        let sandbox = Sandbox::detect(path.as_deref(), &settings.read_only_paths, vec![data_dir])
            .map_err(refuse)?;
        Ok(Confinement::Sandbox {
            sandbox: Box::new(sandbox),
            cgroups,
            settings: settings.clone(),
        })
    }

    /// What the API and the portal say about it.
    pub(crate) fn report(&self) -> Isolation {
        match self {
            Confinement::None => Isolation {
                mode: IsolationMode::None,
                enforced: Vec::new(),
                notes: vec![
                    "--isolation none: servers run as the aggregator's user, unconfined; \
                     CPU and memory are accounted, not enforced. Deleting a server still \
                     stops all of its processes before its devices are freed."
                        .into(),
                ],
            },
            Confinement::Sandbox { cgroups, .. } => {
                let mut enforced = vec![
                    "identity (each server runs as an unprivileged uid of its owner)".into(),
                    "filesystem (bubblewrap mount namespace)".into(),
                    "processes (PID namespace; the cgroup is killed whole)".into(),
                    "devices (only the server's GPU device files)".into(),
                ];
                enforced.extend(cgroups.enforced());
                let notes = cgroups
                    .missing()
                    .into_iter()
                    .map(|c| format!("{c}: no {c} controller on this host; not enforced"))
                    .chain(std::iter::once(
                        "network: servers share the host's network (loopback ports included)"
                            .to_owned(),
                    ))
                    .collect();
                Isolation {
                    mode: IsolationMode::Sandbox,
                    enforced,
                    notes,
                }
            }
        }
    }
}

impl Confinement {
    /// Stops every process of server `id` (started as `pid`): SIGTERM, SIGKILL after
    /// `grace`; returns once none is left, so its devices may be freed.
    pub(crate) async fn stop(
        &self,
        id: &str,
        pid: Option<u32>,
        start: Option<u64>,
        grace: Duration,
    ) {
        match self {
            Confinement::None => {
                if let Some(pid) = pid {
                    super::process::stop_process(pid, start, grace).await;
                }
                // Processes that left the group (setsid, nohup): found by their tag.
                let strays = tagged(id).await;
                super::process::stop_strays(&strays, grace).await;
            }
            Confinement::Sandbox { cgroups, .. } => {
                let group = cgroups.group(id);
                group.signal(Signal::TERM);
                let deadline = Instant::now() + grace;
                while !group.pids().is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                if !group.pids().is_empty() {
                    tracing::warn!(
                        server = id,
                        "server did not stop after SIGTERM; killing its cgroup"
                    );
                }
                group.kill().await;
                group.remove();
            }
        }
    }

    /// After a server's main process ended: ends whatever of it is left (daemonized
    /// processes included). True when the kernel had killed one of its processes for
    /// exceeding its memory.
    pub(crate) async fn reap(&self, id: &str) -> bool {
        match self {
            Confinement::None => {
                let strays = tagged(id).await;
                super::process::stop_strays(&strays, Duration::ZERO).await;
                false
            }
            Confinement::Sandbox { cgroups, .. } => {
                let group = cgroups.group(id);
                let oom = group.oom_kills() > 0;
                group.kill().await;
                group.remove();
                oom
            }
        }
    }

    /// At start: ends the processes of servers no longer recorded (`known` holds the
    /// ids of those that are).
    pub(crate) async fn sweep(&self, known: &std::collections::HashSet<String>) {
        if let Confinement::Sandbox { cgroups, .. } = self {
            for id in cgroups.ids() {
                if !known.contains(&id) {
                    tracing::warn!(server = %id, "stopping the processes of a server no record points to");
                    let group = cgroups.group(&id);
                    group.kill().await;
                    group.remove();
                }
            }
        }
    }
}

/// The parent cgroup of one data directory's servers: `kcloud-` and a hash of its path
/// (FNV-1a: stable across restarts and builds, which adoption needs).
fn cgroup_name(data_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let hash = data_dir
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("kcloud-{:012x}", hash >> 16)
}

/// Live processes tagged with server `id`.
async fn tagged(id: &str) -> Vec<super::process::Stray> {
    tokio::task::spawn_blocking(super::process::tagged_processes)
        .await
        .map(|mut all| all.remove(id).unwrap_or_default())
        .unwrap_or_default()
}
