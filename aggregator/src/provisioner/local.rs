//! The local shape's provisioner: every server is a child process on this host
//! (JupyterLab by default), pinned to its devices with `CUDA_VISIBLE_DEVICES` and
//! `NVIDIA_VISIBLE_DEVICES`, listening on a free loopback port, working in
//! `<data-dir>/servers/{user}/{server}/work`, its output in `.../server.log`.
//!
//! Servers are recorded in SQLite ([`Store`]) and mirrored in memory, which answers the
//! reads. A watch task per server probes it until it answers (`pending` → `running`)
//! and notices when its process ends (→ `failed`, devices released). Processes run in
//! their own process group and outlive the aggregator: at the next start,
//! [`Provisioner::recover`] adopts those still running (same pid and start time) and
//! fails the others.
//!
//! The Jupyter token goes to the process in `JUPYTER_TOKEN`, not on its command line,
//! where any local user could read it with `ps`; it is removed from the logs users see.
//! Processes run as the aggregator's Unix user: the local shape is for a group that
//! trusts each other (one lab's GPU box), not for isolation between users. CPU and
//! memory are accounted against quotas but not enforced here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, header};
use rustix::process::{Pid, Signal};
use tokio_util::sync::CancellationToken;

use futures_util::StreamExt as _;

use super::{
    LogStream, Provisioner, Server, ServerEvent, ServerSpec, ServerStatus, Upstream, base_url,
    validate_server_name,
};
use crate::ledger::Ledger;
use crate::proxy::{HttpClient, http_client};
use crate::store::{ServerRow, Store, validate_user_name};
use crate::{Error, Result, now_ms};

/// Activity is written to the database at most this often per server.
const ACTIVITY_SAVE_MS: u64 = 30_000;
/// Log bytes read for a tail, at most.
const LOG_TAIL_BYTES: u64 = 4 << 20;
/// The aggregator's environment variables a server inherits (plus `LC_*`, `PYENV_*`,
/// `CONDA_*`, `XDG_*`); nothing else, so that no secret of the aggregator's leaks.
const PASS_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONUSERBASE",
    "JUPYTER_PATH",
    "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR",
];
const PASS_ENV_PREFIXES: &[&str] = &["LC_", "PYENV_", "CONDA_", "XDG_"];

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
}

impl LocalOptions {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            jupyter: None,
            stop_grace: Duration::from_secs(10),
            start_timeout: Duration::from_secs(300),
        }
    }
}

/// Servers as child processes of this host. See the module docs.
pub struct LocalProvisioner {
    inner: Arc<Inner>,
}

type Key = (String, String);

struct Inner {
    store: Store,
    ledger: Arc<Ledger>,
    opts: LocalOptions,
    servers: Mutex<HashMap<Key, Entry>>,
    /// Bumped after a server appears, changes status or goes, for live views.
    changed: crate::events::Signal,
    http: HttpClient,
    shutdown: CancellationToken,
}

struct Entry {
    row: ServerRow,
    /// Last activity as written to the database.
    saved_activity_ms: u64,
}

