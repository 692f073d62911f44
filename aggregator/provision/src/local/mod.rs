//! The local shape's provisioner: every server is a process tree on this host
//! (JupyterLab by default), pinned to its devices with `CUDA_VISIBLE_DEVICES` and
//! `NVIDIA_VISIBLE_DEVICES`, listening on a free loopback port, working in
//! `<data-dir>/servers/{user}/{server}/work`, its output in `.../server.log`.
//!
//! Isolation ([`isolation`], `--isolation sandbox`, the default): each server runs as
//! an unprivileged uid of its owner, in a bubblewrap sandbox where it sees its home,
//! its own volumes and shares and only its GPU files, in a cgroup of its own that
//! limits its memory, CPU and processes and through which it is killed whole. With
//! `--isolation none` servers run as the aggregator's user, unconfined.
//!
//! Servers are recorded through [`ServerRepo`] and mirrored in memory, which answers
//! the reads. A watch task per server probes it until it answers (`pending` →
//! `running`) and notices when its process ends (→ `failed`, reported to [`Exits`]
//! only once every process of the server is gone). Processes outlive the aggregator:
//! at the next start, [`Provisioner::recover`] adopts those still running (same pid
//! and start time) and fails the others.
//!
//! The Jupyter token goes to the process in `JUPYTER_TOKEN`, not on its command line,
//! where any local user could read it with `ps`; it is removed from the logs users see.

pub mod isolation;
mod mounts;
mod process;
mod program;
#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, header};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use kcloud_core::isolation::Isolation;
use kcloud_core::launch::{Binding, CommandLine, JUPYTER_CONFIG, Launch};
use kcloud_core::private::{create_private_dir, random_token};
use kcloud_core::repo::{ServerRecord, ServerRepo};
use kcloud_core::server::{
    MountSource, Server, ServerEvent, ServerSpec, ServerStatus, Upstream, base_url,
};
use kcloud_core::settings::LocalSettings;
use kcloud_core::validate::{validate_server_name, validate_user_name};
use kcloud_core::{Error, Result, now_ms};

use crate::logs::{LOG_TAIL_BYTES, tail_lines, whole_lines_tail};
use crate::table::{Key, ServerTable};
use crate::upstream::{HttpClient, http_client};
use crate::{Exits, LogStream, Provisioner};
use isolation::identity::{Identity, adopt_tree, identity, owned_dir};
use isolation::sandbox::{CONFIG_DIR, HOME, Jail, account_files};
use isolation::{Confinement, IsolationLevel, Limits, device_files};
use mounts::{link_mounts, unlink_mounts};
use process::{SERVER_ID_ENV, alive, describe_exit, proc_stat, stop_strays, tagged_processes};
use program::{find_program, passes};

/// Activity is written to the database at most this often per server.
const ACTIVITY_SAVE_MS: u64 = 30_000;

/// How the local provisioner runs servers.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Servers live in `<data_dir>/servers/{user}/{server}`.
    pub data_dir: PathBuf,
    /// Program that starts JupyterLab. `None`: `jupyter-lab`, else `jupyter lab`, on
    /// `PATH`.
    pub jupyter: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a server is deleted.
    pub stop_grace: Duration,
    /// A server that does not answer within this time after its start is failed.
    pub start_timeout: Duration,
    /// How servers are confined (`--isolation`).
    pub isolation: IsolationLevel,
    /// `[local]`: identities, limits, what a sandbox sees.
    pub settings: LocalSettings,
}

impl LocalOptions {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            jupyter: None,
            stop_grace: Duration::from_secs(10),
            start_timeout: Duration::from_secs(300),
            isolation: IsolationLevel::Sandbox,
            settings: LocalSettings::default(),
        }
    }
}

/// Servers as child processes of this host. See the module docs.
pub struct LocalProvisioner {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ServerRepo>,
    exits: Arc<dyn Exits>,
    opts: LocalOptions,
    confinement: Confinement,
    table: ServerTable<Entry>,
    http: HttpClient,
    shutdown: CancellationToken,
}

struct Entry {
    row: ServerRecord,
    /// Last activity as written to the database.
    saved_activity_ms: u64,
}

impl crate::table::Entry for Entry {
    fn server(&self) -> Server {
        view(&self.row)
    }

    fn id(&self) -> &str {
        &self.row.server.id
    }
}

impl LocalProvisioner {
    /// `exits` is told about servers that end by themselves. Refuses (`Config`) when
    /// `opts.isolation` asks for a sandbox this host cannot give.
    pub fn new(
        store: Arc<dyn ServerRepo>,
        exits: Arc<dyn Exits>,
        opts: LocalOptions,
    ) -> Result<Self> {
        let confinement = Confinement::new(opts.isolation, &opts.settings, &opts.data_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                exits,
                opts,
                confinement,
                table: ServerTable::default(),
                http: http_client(),
                shutdown: CancellationToken::new(),
            }),
        })
    }
}

#[async_trait::async_trait]
impl Provisioner for LocalProvisioner {
    async fn recover(&self) -> Result<Vec<Server>> {
        let inner = &self.inner;
        let mut out = Vec::new();
        // Found by the id they carry, not by the recorded pid: a kill between starting
        // a process and recording its pid leaves a row without one.
        let mut tagged = tokio::task::spawn_blocking(tagged_processes)
            .await
            .map_err(|e| Error::Internal(format!("process scan failed: {e}")))?;
        let rows = inner.store.servers().await?;
        let known: std::collections::HashSet<String> =
            rows.iter().map(|r| r.server.id.clone()).collect();
        inner.confinement.sweep(&known).await;
        for mut row in rows {
            let strays = tagged.remove(&row.server.id).unwrap_or_default();
            // Whether to watch it (and whether it answers yet), once it is in the map.
            let mut adopted = None;
            match row.server.status {
                ServerStatus::Stopping => {
                    // A delete was cut short: finish it.
                    inner.stop(&row).await;
                    stop_strays(&strays, inner.opts.stop_grace).await;
                    inner.store.delete_server(&row.server.id).await?;
                    tracing::info!(owner = %row.server.owner, server = %row.server.name, "finished an interrupted delete");
                    continue;
                }
                // Queued servers are never recorded here (the queue keeps them).
                ServerStatus::Failed | ServerStatus::Queued => {
                    stop_strays(&strays, inner.opts.stop_grace).await;
                    inner.confinement.reap(&row.server.id).await;
                }
                ServerStatus::Pending | ServerStatus::Running => {
                    let live = row.server.pid.is_some_and(|pid| alive(pid, row.pid_start));
                    if live {
                        let ready = inner.probe(&row).await;
                        let pid = row.server.pid.unwrap_or_default();
                        row.server.status = if ready {
                            ServerStatus::Running
                        } else {
                            ServerStatus::Pending
                        };
                        if ready {
                            row.server.reason = None;
                            row.server.ready_at_ms.get_or_insert_with(now_ms);
                        }
                        inner.store.save_server(row.clone()).await?;
                        inner
                            .event(
                                &row.server.id,
                                "Adopted",
                                format!(
                                    "process {pid} still running after a restart; {}",
                                    row.server.status.as_str()
                                ),
                            )
                            .await;
                        adopted = Some(ready);
                    } else {
                        row.server.status = ServerStatus::Failed;
                        const ENDED: &str =
                            "its process ended while kcloud-aggregator was not running";
                        row.server.reason = Some(match (strays.is_empty(), row.server.pid) {
                            (true, _) => ENDED.into(),
                            (false, Some(_)) => {
                                // Its main process is gone; what it left is stopped.
                                stop_strays(&strays, inner.opts.stop_grace).await;
                                format!("{ENDED}; what it left running was stopped")
                            }
                            (false, None) => {
                                // Started but never recorded: nothing knows its pid
                                // to watch it, so it is stopped rather than adopted.
                                stop_strays(&strays, inner.opts.stop_grace).await;
                                "kcloud-aggregator stopped while starting it; stopped".into()
                            }
                        });
                        // Whatever of it is left (a sandbox whose main process
                        // ended) goes before its devices are freed.
                        inner.confinement.reap(&row.server.id).await;
                        inner.store.save_server(row.clone()).await?;
                        inner
                            .event(
                                &row.server.id,
                                "Failed",
                                row.server.reason.clone().unwrap_or_default(),
                            )
                            .await;
                    }
                }
            }
            tracing::info!(owner = %row.server.owner, server = %row.server.name, status = row.server.status.as_str(), "server recovered");
            out.push(view(&row));
            let key = (row.server.owner.clone(), row.server.name.clone());
            let id = row.server.id.clone();
            let saved_activity_ms = row.server.last_activity_ms;
            inner.table.insert(
                key.clone(),
                Entry {
                    row,
                    saved_activity_ms,
                },
            );
            // Only now: a watch that starts before the entry exists ends at once, and
            // the server would stay pending (or its death unnoticed) for good.
            if let Some(ready) = adopted {
                tokio::spawn(watch(inner.clone(), key, id, None, ready));
            }
        }
        Ok(out)
    }