impl LocalProvisioner {
    /// `ledger`: where the devices of servers that end by themselves are released.
    pub fn new(store: Store, ledger: Arc<Ledger>, opts: LocalOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                ledger,
                opts,
                servers: Mutex::new(HashMap::new()),
                changed: Default::default(),
                http: http_client(),
                shutdown: CancellationToken::new(),
            }),
        }
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
        for mut row in inner.store.servers().await? {
            let strays = tagged.remove(&row.id).unwrap_or_default();
            // Whether to watch it (and whether it answers yet), once it is in the map.
            let mut adopted = None;
            match row.status {
                ServerStatus::Stopping => {
                    // A delete was cut short: finish it.
                    if let Some(pid) = row.pid {
                        stop_process(pid, row.pid_start, inner.opts.stop_grace).await;
                    }
                    stop_strays(&strays, inner.opts.stop_grace).await;
                    inner.store.delete_server(&row.id).await?;
                    tracing::info!(owner = %row.owner, server = %row.name, "finished an interrupted delete");
                    continue;
                }
                ServerStatus::Failed => stop_strays(&strays, inner.opts.stop_grace).await,
                ServerStatus::Pending | ServerStatus::Running => {
                    let live = row.pid.is_some_and(|pid| alive(pid, row.pid_start));
                    if live {
                        let ready = inner.probe(&row).await;
                        let pid = row.pid.unwrap_or_default();
                        row.status = if ready {
                            ServerStatus::Running
                        } else {
                            ServerStatus::Pending
                        };
                        if ready {
                            row.reason = None;
                            row.ready_at_ms.get_or_insert_with(now_ms);
                        }
                        inner.store.save_server(row.clone()).await?;
                        inner
                            .event(
                                &row.id,
                                "Adopted",
                                format!(
                                    "process {pid} still running after a restart; {}",
                                    row.status.as_str()
                                ),
                            )
                            .await;
                        adopted = Some(ready);
                    } else {
                        row.status = ServerStatus::Failed;
                        row.reason = Some(if strays.is_empty() {
                            "its process ended while kcloud-aggregator was not running".into()
                        } else {
                            // Started but never recorded: nothing knows its pid to
                            // watch it, so it is stopped rather than adopted.
                            stop_strays(&strays, inner.opts.stop_grace).await;
                            "kcloud-aggregator stopped while starting it; stopped".into()
                        });
                        inner.store.save_server(row.clone()).await?;
                        inner
                            .event(&row.id, "Failed", row.reason.clone().unwrap_or_default())
                            .await;
                    }
                }
            }
            tracing::info!(owner = %row.owner, server = %row.name, status = row.status.as_str(), "server recovered");
            out.push(view(&row));
            let key = (row.owner.clone(), row.name.clone());
            let id = row.id.clone();
            let saved_activity_ms = row.last_activity_ms;
            inner.lock().insert(
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
        // Before anything is made: a missing program is the user's or the host's
        // problem, not a half-created server.
        let program = inner.program(&spec)?;
        let now = now_ms();
        let mut row = ServerRow {
            id: uuid::Uuid::new_v4().to_string(),
            owner: spec.owner,
            name: spec.name,
            status: ServerStatus::Pending,
            reason: Some("starting".into()),
            node: spec.node,
            devices: spec.devices,
            cpu_millis: spec.cpu_millis,
            memory_bytes: spec.memory_bytes,
            image: spec.image,
            launch: spec.launch,
            port: None,
            pid: None,
            pid_start: None,
            token: new_token(),
            created_at_ms: now,
            ready_at_ms: None,
            last_activity_ms: now,
            cull_exempt: false,
            mounts: spec.mounts,
        };
        let key = (row.owner.clone(), row.name.clone());
        {
            let mut servers = inner.lock();
            if servers.contains_key(&key) {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already in use",
                    row.name
                )));
            }
            servers.insert(
                key.clone(),
                Entry {
                    row: row.clone(),
                    saved_activity_ms: now,
                },
            );
        }
        inner.changed.notify();
        match inner.start(&mut row, program).await {
            Ok(child) => {
                let started = view(&row);
                if let Some(e) = inner.lock().get_mut(&key).filter(|e| e.row.id == row.id) {
                    e.row = row.clone();
                }
                tokio::spawn(watch(
                    inner.clone(),
                    key,
                    row.id.clone(),
                    Some(child),
                    false,
                ));
                Ok(started)
            }
            Err(e) => {
                inner.forget(&key, &row.id);
                if let Err(e) = inner.store.delete_server(&row.id).await {
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
            let mut servers = inner.lock();
            let Some(e) = servers.get_mut(&key) else {
                return Ok(None);
            };
            e.row.status = ServerStatus::Stopping;
            e.row.reason = Some("deleting".into());
            e.row.clone()
        };
        inner.changed.notify();
        inner.store.save_server(row.clone()).await?;
        inner.event(&row.id, "Stopping", "deleted".into()).await;
        if let Some(pid) = row.pid {
            stop_process(pid, row.pid_start, inner.opts.stop_grace).await;
        }
        inner.store.delete_server(&row.id).await?;
        inner.forget(&key, &row.id);
        unlink_mounts(&inner.server_dir(owner, name).join("work"), &row.mounts);
        let runtime = inner.server_dir(owner, name).join("runtime");
        if let Err(e) = std::fs::remove_dir_all(&runtime)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, dir = %runtime.display(), "could not remove a server's runtime directory");
        }
        Ok(Some(view(&row)))
    }

    fn get(&self, owner: &str, name: &str) -> Option<Server> {
        self.inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| view(&e.row))
    }

    fn list(&self, owner: Option<&str>) -> Vec<Server> {
        let mut out: Vec<Server> = self
            .inner
            .lock()
            .values()
            .filter(|e| owner.is_none_or(|o| e.row.owner == o))
            .map(|e| view(&e.row))
            .collect();
        out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        out
    }

    async fn logs(&self, owner: &str, name: &str, tail: usize) -> Result<String> {
        let token = self
            .inner
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| e.row.token.clone())
            .ok_or_else(|| not_found(owner, name))?;
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
        let (token, id) = self
            .inner
            .lock()
            .get(&key)
            .map(|e| (e.row.token.clone(), e.row.id.clone()))
            .ok_or_else(|| not_found(owner, name))?;
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
            .lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(|e| e.row.id.clone())
            .ok_or_else(|| not_found(owner, name))?;
        self.inner.store.server_events(&id).await
    }

    fn touch(&self, owner: &str, name: &str, at_ms: u64) {
        let save = {
            let mut servers = self.inner.lock();
            let Some(e) = servers.get_mut(&(owner.to_owned(), name.to_owned())) else {
                return;
            };
            e.row.last_activity_ms = e.row.last_activity_ms.max(at_ms);
            if e.row.last_activity_ms >= e.saved_activity_ms + ACTIVITY_SAVE_MS {
                e.saved_activity_ms = e.row.last_activity_ms;
                Some((e.row.id.clone(), e.row.last_activity_ms))
            } else {
                None
            }
        };
        if let Some(seen) = save {
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
        let row = {
            let mut servers = self.inner.lock();
            let Some(e) = servers.get_mut(&(owner.to_owned(), name.to_owned())) else {
                return Ok(None);
            };
            e.row.cull_exempt = exempt;
            e.row.clone()
        };
        self.inner.store.save_server(row.clone()).await?;
        Ok(Some(view(&row)))
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let unsaved: Vec<(String, u64)> = self
            .inner
            .lock()
            .values_mut()
            .filter(|e| e.row.last_activity_ms > e.saved_activity_ms)
            .map(|e| {
                e.saved_activity_ms = e.row.last_activity_ms;
                (e.row.id.clone(), e.row.last_activity_ms)
            })
            .collect();
        if !unsaved.is_empty()
            && let Err(e) = self.inner.store.touch_servers(unsaved).await
        {
            tracing::warn!(error = %e, "could not save server activity at shutdown");
        }
    }
}