    async fn create(&self, spec: ServerSpec) -> Result<Server> {
        let inner = &self.inner;
        validate_user_name(&spec.owner)?;
        validate_server_name(&spec.name)?;
        // Before anything is made: a missing program or device file is the user's or
        // the host's problem, not a half-created server.
        let program = inner.program(&spec)?;
        let devices = match &inner.confinement {
            Confinement::None => Vec::new(),
            Confinement::Sandbox { settings, .. } => {
                device_files(&settings.device_root, &settings.mig_minors, &spec.addresses)?
            }
        };
        let now = now_ms();
        let mut row = ServerRecord {
            server: Server {
                reason: Some("starting".into()),
                ..Server::pending(uuid::Uuid::new_v4().to_string(), spec, now)
            },
            port: None,
            pid_start: None,
            token: random_token(),
        };
        let key = (row.server.owner.clone(), row.server.name.clone());
        inner.table.insert_new(
            key.clone(),
            Entry {
                row: row.clone(),
                saved_activity_ms: now,
            },
        )?;
        match inner.start(&mut row, program, devices).await {
            Ok(child) => {
                let started = view(&row);
                inner.table.update(&key, &row.server.id, |e| {
                    e.row = row.clone();
                    (false, ())
                });
                tokio::spawn(watch(
                    inner.clone(),
                    key,
                    row.server.id.clone(),
                    Some(child),
                    false,
                ));
                Ok(started)
            }
            Err(e) => {
                inner.table.forget(&key, &row.server.id);
                if let Err(e) = inner.store.delete_server(&row.server.id).await {
                    tracing::error!(error = %e, "could not remove the record of a server that failed to start");
                }
                Err(e)
            }
        }
    }

    async fn delete(&self, owner: &str, name: &str) -> Result<Option<Server>> {
        let inner = &self.inner;
        let key = (owner.to_owned(), name.to_owned());
        let row = {
            let mut servers = inner.table.lock();
            let Some(e) = servers.get_mut(&key) else {
                return Ok(None);
            };
            e.row.server.status = ServerStatus::Stopping;
            e.row.server.reason = Some("deleting".into());
            e.row.clone()
        };
        inner.table.notify();
        inner.store.save_server(row.clone()).await?;
        inner
            .event(&row.server.id, "Stopping", "deleted".into())
            .await;
        inner.stop(&row).await;
        inner.store.delete_server(&row.server.id).await?;
        inner.table.forget(&key, &row.server.id);
        unlink_mounts(
            &inner.server_dir(owner, name).join("work"),
            &row.server.mounts,
        );
        let runtime = inner.server_dir(owner, name).join("runtime");
        if let Err(e) = std::fs::remove_dir_all(&runtime)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, dir = %runtime.display(), "could not remove a server's runtime directory");
        }
        Ok(Some(view(&row)))
    }

    fn get(&self, owner: &str, name: &str) -> Option<Server> {
        self.inner.table.get(owner, name)
    }

    fn list(&self, owner: Option<&str>) -> Vec<Server> {
        self.inner.table.list(owner)
    }

    async fn logs(&self, owner: &str, name: &str, tail: usize) -> Result<String> {
        let token = self
            .inner
            .table
            .find(owner, name, |e| e.row.token.clone())?;
        let path = self.inner.server_dir(owner, name).join("server.log");
        let text = tokio::task::spawn_blocking(move || tail_lines(&path, tail, LOG_TAIL_BYTES))
            .await
            .map_err(|e| Error::Internal(format!("log task failed: {e}")))?
            .map_err(|source| Error::Io {
                context: "reading a server log".into(),
                source,
            })?;
        Ok(text.replace(&token, "<token>"))
    }

    async fn follow_logs(&self, owner: &str, name: &str, tail: usize) -> Result<LogStream> {
        let key = (owner.to_owned(), name.to_owned());
        let (token, id) = self.inner.table.find(owner, name, |e| {
            (e.row.token.clone(), e.row.server.id.clone())
        })?;
        let path = self.inner.server_dir(owner, name).join("server.log");
        // Where following starts: the end as it is now; the tail is what lies before.
        // The tail is what the file holds now, up to its last whole line; following
        // goes on from there, so no line is lost, repeated or cut in two.
        let tail_path = path.clone();
        let (first, start) =
            tokio::task::spawn_blocking(move || whole_lines_tail(&tail_path, tail))
                .await
                .map_err(|e| Error::Internal(format!("log task failed: {e}")))?
                .map_err(|source| Error::Io {
                    context: "reading a server log".into(),
                    source,
                })?;
        let first = first.replace(&token, "<token>");
        let follow = LogFollow {
            inner: self.inner.clone(),
            key,
            id,
            token,
            path,
            offset: start,
            partial: Vec::new(),
            idle_after_end: 0,
        };
        let rest = futures_util::stream::unfold(follow, |mut f| async move {
            f.next_chunk().await.map(|chunk| (chunk, f))
        });
        Ok(Box::pin(
            futures_util::stream::once(async move { Ok(first) }).chain(rest),
        ))
    }

    async fn events(&self, owner: &str, name: &str) -> Result<Vec<ServerEvent>> {
        let id = self
            .inner
            .table
            .find(owner, name, |e| e.row.server.id.clone())?;
        self.inner.store.server_events(&id).await
    }

    fn touch(&self, owner: &str, name: &str, at_ms: u64) {
        let save = self.inner.table.with(owner, name, |e| {
            e.row.server.last_activity_ms = e.row.server.last_activity_ms.max(at_ms);
            (e.row.server.last_activity_ms >= e.saved_activity_ms + ACTIVITY_SAVE_MS).then(|| {
                e.saved_activity_ms = e.row.server.last_activity_ms;
                (e.row.server.id.clone(), e.row.server.last_activity_ms)
            })
        });
        if let Some(Some(seen)) = save {
            let store = self.inner.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.touch_servers(vec![seen]).await {
                    tracing::warn!(error = %e, "could not save server activity");
                }
            });
        }
    }

    async fn set_cull_exempt(
        &self,
        owner: &str,
        name: &str,
        exempt: bool,
    ) -> Result<Option<Server>> {
        let Some(row) = self.inner.table.with(owner, name, |e| {
            e.row.server.cull_exempt = exempt;
            e.row.clone()
        }) else {
            return Ok(None);
        };
        self.inner.store.save_server(row.clone()).await?;
        Ok(Some(view(&row)))
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.table.subscribe()
    }

    fn isolation(&self) -> Isolation {
        self.inner.confinement.report()
    }

    async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let unsaved: Vec<(String, u64)> = self
            .inner
            .table
            .lock()
            .values_mut()
            .filter(|e| e.row.server.last_activity_ms > e.saved_activity_ms)
            .map(|e| {
                e.saved_activity_ms = e.row.server.last_activity_ms;
                (e.row.server.id.clone(), e.row.server.last_activity_ms)
            })
            .collect();
        if !unsaved.is_empty()
            && let Err(e) = self.inner.store.touch_servers(unsaved).await
        {
            tracing::warn!(error = %e, "could not save server activity at shutdown");
        }
    }
}

/// The API-facing view of a row; the proxy's upstream only while running.
fn view(row: &ServerRecord) -> Server {
    let upstream = match (row.server.status, row.port) {
        (ServerStatus::Running, Some(port)) => Some(Upstream::new(
            &row.server.owner,
            &row.server.name,
            &row.server.launch,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            &row.token,
        )),
        _ => None,
    };
    Server {
        upstream,
        ..row.server.clone()
    }
}

/// Following one server's log file: whole new lines every [`FOLLOW_POLL`].
struct LogFollow {
    inner: Arc<Inner>,
    key: Key,
    id: String,
    token: String,
    path: PathBuf,
    offset: u64,
    /// The start of a line whose end has not been written yet.
    partial: Vec<u8>,
    /// Polls since the server ended; a few more read what it wrote last.
    idle_after_end: u32,
}

/// How often a followed log is read for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

impl LogFollow {
    /// The next complete lines, or `None` once the server is gone or has ended and
    /// its last output was sent.
    async fn next_chunk(&mut self) -> Option<Result<String>> {
        loop {
            let live = self
                .inner
                .table
                .lock()
                .get(&self.key)
                .filter(|e| e.row.server.id == self.id)
                .is_some_and(|e| {
                    matches!(
                        e.row.server.status,
                        ServerStatus::Pending | ServerStatus::Running
                    )
                });
            if !live {
                self.idle_after_end += 1;
                if self.idle_after_end > 2 {
                    return None;
                }
            }
            let (path, offset) = (self.path.clone(), self.offset);
            let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                let mut f = std::fs::File::open(path)?;
                f.seek(SeekFrom::Start(offset))?;
                let mut buf = Vec::new();
                f.take(LOG_TAIL_BYTES).read_to_end(&mut buf)?;
                Ok(buf)
            })
            .await;
            let bytes = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Ok(Err(source)) => {
                    return Some(Err(Error::Io {
                        context: "following a server log".into(),
                        source,
                    }));
                }
                Err(e) => return Some(Err(Error::Internal(format!("log task failed: {e}")))),
            };
            self.offset += bytes.len() as u64;
            self.partial.extend_from_slice(&bytes);
            // Whole lines only, so that a token is never split across two chunks.
            if let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') {
                let lines: Vec<u8> = self.partial.drain(..=end).collect();
                let text = String::from_utf8_lossy(&lines).replace(&self.token, "<token>");
                return Some(Ok(text));
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// What to run, found on this host: the launch with its own program (if any)
/// resolved to a path, and how JupyterLab starts here.
struct Program {
    launch: Launch,
    jupyter: Vec<String>,
}

/// The owned parts of a [`Jail`].
struct JailParts {
    hostname: String,
    id: Identity,
    home: PathBuf,
    config: Option<PathBuf>,
    accounts: Option<(PathBuf, PathBuf)>,
    mounts: Vec<(PathBuf, String, bool)>,
    devices: Vec<(PathBuf, PathBuf)>,
    cgroup_procs: Vec<PathBuf>,
    argv: Vec<String>,
}