fn not_found(owner: &str, name: &str) -> Error {
    Error::NotFound(format!("no server {owner}/{name}"))
}

/// Where a mount appears in the server's working directory (its home): the mount path
/// relative to `/home/jovyan`. `None` for a path the API should have refused.
fn mount_link(work: &Path, mount_path: &str) -> Option<PathBuf> {
    let rel = mount_path
        .strip_prefix(crate::storage::HOME)?
        .strip_prefix('/')?;
    let rel = Path::new(rel);
    let normal = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    (normal && rel.components().next().is_some()).then(|| work.join(rel))
}

/// Makes each mount a symlink in the server's home (`/home/jovyan/work` → `work/`),
/// replacing links left by an earlier server of the same name. Something real in the
/// way is a conflict: the user's files are never moved or removed. Read-only is not
/// enforced here: local servers run as the aggregator's Unix user.
fn link_mounts(work: &Path, mounts: &[super::Mount]) -> Result<()> {
    for m in mounts {
        let (super::MountSource::Volume { local_path, .. }
        | super::MountSource::Share { local_path, .. }) = &m.source;
        let target = local_path.as_ref().ok_or_else(|| {
            Error::Unavailable(format!(
                "{} cannot be mounted on this host (no local path)",
                m.mount_path
            ))
        })?;
        let link = mount_link(work, &m.mount_path)
            .ok_or_else(|| Error::BadRequest(format!("bad mount path {:?}", m.mount_path)))?;
        let io = |source| Error::Io {
            context: format!("linking {}", link.display()),
            source,
        };
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        match std::fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(&link).map_err(io)?,
            Ok(_) => {
                return Err(Error::Conflict(format!(
                    "{} already exists in this server's home; move it away or mount elsewhere",
                    m.mount_path
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::os::unix::fs::symlink(target, &link).map_err(io)?;
    }
    Ok(())
}

/// Removes the links `link_mounts` made (only links: never files a user put there).
fn unlink_mounts(work: &Path, mounts: &[super::Mount]) {
    for m in mounts {
        let Some(link) = mount_link(work, &m.mount_path) else {
            continue;
        };
        if std::fs::symlink_metadata(&link).is_ok_and(|meta| meta.file_type().is_symlink())
            && let Err(e) = std::fs::remove_file(&link)
        {
            tracing::warn!(error = %e, link = %link.display(), "could not remove a mount link");
        }
    }
}

/// The API-facing view of a row; the proxy's upstream only while running.
fn view(row: &ServerRow) -> Server {
    let upstream = match (row.status, row.port) {
        (ServerStatus::Running, Some(port)) => Some(Upstream::new(
            &row.owner,
            &row.name,
            &row.launch,
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            &row.token,
        )),
        _ => None,
    };
    Server {
        id: row.id.clone(),
        owner: row.owner.clone(),
        name: row.name.clone(),
        status: row.status,
        reason: row.reason.clone(),
        node: row.node.clone(),
        devices: row.devices.clone(),
        cpu_millis: row.cpu_millis,
        memory_bytes: row.memory_bytes,
        image: row.image.clone(),
        launch: row.launch.clone(),
        created_at_ms: row.created_at_ms,
        ready_at_ms: row.ready_at_ms,
        last_activity_ms: row.last_activity_ms,
        cull_exempt: row.cull_exempt,
        pid: row.pid,
        upstream,
        mounts: row.mounts.clone(),
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
                .lock()
                .get(&self.key)
                .filter(|e| e.row.id == self.id)
                .is_some_and(|e| {
                    matches!(e.row.status, ServerStatus::Pending | ServerStatus::Running)
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

/// The program to run and whether it is JupyterLab (which decides the readiness probe
/// and the arguments kcloud adds).
struct Program {
    argv: Vec<String>,
    jupyter: bool,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.servers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn server_dir(&self, owner: &str, name: &str) -> PathBuf {
        self.opts.data_dir.join("servers").join(owner).join(name)
    }

    /// Removes the entry if it is still this incarnation.
    fn forget(&self, key: &Key, id: &str) {
        let mut servers = self.lock();
        if servers.get(key).is_some_and(|e| e.row.id == id) {
            servers.remove(key);
            drop(servers);
            self.changed.notify();
        }
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

    /// Applies `f` to the entry if it is still incarnation `id`; returns the updated
    /// row when `f` changed something.
    fn update(
        &self,
        key: &Key,
        id: &str,
        f: impl FnOnce(&mut ServerRow) -> bool,
    ) -> Option<ServerRow> {
        let mut servers = self.lock();
        let e = servers.get_mut(key).filter(|e| e.row.id == id)?;
        let changed = f(&mut e.row).then(|| e.row.clone());
        drop(servers);
        if changed.is_some() {
            self.changed.notify();
        }
        changed
    }

    fn program(&self, spec: &ServerSpec) -> Result<Program> {
        let path = std::env::var_os("PATH");
        if let Some(command) = &spec.launch.command {
            let first = command
                .first()
                .ok_or_else(|| Error::BadRequest("command: must not be empty".into()))?;
            let found = find_program(first, path.as_deref()).ok_or_else(|| {
                Error::BadRequest(format!(
                    "command: {first:?} is not an executable on this host's PATH"
                ))
            })?;
            let mut argv = vec![found.to_string_lossy().into_owned()];
            argv.extend(command[1..].iter().cloned());
            return Ok(Program {
                argv,
                jupyter: false,
            });
        }
        const HINT: &str = "install it with `pip install jupyterlab`";
        let argv = match &self.opts.jupyter {
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
        Ok(Program {
            argv,
            jupyter: true,
        })
    }

    /// Makes the directories and the record, then starts the process. On error the
    /// caller removes the record.
    async fn start(&self, row: &mut ServerRow, program: Program) -> Result<tokio::process::Child> {
        let dir = self.server_dir(&row.owner, &row.name);
        let work = dir.join("work");
        let runtime = dir.join("runtime");
        crate::auth::create_private_dir(&work)?;
        crate::auth::create_private_dir(&runtime)?;
        link_mounts(&work, &row.mounts)?;
        let log_path = dir.join("server.log");
        let log = open_log(&log_path).map_err(|source| Error::Io {
            context: format!("creating {}", log_path.display()),
            source,
        })?;
        let port = free_port()?;
        row.port = Some(port);
        self.store.insert_server(row.clone()).await?;
        self.event(
            &row.id,
            "Created",
            if row.devices.is_empty() {
                "no devices".into()
            } else {
                format!(
                    "devices {} on {}",
                    row.devices.join(", "),
                    row.node.as_deref().unwrap_or("?")
                )
            },
        )
        .await;

        let base = base_url(&row.owner, &row.name);
        let fill = |s: &str| {
            s.replace("{port}", &port.to_string())
                .replace("{base_url}", &base)
                .replace("{ip}", "127.0.0.1")
        };
        let mut argv: Vec<String> = program.argv.iter().map(|a| fill(a)).collect();
        if program.jupyter {
            argv.extend([
                "--no-browser".to_owned(),
                "--ServerApp.ip=127.0.0.1".to_owned(),
                format!("--ServerApp.port={port}"),
                "--ServerApp.port_retries=0".to_owned(),
                format!("--ServerApp.base_url={base}"),
                // The proxy keeps the browser's Host header (so that JupyterLab's own
                // origin checks see the real origin); the token still guards access.
                "--ServerApp.allow_remote_access=True".to_owned(),
            ]);
            if rustix::process::geteuid().is_root() {
                // Containers and CI run as root; JupyterLab refuses that unless told.
                argv.push("--ServerApp.allow_root=True".to_owned());
            }
        }
        argv.extend(row.launch.args.iter().map(|a| fill(a)));

        let config = dir.join("config");
        if program.jupyter {
            write_jupyter_config(&config)?;
        }

        let devices = row.devices.join(",");
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(&work)
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| passes(k)))
            .envs(&row.launch.env)
            .env("CUDA_VISIBLE_DEVICES", &devices)
            .env(
                "NVIDIA_VISIBLE_DEVICES",
                if devices.is_empty() { "none" } else { &devices },
            )
            .env("JUPYTER_RUNTIME_DIR", &runtime)
            .env("JUPYTER_CONFIG_PATH", &config)
            .env("KCLOUD_USER", &row.owner)
            .env("KCLOUD_SERVER", &row.name)
            // Lets a restart find the process even if its pid was never recorded.
            .env(SERVER_ID_ENV, &row.id)
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
        if row.launch.run_profile().is_jupyter() {
            // Only an IDE that checks the token gets it; the others run behind the
            // proxy's auth and have no use for a secret.
            cmd.env("JUPYTER_TOKEN", &row.token);
        }
        let child = cmd.spawn().map_err(|source| Error::Io {
            context: format!("starting {}", argv[0]),
            source,
        })?;
        let pid = child
            .id()
            .ok_or_else(|| Error::Internal("started process has no pid".into()))?;
        row.pid = Some(pid);
        row.pid_start = proc_stat(pid).map(|s| s.start);
        self.store.save_server(row.clone()).await?;
        self.event(
            &row.id,
            "Started",
            format!("process {pid} listening on loopback port {port}"),
        )
        .await;
        tracing::info!(owner = %row.owner, server = %row.name, pid, port, "server started");
        Ok(child)
    }

    /// Whether the server answers its profile's readiness path with a 2xx (with no
    /// readiness path: anything but a 5xx at its root).
    async fn probe(&self, row: &ServerRow) -> bool {
        let Some(port) = row.port else {
            return false;
        };
        let profile = row.launch.run_profile();
        let path = profile.probe_path(&base_url(&row.owner, &row.name));
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
            if r.status != ServerStatus::Pending {
                return false;
            }
            r.status = ServerStatus::Running;
            r.reason = None;
            r.ready_at_ms.get_or_insert(now);
            r.last_activity_ms = r.last_activity_ms.max(now);
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
        tracing::info!(owner = %row.owner, server = %row.name, ms, "server running");
    }

    /// Marks a pending or running server failed and releases its devices.
    async fn fail(&self, key: &Key, id: &str, reason: String) {
        let Some(row) = self.update(key, id, |r| {
            if !matches!(r.status, ServerStatus::Pending | ServerStatus::Running) {
                return false;
            }
            r.status = ServerStatus::Failed;
            r.reason = Some(reason.clone());
            true
        }) else {
            return;
        };
        let holder = crate::ledger::Holder {
            user: row.owner.clone(),
            server: row.name.clone(),
        };
        let released = self.ledger.release(&holder);
        tracing::warn!(owner = %row.owner, server = %row.name, %reason, released = released.len(), "server failed");
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
        .lock()
        .get(&key)
        .filter(|e| e.row.id == id)
        .map(|e| e.row.clone())
    else {
        return;
    };
    let (Some(pid), pid_start) = (row.pid, row.pid_start) else {
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
        let current = inner
            .lock()
            .get(&key)
            .is_some_and(|e| e.row.id == id && e.row.status != ServerStatus::Stopping);
        if !current {
            return;
        }
        let exited = match exited {
            Some(status) => Some(status),
            None if child.is_none() && !alive(pid, pid_start) => Some(None),
            None => None,
        };
        if let Some(status) = exited {
            let mut reason = match status.map(describe_exit) {
                Some(s) => format!("process {s}"),
                None => "process ended".to_owned(),
            };
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
                // Failed first, so that this watch's own kill is not reported as a crash.
                inner
                    .fail(
                        &key,
                        &id,
                        format!("did not answer within {secs} s of its start; stopped"),
                    )
                    .await;
                stop_process(pid, pid_start, inner.opts.stop_grace).await;
                if let Some(c) = child.as_mut() {
                    let _ = c.wait().await;
                }
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

fn describe_exit(status: ExitStatus) -> String {
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
async fn stop_process(pid: u32, start: Option<u64>, grace: Duration) {
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
const SERVER_ID_ENV: &str = "KCLOUD_SERVER_ID";

/// A live process carrying [`SERVER_ID_ENV`]: a server's process or a descendant.
#[derive(Debug, Clone, Copy)]
struct Stray {
    pid: u32,
    start: u64,
    /// Leads its own process group (the server's process, or a kernel in its session).
    leader: bool,
}

/// Live processes carrying [`SERVER_ID_ENV`], by server id.
fn tagged_processes() -> HashMap<String, Vec<Stray>> {
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
async fn stop_strays(strays: &[Stray], grace: Duration) {
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
struct ProcStat {
    state: u8,
    ppid: u32,
    /// Start time in clock ticks after boot.
    start: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
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
fn alive(pid: u32, start: Option<u64>) -> bool {
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

/// JupyterLab writes its server token into the `/lab` page for the browser to send
/// back; behind the proxy the browser must never see it (the proxy adds it), so a
/// page-config hook blanks it. `.update` merges with the user's own settings.
const JUPYTER_CONFIG: &str = "\
# Written by kcloud at each start. The proxy adds this server's token to every request;
# the browser never gets it.
c.ServerApp.tornado_settings.update(
    {\"page_config_hook\": lambda handler, page_config: {**page_config, \"token\": \"\"}}
)
";

fn write_jupyter_config(dir: &Path) -> Result<()> {
    crate::auth::create_private_dir(dir)?;
    let path = dir.join("jupyter_server_config.py");
    std::fs::write(&path, JUPYTER_CONFIG).map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

fn passes(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    PASS_ENV.contains(&name) || PASS_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `program` itself when it holds a `/`, else the first executable of that name on
/// `path`.
fn find_program(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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

fn new_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `max_bytes` of a file and the offset they start at; a missing file is
/// empty (a server that has not written yet).
fn read_end(path: &Path, max_bytes: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let from = f.metadata()?.len().saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(max_bytes).read_to_end(&mut buf)?;
    Ok((buf, from))
}

/// The last `n` lines of a file, reading at most `max_bytes` from its end; a missing
/// file is empty.
fn tail_lines(path: &Path, n: usize, max_bytes: u64) -> std::io::Result<String> {
    let (buf, from) = read_end(path, max_bytes)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let keep = &lines[lines.len().saturating_sub(n)..];
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// The last `n` whole lines of a log (at most [`LOG_TAIL_BYTES`] of it), and the
/// offset just after the last of them: where following goes on.
fn whole_lines_tail(path: &Path, n: usize) -> std::io::Result<(String, u64)> {
    let (buf, from) = read_end(path, LOG_TAIL_BYTES)?;
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut lines: Vec<&[u8]> = buf[..whole].split_inclusive(|&b| b == b'\n').collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let text: Vec<u8> = lines[lines.len().saturating_sub(n)..].concat();
    Ok((
        String::from_utf8_lossy(&text).into_owned(),
        from + whole as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Holder;
    use crate::provisioner::Launch;

    /// A stand-in server: answers every GET with its device variables, prints its
    /// token (which the logs must hide), and ignores nothing.
    const FAKE_SERVER: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "|" + os.environ.get("NVIDIA_VISIBLE_DEVICES", "-")
                + "|" + self.headers.get("Authorization", "")).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving under", sys.argv[2], "with token", os.environ["JUPYTER_TOKEN"], flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
        ledger: Arc<Ledger>,
        p: LocalProvisioner,
    }

    fn options(dir: &Path) -> LocalOptions {
        LocalOptions {
            stop_grace: Duration::from_millis(500),
            ..LocalOptions::new(dir)
        }
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
        let ledger = Arc::new(Ledger::new());
        ledger.rebuild(std::iter::empty());
        let p = LocalProvisioner::new(store.clone(), ledger.clone(), options(dir.path()));
        Fixture {
            dir,
            store,
            ledger,
            p,
        }
    }

    fn spec(name: &str, devices: &[&str], command: &[&str]) -> ServerSpec {
        ServerSpec {
            owner: "alice".into(),
            name: name.into(),
            node: (!devices.is_empty()).then(|| "node-1".into()),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            image: None,
            launch: Launch {
                command: Some(command.iter().map(|c| c.to_string()).collect()),
                args: vec![],
                env: [("MY_VAR".to_owned(), "mine".to_owned())].into(),
                // A stand-in for JupyterLab: checks its token, answers at its base URL.
                profile: Some(crate::profile::RunProfile {
                    name: "fake-lab".into(),
                    base_url: crate::profile::BaseUrl::Pass,
                    readiness_path: String::new(),
                    auth: crate::profile::IdeAuth::JupyterToken,
                    port: 8888,
                }),
            },
            mounts: vec![],
        }
    }

    fn fake(name: &str, devices: &[&str]) -> ServerSpec {
        spec(
            name,
            devices,
            &["python3", "-c", FAKE_SERVER, "{port}", "{base_url}"],
        )
    }

    async fn wait_for(p: &LocalProvisioner, name: &str, want: ServerStatus) -> Server {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = p.get("alice", name).expect("server exists");
            if s.status == want {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "still {:?}: {:?}",
                s.status,
                s.reason
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(upstream: &Upstream, path: &str) -> String {
        let token = upstream.token.as_deref().unwrap_or_default();
        let req = Request::get(format!("http://{}{path}", upstream.addr))
            .header(header::AUTHORIZATION, format!("token {token}"))
            .body(Body::empty())
            .unwrap();
        let resp = http_client().request(req).await.unwrap();
        let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
            .await
            .unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_server_runs_pinned_answers_and_is_deleted() {
        let f = fixture();
        let created = f.p.create(fake("lab", &["MIG-a", "MIG-b"])).await.unwrap();
        assert_eq!(created.status, ServerStatus::Pending);
        assert!(created.upstream.is_none(), "no upstream before it answers");
        let pid = created.pid.unwrap();
        let s = wait_for(&f.p, "lab", ServerStatus::Running).await;
        assert!(s.ready_at_ms.is_some());
        let up = s.upstream.clone().unwrap();
        let body = get(&up, "/user/alice/lab/").await;
        assert_eq!(
            body,
            format!(
                "MIG-a,MIG-b|MIG-a,MIG-b|token {}",
                up.token.as_deref().unwrap()
            ),
            "pinned devices and the token reach the server"
        );
        // Recorded in SQLite, token included; the logs hide the token.
        let rows = f.store.servers().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].status, rows[0].pid, rows[0].token.as_str()),
            (
                ServerStatus::Running,
                Some(pid),
                up.token.as_deref().unwrap()
            )
        );
        let logs = f.p.logs("alice", "lab", 10).await.unwrap();
        assert!(
            logs.contains("serving under /user/alice/lab/ with token <token>"),
            "{logs}"
        );
        assert!(!logs.contains(up.token.as_deref().unwrap()));
        let kinds: Vec<String> =
            f.p.events("alice", "lab")
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.kind)
                .collect();
        assert_eq!(kinds, ["Created", "Started", "Ready"]);
        // A name in use.
        let err = f.p.create(fake("lab", &[])).await.unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");

        let deleted = f.p.delete("alice", "lab").await.unwrap().unwrap();
        assert_eq!(deleted.id, s.id);
        assert!(!alive(pid, proc_stat(pid).map(|s| s.start)), "process gone");
        assert!(f.p.get("alice", "lab").is_none());
        assert!(f.store.servers().await.unwrap().is_empty());
        assert!(
            f.p.delete("alice", "lab").await.unwrap().is_none(),
            "second delete: nothing"
        );
        // The work directory stays for a server created again under that name.
        assert!(f.dir.path().join("servers/alice/lab/work").is_dir());
    }

    #[tokio::test]
    async fn a_server_that_exits_fails_with_its_reason_and_frees_its_devices() {
        let f = fixture();
        let holder = Holder {
            user: "alice".into(),
            server: "crash".into(),
        };
        f.ledger.rebuild([("MIG-a".to_owned(), holder)]);
        f.p.create(spec(
            "crash",
            &["MIG-a"],
            &["sh", "-c", "echo 'Traceback: boom'; exit 3"],
        ))
        .await
        .unwrap();
        let s = wait_for(&f.p, "crash", ServerStatus::Failed).await;
        assert_eq!(
            s.reason.as_deref(),
            Some("process exited with status 3: Traceback: boom")
        );
        assert_eq!(f.ledger.holder("MIG-a"), None, "devices released");
        let events = f.p.events("alice", "crash").await.unwrap();
        assert_eq!(events.last().unwrap().kind, "Failed");
        // Still listed (its owner reads why) until deleted.
        assert_eq!(f.p.list(Some("alice")).len(), 1);
        assert!(f.p.delete("alice", "crash").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn delete_escalates_to_sigkill_and_kills_escaped_children() {
        let f = fixture();
        // Ignores SIGTERM, and starts a child in its own session (as Jupyter kernels are).
        let script =
            "setsid sleep 600 & echo $! > child.pid; trap '' TERM; while :; do sleep 1; done";
        let s =
            f.p.create(spec("stubborn", &[], &["sh", "-c", script]))
                .await
                .unwrap();
        let pid = s.pid.unwrap();
        let child_file = f.dir.path().join("servers/alice/stubborn/work/child.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        let child: u32 = loop {
            if let Some(c) = std::fs::read_to_string(&child_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break c;
            }
            assert!(Instant::now() < deadline, "no child pid");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let child_start = proc_stat(child).unwrap().start;
        let start = proc_stat(pid).unwrap().start;
        let started = Instant::now();
        f.p.delete("alice", "stubborn").await.unwrap().unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "waited the grace period"
        );
        assert!(!alive(pid, Some(start)), "the server is gone");
        assert!(
            !alive(child, Some(child_start)),
            "the escaped child is gone too"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_failed_and_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
        let ledger = Arc::new(Ledger::new());
        ledger.rebuild(std::iter::empty());
        let p = LocalProvisioner::new(
            store,
            ledger,
            LocalOptions {
                start_timeout: Duration::from_millis(300),
                ..options(dir.path())
            },
        );
        let s = p
            .create(spec("mute", &[], &["sleep", "600"]))
            .await
            .unwrap();
        let pid = s.pid.unwrap();
        let start = proc_stat(pid).map(|s| s.start);
        let failed = wait_for(&p, "mute", ServerStatus::Failed).await;
        assert!(failed.reason.unwrap().contains("did not answer within"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid, start) {
            assert!(Instant::now() < deadline, "not stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn missing_programs_are_clear_errors_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kcloud.db")).unwrap();
        let ledger = Arc::new(Ledger::new());
        let p = LocalProvisioner::new(
            store.clone(),
            ledger,
            LocalOptions {
                jupyter: Some("/nonexistent/bin/jupyter-lab".into()),
                ..options(dir.path())
            },
        );
        let mut jupyter = fake("lab", &[]);
        jupyter.launch.command = None;
        let err = p.create(jupyter).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        assert!(msg.contains("pip install jupyterlab"), "{msg}");
        assert!(msg.contains("/nonexistent/bin/jupyter-lab"), "{msg}");
        let err = p
            .create(spec("x", &[], &["no-such-program-kcloud"]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::BadRequest(ref m) if m.contains("no-such-program-kcloud")),
            "{err:?}"
        );
        assert!(p.list(None).is_empty());
        assert!(store.servers().await.unwrap().is_empty());
        assert!(!dir.path().join("servers").exists(), "nothing made on disk");
    }

    #[tokio::test]
    async fn restart_adopts_live_servers_fails_dead_ones_and_finishes_deletes() {
        let f = fixture();
        f.p.create(fake("live", &["MIG-a"])).await.unwrap();
        let live = wait_for(&f.p, "live", ServerStatus::Running).await;
        let dead =
            f.p.create(spec("dead", &["MIG-b"], &["sleep", "600"]))
                .await
                .unwrap();
        let half =
            f.p.create(spec("half", &[], &["sleep", "600"]))
                .await
                .unwrap();
        let start_of = |pid: Option<u32>| proc_stat(pid.unwrap()).unwrap().start;
        let (dead_start, half_start) = (start_of(dead.pid), start_of(half.pid));
        f.p.shutdown().await;
        // While "the aggregator is down": one server dies, one delete was cut short, and
        // two rows name a live pid (this test's) that is not theirs.
        let dead_pid = dead.pid.unwrap();
        rustix::process::kill_process(Pid::from_raw(dead_pid as i32).unwrap(), Signal::KILL)
            .unwrap();
        let mut rows = f.store.servers().await.unwrap();
        let mut half_row = rows.iter().find(|r| r.name == "half").unwrap().clone();
        half_row.status = ServerStatus::Stopping;
        f.store.save_server(half_row).await.unwrap();
        let me = std::process::id();
        let template = rows.remove(0);
        for (name, status) in [
            ("impostor", ServerStatus::Running),
            ("impostor2", ServerStatus::Stopping),
        ] {
            f.store
                .insert_server(ServerRow {
                    id: name.into(),
                    name: name.into(),
                    status,
                    pid: Some(me),
                    pid_start: Some(1),
                    devices: vec![],
                    ..template.clone()
                })
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(dead_pid, Some(dead_start)) {
            assert!(Instant::now() < deadline, "sleep not killed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let ledger = Arc::new(Ledger::new());
        let p = LocalProvisioner::new(f.store.clone(), ledger, options(f.dir.path()));
        let servers = p.recover().await.unwrap();
        let by_name = |n: &str| servers.iter().find(|s| s.name == n).cloned();
        let adopted = by_name("live").unwrap();
        assert_eq!(adopted.status, ServerStatus::Running);
        assert_eq!(adopted.id, live.id);
        let up = adopted.upstream.clone().unwrap();
        assert!(
            get(&up, "/user/alice/live/")
                .await
                .starts_with("MIG-a|MIG-a|")
        );
        let failed = by_name("dead").unwrap();
        assert_eq!(failed.status, ServerStatus::Failed);
        assert!(
            failed
                .reason
                .unwrap()
                .contains("ended while kcloud-aggregator was not running")
        );
        assert!(by_name("half").is_none(), "interrupted delete finished");
        assert!(
            !alive(half.pid.unwrap(), Some(half_start)),
            "and its process killed"
        );
        assert_eq!(
            by_name("impostor").unwrap().status,
            ServerStatus::Failed,
            "a reused pid is not adopted"
        );
        assert!(by_name("impostor2").is_none());
        // (This test is still alive: the reused pid was not signalled.)
        let events = p.events("alice", "live").await.unwrap();
        assert_eq!(events.last().unwrap().kind, "Adopted");

        let pid = adopted.pid.unwrap();
        let start = proc_stat(pid).map(|s| s.start);
        p.delete("alice", "live").await.unwrap().unwrap();
        assert!(!alive(pid, start));
        p.shutdown().await;
    }

    /// Regression (SIGKILL fault test): killed between starting a process and recording
    /// its pid, the restart failed the row and left the process running, untracked.
    #[tokio::test]
    async fn a_start_cut_short_before_its_pid_was_recorded_is_stopped_at_restart() {
        let f = fixture();
        let s =
            f.p.create(spec("cut", &["MIG-a"], &["sleep", "600"]))
                .await
                .unwrap();
        let pid = s.pid.unwrap();
        let start = proc_stat(pid).map(|s| s.start);
        f.p.shutdown().await;
        // The row as the kill left it: pending, no pid.
        let mut row = f.store.servers().await.unwrap().remove(0);
        (row.pid, row.pid_start) = (None, None);
        f.store.save_server(row).await.unwrap();

        let p = LocalProvisioner::new(
            f.store.clone(),
            Arc::new(Ledger::new()),
            options(f.dir.path()),
        );
        let servers = p.recover().await.unwrap();
        assert_eq!(servers[0].status, ServerStatus::Failed);
        assert!(
            servers[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("while starting it"),
            "{:?}",
            servers[0].reason
        );
        assert!(!alive(pid, start), "its process is stopped");
        p.shutdown().await;
    }

    #[tokio::test]
    async fn activity_is_kept_in_memory_and_saved_in_batches() {
        let f = fixture();
        let s =
            f.p.create(spec("idle", &[], &["sleep", "600"]))
                .await
                .unwrap();
        let t0 = s.last_activity_ms;
        f.p.touch("alice", "idle", t0 + 1_000);
        assert_eq!(
            f.p.get("alice", "idle").unwrap().last_activity_ms,
            t0 + 1_000
        );
        f.p.touch("alice", "idle", t0 + 500);
        assert_eq!(
            f.p.get("alice", "idle").unwrap().last_activity_ms,
            t0 + 1_000,
            "never backwards"
        );
        f.p.touch("alice", "nobody", t0);
        f.p.shutdown().await;
        assert_eq!(
            f.store.servers().await.unwrap()[0].last_activity_ms,
            t0 + 1_000,
            "flushed at shutdown"
        );
        f.p.delete("alice", "idle").await.unwrap();
    }

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

    #[test]
    fn following_starts_after_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\npart").unwrap();
        let (text, at) = whole_lines_tail(&path, 2).unwrap();
        assert_eq!(text, "b\nc\n");
        assert_eq!(at, 6, "the unfinished line is followed, not tailed");
        assert_eq!(
            whole_lines_tail(&dir.path().join("none"), 5).unwrap(),
            (String::new(), 0)
        );
    }

    #[test]
    fn log_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert_eq!(tail_lines(&path, 5, 1024).unwrap(), "");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            tail_lines(&path, 2, 1 << 20).unwrap(),
            "line 99\nline 100\n"
        );
        assert_eq!(tail_lines(&path, 0, 1 << 20).unwrap(), "");
        // A byte cap that cuts mid-line drops the partial line.
        assert_eq!(tail_lines(&path, 100, 12).unwrap(), "line 100\n");
    }

    #[test]
    fn only_harmless_environment_is_inherited() {
        for ok in [
            "PATH",
            "HOME",
            "LC_ALL",
            "PYENV_ROOT",
            "CONDA_PREFIX",
            "LD_LIBRARY_PATH",
        ] {
            assert!(passes(OsStr::new(ok)), "{ok}");
        }
        for secret in [
            "KCLOUD_BOOTSTRAP_ADMIN_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "CUDA_VISIBLE_DEVICES",
            "JUPYTER_TOKEN",
            "RUST_LOG",
        ] {
            assert!(!passes(OsStr::new(secret)), "{secret}");
        }
    }

    #[test]
    fn programs_are_found_on_a_path() {
        let path = std::env::var_os("PATH");
        assert!(find_program("sh", path.as_deref()).is_some());
        assert!(find_program("/bin/sh", None).is_some());
        assert!(find_program("no-such-program-kcloud", path.as_deref()).is_none());
        assert!(find_program("", path.as_deref()).is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool"), "#!/bin/sh\n").unwrap();
        assert!(
            find_program("tool", Some(dir.path().as_os_str())).is_none(),
            "not executable"
        );
    }
}