impl JailParts {
    fn jail(&self) -> Jail<'_> {
        Jail {
            hostname: &self.hostname,
            uid: self.id.uid,
            gid: self.id.gid,
            home: &self.home,
            config: self.config.as_deref(),
            passwd: self
                .accounts
                .as_ref()
                .map(|(p, g)| (p.as_path(), g.as_path())),
            mounts: self.mounts.clone(),
            devices: self.devices.clone(),
            cgroup_procs: self.cgroup_procs.clone(),
            argv: &self.argv,
        }
    }
}

impl Inner {
    fn server_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.opts.data_dir.join("servers").join(owner).join(name)
    }

    /// Stops every process of the server; returns once none is left.
    async fn stop(&self, row: &ServerRecord) {
        self.confinement
            .stop(
                &row.server.id,
                row.server.pid,
                row.pid_start,
                self.opts.stop_grace,
            )
            .await;
    }

    async fn event(&self, id: &str, kind: &str, message: String) {
        let event = ServerEvent {
            at_ms: now_ms(),
            kind: kind.into(),
            message,
        };
        if let Err(e) = self.store.server_event(id, event).await {
            tracing::warn!(error = %e, "could not record a server event");
        }
    }

    /// Applies `f` to the record if it is still incarnation `id`; returns the updated
    /// record when `f` changed something.
    fn update(
        &self,
        key: &Key,
        id: &str,
        f: impl FnOnce(&mut ServerRecord) -> bool,
    ) -> Option<ServerRecord> {
        self.table
            .update(key, id, |e| {
                let changed = f(&mut e.row);
                (changed, changed.then(|| e.row.clone()))
            })
            .flatten()
    }

    fn program(&self, spec: &ServerSpec) -> Result<Program> {
        let path = std::env::var_os("PATH");
        let mut launch = spec.launch.clone();
        if let Some(command) = launch.command.as_mut() {
            let first = command
                .first_mut()
                .ok_or_else(|| Error::BadRequest("command: must not be empty".into()))?;
            let found = find_program(first, path.as_deref()).ok_or_else(|| {
                Error::BadRequest(format!(
                    "command: {first:?} is not an executable on this host's PATH"
                ))
            })?;
            *first = found.to_string_lossy().into_owned();
            return Ok(Program {
                launch,
                jupyter: Vec::new(),
            });
        }
        const HINT: &str = "install it with `pip install jupyterlab`";
        let jupyter = match &self.opts.jupyter {
            Some(p) => {
                let shown = p.display();
                let found =
                    find_program(&p.to_string_lossy(), path.as_deref()).ok_or_else(|| {
                        Error::Unavailable(format!(
                            "JupyterLab is not available on this host: {shown} (--jupyter-command) \
                         is not an executable; {HINT}"
                        ))
                    })?;
                let mut argv = vec![found.to_string_lossy().into_owned()];
                if found.file_name() == Some(OsStr::new("jupyter")) {
                    argv.push("lab".into());
                }
                argv
            }
            None => {
                if let Some(lab) = find_program("jupyter-lab", path.as_deref()) {
                    vec![lab.to_string_lossy().into_owned()]
                } else if let Some(jupyter) = find_program("jupyter", path.as_deref()) {
                    vec![jupyter.to_string_lossy().into_owned(), "lab".into()]
                } else {
                    return Err(Error::Unavailable(format!(
                        "JupyterLab is not installed on this host: neither `jupyter-lab` nor \
                         `jupyter` is on PATH; {HINT}"
                    )));
                }
            }
        };
        Ok(Program { launch, jupyter })
    }

    /// Makes the directories and the record, then starts the process (sandboxed, as
    /// its owner, in its cgroup, unless `--isolation none`). On error the caller
    /// removes the record.
    async fn start(
        &self,
        row: &mut ServerRecord,
        program: Program,
        devices: Vec<(PathBuf, PathBuf)>,
    ) -> Result<tokio::process::Child> {
        let dir = self.server_dir(&row.server.owner, &row.server.name);
        let work = dir.join("work");
        let runtime = dir.join("runtime");
        let who = match &self.confinement {
            Confinement::Sandbox { settings, .. } => {
                Some(identity(settings, self.store.as_ref(), &row.server.owner).await?)
            }
            Confinement::None => None,
        };
        match who {
            Some(id) => {
                create_private_dir(&dir)?;
                owned_dir(&work, id)?;
            }
            None => {
                create_private_dir(&work)?;
                create_private_dir(&runtime)?;
                link_mounts(&work, &row.server.mounts)?;
            }
        }
        let log_path = dir.join("server.log");
        let log = open_log(&log_path).map_err(|source| Error::Io {
            context: format!("creating {}", log_path.display()),
            source,
        })?;
        let port = free_port()?;
        row.port = Some(port);
        self.store.insert_server(row.clone()).await?;
        self.event(
            &row.server.id,
            "Created",
            if row.server.devices.is_empty() {
                "no devices".into()
            } else {
                format!(
                    "devices {} on {}",
                    row.server.devices.join(", "),
                    row.server.node.as_deref().unwrap_or("?")
                )
            },
        )
        .await;

        let base = base_url(&row.server.owner, &row.server.name);
        let jupyter = program.launch.command.is_none();
        let binding = Binding {
            ip: "127.0.0.1",
            port,
            base_url: &base,
        };
        let mut argv = CommandLine::build(&program.launch, &program.jupyter, &binding).argv();
        if jupyter && who.is_none() && rustix::process::geteuid().is_root() {
            // Unconfined as root (containers, CI): JupyterLab refuses that unless told.
            argv.push("--ServerApp.allow_root=True".to_owned());
        }
        let config = dir.join("config");
        if jupyter {
            write_jupyter_config(&config, who.is_some())?;
        }

        let visible = row.server.devices.join(",");
        let mut cmd = match (&self.confinement, who) {
            (
                Confinement::Sandbox {
                    sandbox,
                    cgroups,
                    settings,
                },
                Some(id),
            ) => {
                let group = cgroups
                    .create(
                        &row.server.id,
                        Limits {
                            memory_bytes: row.server.memory_bytes,
                            cpu_millis: row.server.cpu_millis,
                            pids: settings.pids_max,
                        },
                    )
                    .map_err(|source| Error::Io {
                        context: "creating the server's cgroup".into(),
                        source,
                    })?;
                let jail = self.jail(row, &dir, &argv, jupyter, id, devices, group.procs_files());
                let line = match jail {
                    Ok(jail) => sandbox.command(&jail.jail()),
                    Err(e) => {
                        group.remove();
                        return Err(e);
                    }
                };
                let mut cmd = tokio::process::Command::new(&line[0]);
                cmd.args(&line[1..])
                    .current_dir("/")
                    .env_clear()
                    .envs(std::env::vars_os().filter(|(k, _)| passes(k)))
                    .env("HOME", HOME)
                    .env("USER", &row.server.owner)
                    .env("LOGNAME", &row.server.owner)
                    .env("TMPDIR", "/tmp")
                    .envs(&row.server.launch.env)
                    .env("JUPYTER_RUNTIME_DIR", "/tmp/jupyter-runtime")
                    .env("JUPYTER_CONFIG_PATH", CONFIG_DIR);
                cmd
            }
            _ => {
                let mut cmd = tokio::process::Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .current_dir(&work)
                    .env_clear()
                    .envs(std::env::vars_os().filter(|(k, _)| passes(k)))
                    .envs(&row.server.launch.env)
                    .env("JUPYTER_RUNTIME_DIR", &runtime)
                    .env("JUPYTER_CONFIG_PATH", &config);
                cmd
            }
        };
        cmd.env("CUDA_VISIBLE_DEVICES", &visible)
            .env(
                "NVIDIA_VISIBLE_DEVICES",
                if visible.is_empty() { "none" } else { &visible },
            )
            .env("KCLOUD_USER", &row.server.owner)
            .env("KCLOUD_SERVER", &row.server.name)
            // Lets a restart find the process even if its pid was never recorded.
            .env(SERVER_ID_ENV, &row.server.id)
            .env("KCLOUD_PORT", port.to_string())
            .env("KCLOUD_BASE_URL", &base)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|source| Error::Io {
                context: "duplicating the log file handle".into(),
                source,
            })?)
            .stderr(log)
            // Its own process group: signals reach its children, and a terminal's
            // Ctrl-C to the aggregator does not reach it.
            .process_group(0)
            .kill_on_drop(false);
        if row.server.launch.run_profile().is_jupyter() {
            // Only an IDE that checks the token gets it; the others run behind the
            // proxy's auth and have no use for a secret.
            cmd.env("JUPYTER_TOKEN", &row.token);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                self.confinement.reap(&row.server.id).await;
                return Err(Error::Io {
                    context: format!("starting {}", argv[0]),
                    source,
                });
            }
        };
        let pid = child
            .id()
            .ok_or_else(|| Error::Internal("started process has no pid".into()))?;
        row.server.pid = Some(pid);
        row.pid_start = proc_stat(pid).map(|s| s.start);
        self.store.save_server(row.clone()).await?;
        self.event(
            &row.server.id,
            "Started",
            match who {
                Some(id) => format!(
                    "process {pid} (sandboxed, uid {}) listening on loopback port {port}",
                    id.uid
                ),
                None => format!("process {pid} listening on loopback port {port}"),
            },
        )
        .await;
        tracing::info!(owner = %row.server.owner, server = %row.server.name, pid, port, "server started");
        Ok(child)
    }

    /// What a sandboxed server's jail holds: its home, its volumes (given to its
    /// owner's uid) and shares at their mount paths, its device files, the account
    /// files naming its uid.
    #[allow(clippy::too_many_arguments)]
    fn jail(
        &self,
        row: &ServerRecord,
        dir: &Path,
        argv: &[String],
        jupyter: bool,
        id: Identity,
        devices: Vec<(PathBuf, PathBuf)>,
        cgroup_procs: Vec<PathBuf>,
    ) -> Result<JailParts> {
        let mut mounts = Vec::new();
        for m in &row.server.mounts {
            let (MountSource::Volume { local_path, .. } | MountSource::Share { local_path, .. }) =
                &m.source;
            let host = local_path.clone().ok_or_else(|| {
                Error::Unavailable(format!(
                    "{} cannot be mounted on this host (no local path)",
                    m.mount_path
                ))
            })?;
            if matches!(m.source, MountSource::Volume { .. }) {
                adopt_tree(&host, id)?;
            }
            mount_point(&dir.join("work"), &m.mount_path, id)?;
            mounts.push((host, m.mount_path.clone(), m.read_only));
        }
        let accounts = match &self.confinement {
            Confinement::Sandbox { settings, .. }
                if settings.identities == kcloud_core::settings::Identities::Range =>
            {
                let (passwd, group) = account_files(&row.server.owner, id.uid, id.gid);
                let write = |name: &str, text: &str| {
                    let path = dir.join(name);
                    std::fs::write(&path, text)
                        .map(|()| path.clone())
                        .map_err(|source| Error::Io {
                            context: format!("writing {}", path.display()),
                            source,
                        })
                };
                Some((write("passwd", &passwd)?, write("group", &group)?))
            }
            _ => None,
        };
        Ok(JailParts {
            hostname: row.server.name.clone(),
            id,
            home: dir.join("work"),
            config: jupyter.then(|| dir.join("config")),
            accounts,
            mounts,
            devices,
            cgroup_procs,
            argv: argv.to_vec(),
        })
    }

    /// Whether the server answers its profile's readiness path with a 2xx (with no
    /// readiness path: anything but a 5xx at its root).
    async fn probe(&self, row: &ServerRecord) -> bool {
        let Some(port) = row.port else {
            return false;
        };
        let profile = row.server.launch.run_profile();
        let path = profile.probe_path(&base_url(&row.server.owner, &row.server.name));
        let mut req = Request::get(format!("http://127.0.0.1:{port}{path}"));
        if profile.is_jupyter() {
            req = req.header(header::AUTHORIZATION, format!("token {}", row.token));
        }
        let Ok(req) = req.body(Body::empty()) else {
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(2), self.http.request(req)).await {
            Ok(Ok(resp)) if profile.readiness_path.is_empty() => !resp.status().is_server_error(),
            Ok(Ok(resp)) => resp.status().is_success(),
            _ => false,
        }
    }

    async fn mark_running(&self, key: &Key, id: &str, since: Instant) {
        let now = now_ms();
        let Some(row) = self.update(key, id, |r| {
            if r.server.status != ServerStatus::Pending {
                return false;
            }
            r.server.status = ServerStatus::Running;
            r.server.reason = None;
            r.server.ready_at_ms.get_or_insert(now);
            r.server.last_activity_ms = r.server.last_activity_ms.max(now);
            true
        }) else {
            return;
        };
        if let Err(e) = self.store.save_server(row.clone()).await {
            tracing::warn!(error = %e, "could not save a server's status");
        }
        let ms = since.elapsed().as_millis();
        self.event(id, "Ready", format!("answering after {ms} ms"))
            .await;
        tracing::info!(owner = %row.server.owner, server = %row.server.name, ms, "server running");
    }

    /// Marks a pending or running server failed and reports its end.
    async fn fail(&self, key: &Key, id: &str, reason: String) {
        let Some(row) = self.update(key, id, |r| {
            if !matches!(
                r.server.status,
                ServerStatus::Pending | ServerStatus::Running
            ) {
                return false;
            }
            r.server.status = ServerStatus::Failed;
            r.server.reason = Some(reason.clone());
            true
        }) else {
            return;
        };
        tracing::warn!(owner = %row.server.owner, server = %row.server.name, %reason, "server failed");
        self.exits.exited(&view(&row));
        if let Err(e) = self.store.save_server(row).await {
            tracing::warn!(error = %e, "could not save a server's status");
        }
        self.event(id, "Failed", reason).await;
    }

    /// The last non-empty line of the server's log, token removed, for failure reasons.
    fn last_log_line(&self, key: &Key, token: &str) -> Option<String> {
        let path = self.server_dir(&key.0, &key.1).join("server.log");
        let text = tail_lines(&path, 20, 64 << 10).ok()?;
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        let mut line = line.trim().replace(token, "<token>");
        if line.len() > 300 {
            let mut end = 300;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        Some(line)
    }
}

/// Watches one server: probes it until it answers, then notices when its process
/// ends. `child` is `Some` for processes this aggregator started (so they are reaped
/// and their exit status is known), `None` for adopted ones (polled by pid).
async fn watch(
    inner: Arc<Inner>,
    key: Key,
    id: String,
    mut child: Option<tokio::process::Child>,
    mut ready: bool,
) {
    let since = Instant::now();
    let Some(row) = inner
        .table
        .lock()
        .get(&key)
        .filter(|e| e.row.server.id == id)
        .map(|e| e.row.clone())
    else {
        return;
    };
    let (Some(pid), pid_start) = (row.server.pid, row.pid_start) else {
        return;
    };
    loop {
        let delay = if ready {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(25)
        };
        let exited: Option<Option<ExitStatus>> = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            status = wait_child(&mut child) => Some(status),
            _ = tokio::time::sleep(delay) => None,
        };
        // Deleted (or being deleted): the delete does the rest.
        let current = inner.table.lock().get(&key).is_some_and(|e| {
            e.row.server.id == id && e.row.server.status != ServerStatus::Stopping
        });
        if !current {
            return;
        }
        let exited = match exited {
            Some(status) => Some(status),
            None if child.is_none() && !alive(pid, pid_start) => Some(None),
            None => None,
        };
        if let Some(status) = exited {
            // What the server left running goes first: its devices are freed only
            // when nothing of it is left.
            let oom = inner.confinement.reap(&id).await;
            let mut reason = match status.map(describe_exit) {
                Some(s) => format!("process {s}"),
                None => "process ended".to_owned(),
            };
            if oom {
                reason = format!(
                    "OOMKilled: it used more than its memory ({} MiB) and the kernel killed \
                     it; {reason}",
                    row.server.memory_bytes >> 20
                );
            }
            if let Some(line) = inner.last_log_line(&key, &row.token) {
                reason = format!("{reason}: {line}");
            }
            inner.fail(&key, &id, reason).await;
            return;
        }
        if !ready {
            if inner.probe(&row).await {
                ready = true;
                inner.mark_running(&key, &id, since).await;
            } else if since.elapsed() > inner.opts.start_timeout {
                let secs = inner.opts.start_timeout.as_secs();
                // Stopped first: failing it frees its devices.
                inner.stop(&row).await;
                if let Some(c) = child.as_mut() {
                    let _ = c.wait().await;
                }
                inner
                    .fail(
                        &key,
                        &id,
                        format!("did not answer within {secs} s of its start; stopped"),
                    )
                    .await;
                return;
            }
        }
    }
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> Option<ExitStatus> {
    match child {
        Some(c) => c.wait().await.ok(),
        None => std::future::pending().await,
    }
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A free loopback port. Another process may take it before the server binds it; the
/// server then fails (`port_retries=0`) rather than listen elsewhere.
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            context: "finding a free loopback port".into(),
            source,
        })
}

/// Makes the folders of a mount path in the server's home (on the host, as its
/// owner's), so that they exist as plain folders the server can pass through. A link
/// or file in the way (the server's own doing) is refused, never followed.
fn mount_point(home: &Path, mount_path: &str, id: Identity) -> Result<()> {
    let Some(rel) = mount_path
        .strip_prefix(HOME)
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Err(Error::BadRequest(format!("bad mount path {mount_path:?}")));
    };
    let mut at = home.to_owned();
    for part in Path::new(rel).components() {
        let std::path::Component::Normal(part) = part else {
            return Err(Error::BadRequest(format!("bad mount path {mount_path:?}")));
        };
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "{mount_path}: something other than a folder is in the way in the \
                     server's home; move it away or mount elsewhere"
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|source| Error::Io {
                    context: format!("creating {}", at.display()),
                    source,
                })?;
                std::os::unix::fs::lchown(&at, Some(id.uid), Some(id.gid)).map_err(|source| {
                    Error::Io {
                        context: format!("giving {} to its owner", at.display()),
                        source,
                    }
                })?;
            }
            Err(source) => {
                return Err(Error::Io {
                    context: format!("checking {}", at.display()),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Writes the Jupyter configuration; `readable`: for a sandboxed server's uid too (it
/// holds nothing secret), else for the aggregator's user only.
fn write_jupyter_config(dir: &Path, readable: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    create_private_dir(dir)?;
    let path = dir.join("jupyter_server_config.py");
    let io = |source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    std::fs::write(&path, JUPYTER_CONFIG).map_err(io)?;
    if readable {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(io)?;
    }
    Ok(())
}
