//! The cluster shape: each server is a Pod, with a per-server Secret (its Jupyter
//! token) and, in `dra` pinning mode, a `resource.k8s.io/v1` ResourceClaim naming its
//! exact devices. Kubernetes is the truth: every object carries the owner and server in
//! labels and the devices in annotations, so that [`KubeProvisioner::recover`] rebuilds
//! the servers (and with them the ledger) from a list of labelled pods, and a watch
//! keeps their status current.
//!
//! The object builders ([`objects::server_pod`], [`objects::token_secret`],
//! [`objects::device_claim`]) are pure functions of the spec and the cluster settings,
//! so tests validate them against Kubernetes' own schemas without a cluster.
//!
//! Pods use `restartPolicy: Never`: a server whose container ended is over, and its
//! devices can safely go to someone else. A pod stuck before it ever runs (image pull
//! failure, unschedulable) is failed and deleted, for the same reason: a pod left to
//! retry could start later on devices the ledger has given away.

pub mod objects;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio_util::sync::CancellationToken;

use kcloud_core::private::random_token;
use kcloud_core::server::{Server, ServerEvent, ServerSpec, ServerStatus, Upstream};
use kcloud_core::settings::{KubernetesSettings, PinningMode};
use kcloud_core::{Error, Result, now_ms};

use crate::table::{Key, ServerTable};
use crate::{Exits, LogStream, Provisioner};
pub use objects::*;

/// How often a delete checks whether the pod is gone.
const GONE_POLL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------
// The provisioner

/// The cluster settings the provisioner works with.
#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// Where server pods, Secrets and claims live.
    pub namespace: String,
    pub settings: KubernetesSettings,
    /// The limit on each API call.
    pub timeout: Duration,
    /// The pods' termination grace period on delete.
    pub stop_grace: Duration,
}

/// Servers as pods; see the module docs.
pub struct KubeProvisioner {
    inner: Arc<Inner>,
}

struct Inner {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    claims: Api<ResourceClaim>,
    events: Api<Event>,
    opts: KubeOptions,
    exits: Arc<dyn Exits>,
    table: ServerTable<Entry>,
    shutdown: CancellationToken,
}

struct Entry {
    server: Server,
    pod: String,
    token: Arc<str>,
    /// Where the server listens in its pod.
    port: u16,
    /// Objects are still being created: status is recorded but not acted on.
    creating: bool,
    /// Our own delete is under way: what the pod does meanwhile changes nothing.
    deleting: bool,
    /// The newest pod seen while creating.
    seen: Option<Pod>,
    /// kcloud's own events, beside the pod's.
    events: Vec<ServerEvent>,
}

impl crate::table::Entry for Entry {
    fn server(&self) -> Server {
        self.server.clone()
    }

    fn id(&self) -> &str {
        &self.server.id
    }
}

/// What to do after a status change, outside the lock.
enum Action {
    None,
    /// Report the end.
    Exited(Server),
    /// Delete the pod, then report the end.
    StopAndExit(Server, String),
}

impl KubeProvisioner {
    /// `exits` is told about servers that fail by themselves.
    pub fn new(client: kube::Client, exits: Arc<dyn Exits>, opts: KubeOptions) -> Self {
        let ns = opts.namespace.as_str();
        Self {
            inner: Arc::new(Inner {
                pods: Api::namespaced(client.clone(), ns),
                secrets: Api::namespaced(client.clone(), ns),
                claims: Api::namespaced(client.clone(), ns),
                events: Api::namespaced(client, ns),
                opts,
                exits,
                table: ServerTable::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Provisioner for KubeProvisioner {
    async fn recover(&self) -> Result<Vec<Server>> {
        let inner = &self.inner;
        let list = ListParams::default().labels(SELECTOR);
        let pods = inner
            .call("listing server pods", inner.pods.list(&list))
            .await?
            .items;
        let secrets = inner
            .call("listing token Secrets", inner.secrets.list(&list))
            .await?
            .items;
        let claims = if inner.opts.settings.pinning.mode == PinningMode::Dra {
            inner
                .call("listing ResourceClaims", inner.claims.list(&list))
                .await?
                .items
        } else {
            Vec::new()
        };
        let tokens: HashMap<String, String> = secrets
            .iter()
            .filter_map(|s| {
                let token = s.data.as_ref()?.get(TOKEN_KEY)?;
                Some((
                    s.metadata.name.clone()?,
                    String::from_utf8(token.0.clone()).ok()?,
                ))
            })
            .collect();

        let mut live: HashSet<String> = HashSet::new();
        for pod in pods {
            let Some(pod_name) = pod.metadata.name.clone() else {
                continue;
            };
            let mut server = match server_from_pod(&pod) {
                Ok(s) => s,
                Err(why) => {
                    // Its devices are unknown: left running, it could use devices the
                    // ledger hands out.
                    tracing::error!(pod = %pod_name, %why, "deleting a pod labelled as a kcloud server that cannot be read");
                    inner.remove_pod(&pod_name, Duration::ZERO).await.ok();
                    continue;
                }
            };
            live.insert(pod_name.clone());
            let observed = observe(&pod);
            let port = server_port(&pod);
            let token = tokens.get(&secret_name(&pod_name)).cloned();
            let (status, reason, stop) = match (&token, observed.status) {
                (None, s) if s != ServerStatus::Failed => (
                    ServerStatus::Failed,
                    Some("its token Secret is gone".to_owned()),
                    true,
                ),
                _ => (observed.status, observed.reason, observed.stop),
            };
            if stop {
                tracing::warn!(pod = %pod_name, reason = reason.as_deref().unwrap_or(""), "stopping a server that cannot run");
                inner.remove_pod(&pod_name, Duration::ZERO).await.ok();
            }
            server.status = status;
            server.reason = reason.clone();
            if status == ServerStatus::Running {
                server.ready_at_ms = Some(now_ms());
                server.upstream = observed
                    .ip
                    .zip(token.as_ref())
                    .map(|(ip, t)| upstream(&server, SocketAddr::new(ip, port), t.as_str().into()));
            }
            let at_ms = now_ms();
            let entry = Entry {
                server: server.clone(),
                pod: pod_name,
                token: token.unwrap_or_default().into(),
                port,
                creating: false,
                deleting: false,
                seen: None,
                events: vec![ServerEvent {
                    at_ms,
                    kind: "Adopted".into(),
                    message: match &reason {
                        Some(r) => format!("found {} ({r})", status.as_str()),
                        None => format!("found {}", status.as_str()),
                    },
                }],
            };
            inner
                .table
                .insert((server.owner.clone(), server.name.clone()), entry);
        }

        // Orphans: owned by pods that are gone (the garbage collector normally takes
        // them; this covers a collector that has not yet, or objects made without).
        for s in &secrets {
            let Some(name) = s.metadata.name.as_deref() else {
                continue;
            };
            if !live.iter().any(|p| secret_name(p) == name) {
                tracing::warn!(secret = %name, "deleting an orphaned token Secret");
                inner
                    .remove(&inner.secrets, "deleting an orphaned Secret", name)
                    .await
                    .ok();
            }
        }
        for c in &claims {
            let Some(name) = c.metadata.name.as_deref() else {
                continue;
            };
            if !live.iter().any(|p| claim_name(p) == name) {
                tracing::warn!(claim = %name, "deleting an orphaned ResourceClaim");
                inner
                    .remove(&inner.claims, "deleting an orphaned ResourceClaim", name)
                    .await
                    .ok();
            }
        }

        tokio::spawn(inner.clone().watch());
        Ok(self.list(None))
    }

    async fn create(&self, spec: ServerSpec) -> Result<Server> {
        // In a task of its own: a caller that goes away (a dropped request) must not
        // leave half-made objects behind or an entry stuck in creation.
        tokio::spawn(self.inner.clone().create(spec))
            .await
            .map_err(|e| Error::Internal(format!("creating a server: {e}")))?
    }

    async fn delete(&self, owner: &str, name: &str) -> Result<Option<Server>> {
        tokio::spawn(self.inner.clone().delete(owner.to_owned(), name.to_owned()))
            .await
            .map_err(|e| Error::Internal(format!("deleting a server: {e}")))?
    }

    fn get(&self, owner: &str, name: &str) -> Option<Server> {
        self.inner.table.get(owner, name)
    }

    fn list(&self, owner: Option<&str>) -> Vec<Server> {
        self.inner.table.list(owner)
    }

    async fn logs(&self, owner: &str, name: &str, tail: usize) -> Result<String> {
        let inner = &self.inner;
        let (pod, token) = inner
            .table
            .find(owner, name, |e| (e.pod.clone(), e.token.clone()))?;
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            limit_bytes: Some(1 << 20),
            ..Default::default()
        };
        match inner
            .call("reading the server's log", inner.pods.logs(&pod, &params))
            .await
        {
            Ok(text) if token.is_empty() => Ok(text),
            Ok(text) => Ok(text.replace(&*token, "<token>")),
            // No pod any more, or its container has not started: no log (yet).
            Err(Error::NotFound(_) | Error::BadRequest(_)) => Ok(String::new()),
            Err(e) => Err(e),
        }
    }

    async fn follow_logs(&self, owner: &str, name: &str, tail: usize) -> Result<LogStream> {
        use futures_util::{AsyncBufReadExt as _, StreamExt as _};
        let inner = &self.inner;
        let (pod, token) = inner
            .table
            .find(owner, name, |e| (e.pod.clone(), e.token.clone()))?;
        let params = LogParams {
            container: Some(CONTAINER.into()),
            tail_lines: Some(i64::try_from(tail).unwrap_or(i64::MAX)),
            follow: true,
            ..Default::default()
        };
        // The API server ends the stream when the container stops.
        let reader = inner
            .call(
                "following the server's log",
                inner.pods.log_stream(&pod, &params),
            )
            .await?;
        Ok(Box::pin(reader.lines().map(move |line| {
            line.map(|l| {
                let l = if token.is_empty() {
                    l
                } else {
                    l.replace(&*token, "<token>")
                };
                format!("{l}\n")
            })
            .map_err(|source| Error::Io {
                context: "following a pod log".into(),
                source,
            })
        })))
    }

    async fn events(&self, owner: &str, name: &str) -> Result<Vec<ServerEvent>> {
        let inner = &self.inner;
        let (uid, mut events) = inner
            .table
            .find(owner, name, |e| (e.server.id.clone(), e.events.clone()))?;
        let params = ListParams::default()
            .fields(&format!("involvedObject.kind=Pod,involvedObject.uid={uid}"));
        let listed = inner
            .call("listing the server's events", inner.events.list(&params))
            .await?;
        events.extend(listed.items.into_iter().map(|e| {
            let at_ms = e
                .last_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
                .or_else(|| e.event_time.as_ref().map(|t| t.0.as_millisecond()))
                .or_else(|| {
                    e.metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0.as_millisecond())
                })
                .unwrap_or(0);
            ServerEvent {
                at_ms: u64::try_from(at_ms).unwrap_or(0),
                kind: e.reason.unwrap_or_else(|| "Event".into()),
                message: e.message.unwrap_or_default(),
            }
        }));
        events.sort_by_key(|e| e.at_ms);
        Ok(events)
    }

    fn touch(&self, owner: &str, name: &str, at_ms: u64) {
        self.inner.table.with(owner, name, |e| {
            e.server.last_activity_ms = e.server.last_activity_ms.max(at_ms);
        });
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.table.subscribe()
    }

    fn isolation(&self) -> kcloud_core::isolation::Isolation {
        kcloud_core::isolation::Isolation::pods()
    }

    async fn set_cull_exempt(
        &self,
        owner: &str,
        name: &str,
        exempt: bool,
    ) -> Result<Option<Server>> {
        let Some(pod) = self.inner.table.with(owner, name, |e| e.pod.clone()) else {
            return Ok(None);
        };
        // On the pod, where recovery reads it back.
        let value = if exempt {
            serde_json::Value::from("true")
        } else {
            serde_json::Value::Null
        };
        let patch =
            serde_json::json!({"metadata": {"annotations": {ANNOTATION_CULL_EXEMPT: value}}});
        self.inner
            .call(
                "exempting a server pod from culling",
                self.inner
                    .pods
                    .patch(&pod, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await?;
        Ok(self.inner.table.with(owner, name, |e| {
            e.server.cull_exempt = exempt;
            e.server.clone()
        }))
    }

    async fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    async fn create(self: Arc<Self>, spec: ServerSpec) -> Result<Server> {
        let inner = &self;
        for d in &spec.devices {
            check_device_id(d)?;
        }
        if spec.image.is_none() {
            return Err(Error::BadRequest(
                "image: pods need one, and the settings name no default ([images] default)".into(),
            ));
        }
        let key = (spec.owner.clone(), spec.name.clone());
        let pod_name = pod_name(&spec.owner, &spec.name);
        let profile = Profile::for_launch(&spec.owner, &spec.name, &spec.launch);
        let now = now_ms();
        let token: Arc<str> = random_token().into();
        inner.table.insert_new(
            key.clone(),
            Entry {
                server: Server::pending(pod_name.clone(), spec.clone(), now),
                pod: pod_name.clone(),
                token: token.clone(),
                port: profile.port,
                creating: true,
                deleting: false,
                seen: None,
                events: Vec::new(),
            },
        )?;
        let pod = server_pod(
            &spec,
            &inner.opts.settings,
            &inner.opts.namespace,
            &profile,
            {
                // PVC and NFS volumes of the user's mounts.
                let (volumes, mounts) = crate::volumes::pvc::pod_mounts(&spec.owner, &spec.mounts);
                Mounts { volumes, mounts }
            },
            now,
        );
        match inner.create_objects(&spec, &profile, pod, &token).await {
            Ok(uid) => {
                let (server, seen) = {
                    let mut servers = inner.table.lock();
                    let Some(e) = servers.get_mut(&key) else {
                        return Err(Error::Internal("a server vanished while created".into()));
                    };
                    e.creating = false;
                    e.server.id = uid.clone();
                    e.events.push(ServerEvent {
                        at_ms: now,
                        kind: "Created".into(),
                        message: if spec.devices.is_empty() {
                            format!("pod {pod_name}, no devices")
                        } else {
                            format!(
                                "pod {pod_name}, devices {} on {}",
                                spec.devices.join(", "),
                                spec.node.as_deref().unwrap_or("?")
                            )
                        },
                    });
                    (e.server.clone(), e.seen.take())
                };
                // What the watch saw while the objects were made counts now.
                if let Some(pod) = seen.filter(|p| p.metadata.uid.as_deref() == Some(&uid)) {
                    inner.on_pod(pod).await;
                    return Ok(inner
                        .table
                        .lock()
                        .get(&key)
                        .map_or(server, |e| e.server.clone()));
                }
                tracing::info!(owner = %spec.owner, server = %spec.name, pod = %pod_name, "server created");
                Ok(server)
            }
            Err(e) => {
                inner.table.lock().remove(&key);
                inner.table.notify();
                Err(e)
            }
        }
    }

    async fn delete(self: Arc<Self>, owner: String, name: String) -> Result<Option<Server>> {
        let inner = &self;
        let key = (owner.clone(), name.clone());
        let (pod, before) = {
            let mut servers = inner.table.lock();
            let Some(e) = servers.get_mut(&key) else {
                return Ok(None);
            };
            let before = (e.server.status, e.server.upstream.take());
            if e.server.status != ServerStatus::Failed {
                e.server.status = ServerStatus::Stopping;
            }
            e.deleting = true;
            (e.pod.clone(), before)
        };
        inner.table.notify();
        let grace = inner.opts.stop_grace;
        let stopped = async {
            inner.remove_pod(&pod, grace).await?;
            inner.wait_gone(&pod).await
        }
        .await;
        if let Err(e) = stopped {
            // Still there: it keeps its devices and its status.
            if let Some(entry) = inner.table.lock().get_mut(&key) {
                entry.deleting = false;
                if entry.server.status == ServerStatus::Stopping {
                    (entry.server.status, entry.server.upstream) = before;
                }
            }
            return Err(e);
        }
        // The pod owns these, so the garbage collector takes them too; deleting them
        // now frees a claim's devices in the scheduler's books at once.
        if let Err(e) = inner
            .remove(
                &inner.secrets,
                "deleting the token Secret",
                &secret_name(&pod),
            )
            .await
        {
            tracing::warn!(error = %e, pod = %pod, "token Secret left to the garbage collector");
        }
        if inner.opts.settings.pinning.mode == PinningMode::Dra
            && let Err(e) = inner
                .remove(
                    &inner.claims,
                    "deleting the ResourceClaim",
                    &claim_name(&pod),
                )
                .await
        {
            tracing::warn!(error = %e, pod = %pod, "ResourceClaim left to the garbage collector");
        }
        tracing::info!(%owner, server = %name, pod = %pod, "server deleted");
        let gone = inner.table.lock().remove(&key).map(|e| e.server);
        inner.table.notify();
        Ok(gone)
    }

    /// One API call, within the timeout, its error mapped to ours.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.opts.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(api_error(what, e)),
            Err(_) => Err(self.timed_out(what)),
        }
    }

    fn timed_out(&self, what: &str) -> Error {
        tracing::error!(what, timeout = ?self.opts.timeout, "the Kubernetes API did not answer");
        Error::Unavailable(format!("{what}: the Kubernetes API did not answer in time"))
    }

    /// Deletes an object; one that is not there is fine.
    async fn remove<K>(&self, api: &Api<K>, what: &str, name: &str) -> Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        if name.is_empty() {
            // An empty name would address the whole collection.
            return Err(Error::Internal(format!("{what}: no name")));
        }
        let dp = DeleteParams::background();
        match self.call(what, api.delete(name, &dp)).await {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn remove_pod(&self, name: &str, grace: Duration) -> Result<()> {
        if name.is_empty() {
            return Err(Error::Internal("deleting a pod: no name".into()));
        }
        let dp = DeleteParams {
            grace_period_seconds: Some(u32::try_from(grace.as_secs()).unwrap_or(u32::MAX)),
            propagation_policy: Some(PropagationPolicy::Background),
            ..Default::default()
        };
        match self
            .call("deleting the server's pod", self.pods.delete(name, &dp))
            .await
        {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until the pod is gone: until then its processes may still use the
    /// devices.
    async fn wait_gone(&self, name: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.opts.stop_grace + self.opts.timeout;
        loop {
            match self
                .call("checking the server's pod", self.pods.get_opt(name))
                .await?
            {
                None => return Ok(()),
                Some(_) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "the pod {name} is still terminating; try again"
                    )));
                }
                Some(_) => tokio::time::sleep(GONE_POLL).await,
            }
        }
    }

    /// Creates the pod, then its Secret and claim owned by it (so that they go with
    /// it); returns the pod's uid. On failure it deletes what it made.
    async fn create_objects(
        &self,
        spec: &ServerSpec,
        profile: &Profile,
        pod: Pod,
        token: &str,
    ) -> Result<String> {
        let pp = PostParams::default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let what = "creating the server's pod";
        let created = match tokio::time::timeout(self.opts.timeout, self.pods.create(&pp, &pod))
            .await
        {
            Ok(Ok(p)) => p,
            // Refused: nothing was made (and a pod of that name is not ours to delete).
            Ok(Err(kube::Error::Api(s))) if s.code < 500 => {
                return Err(api_error(what, kube::Error::Api(s)));
            }
            failed => {
                // A timeout or a failure on the way back: it may exist all the same.
                if let Err(e) = self.remove_pod(&name, Duration::ZERO).await {
                    tracing::error!(error = %e, pod = %name, "could not delete a pod whose creation failed");
                }
                return Err(match failed {
                    Ok(Err(e)) => api_error(what, e),
                    _ => self.timed_out(what),
                });
            }
        };
        let Some(uid) = created.metadata.uid.clone() else {
            self.rollback(&name).await;
            return Err(Error::Internal("the created pod has no uid".into()));
        };
        let owner = pod_owner(&name, &uid);
        let ns = &self.opts.namespace;
        let secret = token_secret(spec, ns, profile, &owner, token);
        let made = async {
            self.call(
                "creating the token Secret",
                self.secrets.create(&pp, &secret),
            )
            .await?;
            if let Some(claim) = device_claim(spec, &self.opts.settings, ns, profile, &owner)? {
                self.call(
                    "creating the ResourceClaim",
                    self.claims.create(&pp, &claim),
                )
                .await?;
            }
            Ok(())
        }
        .await;
        match made {
            Ok(()) => Ok(uid),
            Err(e) => {
                self.rollback(&name).await;
                Err(e)
            }
        }
    }

    /// Deletes a half-made server: the pod at once, and its Secret and claim, which
    /// the garbage collector would also take with the pod.
    async fn rollback(&self, pod: &str) {
        let mut failed = Vec::new();
        if let Err(e) = self.remove_pod(pod, Duration::ZERO).await {
            failed.push(e);
        }
        if let Err(e) = self
            .remove(
                &self.secrets,
                "deleting the token Secret",
                &secret_name(pod),
            )
            .await
        {
            failed.push(e);
        }
        if self.opts.settings.pinning.mode == PinningMode::Dra
            && let Err(e) = self
                .remove(&self.claims, "deleting the ResourceClaim", &claim_name(pod))
                .await
        {
            failed.push(e);
        }
        for e in failed {
            // Owned by the pod, or an orphan swept at the next start.
            tracing::error!(error = %e, pod = %pod, "rollback incomplete");
        }
    }

    /// Follows the server pods until shutdown. The watcher relists after a break; a
    /// pod missing from a relist went away during the break.
    async fn watch(self: Arc<Self>) {
        let config = watcher::Config::default().labels(SELECTOR);
        let stream = watcher(self.pods.clone(), config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relist: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => return,
                Some(Ok(watcher::Event::Init)) => relist = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let (Some(seen), Some(name)) = (relist.as_mut(), &pod.metadata.name) {
                        seen.insert(name.clone());
                    }
                    self.on_pod(pod).await;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let seen = relist.take().unwrap_or_default();
                    let gone: Vec<(Key, String)> = self
                        .table
                        .lock()
                        .iter()
                        .filter(|(_, e)| !e.creating && !seen.contains(&e.pod))
                        .map(|(k, e)| (k.clone(), e.server.id.clone()))
                        .collect();
                    for (key, uid) in gone {
                        self.on_gone(&key, &uid).await;
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.on_pod(pod).await,
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Ok(s) = server_from_pod(&pod) {
                        self.on_gone(&(s.owner, s.name), &s.id).await;
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "watching server pods"),
            }
        }
    }

    /// A pod changed: its server's status follows.
    async fn on_pod(&self, pod: Pod) {
        let m = &pod.metadata;
        let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).cloned();
        let (Some(owner), Some(name), Some(uid), Some(pod_name)) = (
            label(LABEL_OWNER),
            label(LABEL_SERVER),
            m.uid.clone(),
            m.name.clone(),
        ) else {
            return;
        };
        let key = (owner, name);
        let observed = observe(&pod);
        let action = {
            let mut servers = self.table.lock();
            let Some(e) = servers.get_mut(&key) else {
                return;
            };
            if pod_name != e.pod {
                return;
            }
            if e.creating {
                e.seen = Some(pod);
                return;
            }
            if e.server.id != uid || e.deleting {
                return;
            }
            apply(e, observed)
        };
        self.table.notify();
        self.act(action).await;
    }

    /// A pod went away without a delete from us.
    async fn on_gone(&self, key: &Key, uid: &str) {
        let action = {
            let mut servers = self.table.lock();
            let Some(e) = servers.get_mut(key) else {
                return;
            };
            // Stopping without our delete: someone else deleted the pod.
            if e.server.id != uid
                || e.creating
                || e.deleting
                || e.server.status == ServerStatus::Failed
            {
                return;
            }
            apply(
                e,
                Observed {
                    status: ServerStatus::Failed,
                    reason: Some("its pod was deleted outside kcloud".into()),
                    stop: false,
                    ip: None,
                },
            )
        };
        self.table.notify();
        self.act(action).await;
    }

    async fn act(&self, action: Action) {
        match action {
            Action::None => {}
            Action::Exited(server) => self.exits.exited(&server),
            Action::StopAndExit(server, pod) => {
                if let Err(e) = self.remove_pod(&pod, Duration::ZERO).await {
                    // Not reported: the pod might still start on its devices.
                    tracing::error!(error = %e, pod = %pod, "could not stop a failed server's pod; its devices stay held");
                    return;
                }
                self.exits.exited(&server);
            }
        }
    }
}

/// Applies what a pod says to its entry; returns what must follow.
fn apply(e: &mut Entry, o: Observed) -> Action {
    let s = &mut e.server;
    let now = now_ms();
    match o.status {
        // Terminal, and stays so whatever the pod does next.
        _ if s.status == ServerStatus::Failed => Action::None,
        ServerStatus::Failed => {
            s.status = ServerStatus::Failed;
            s.reason = o.reason.clone();
            s.upstream = None;
            tracing::warn!(owner = %s.owner, server = %s.name, reason = o.reason.as_deref().unwrap_or(""), "server failed");
            e.events.push(ServerEvent {
                at_ms: now,
                kind: "Failed".into(),
                message: o.reason.unwrap_or_default(),
            });
            if o.stop {
                Action::StopAndExit(s.clone(), e.pod.clone())
            } else {
                Action::Exited(s.clone())
            }
        }
        // Being deleted by someone else (our own deletes are not observed): only its
        // end moves it on, failed or gone.
        _ if s.status == ServerStatus::Stopping => Action::None,
        ServerStatus::Stopping => {
            s.status = ServerStatus::Stopping;
            s.upstream = None;
            Action::None
        }
        ServerStatus::Running => {
            if s.status != ServerStatus::Running {
                s.ready_at_ms.get_or_insert(now);
                s.last_activity_ms = s.last_activity_ms.max(now);
                e.events.push(ServerEvent {
                    at_ms: now,
                    kind: "Ready".into(),
                    message: "answering its readiness probe".into(),
                });
            }
            s.status = ServerStatus::Running;
            s.reason = None;
            s.upstream =
                o.ip.map(|ip| upstream(s, SocketAddr::new(ip, e.port), e.token.clone()));
            Action::None
        }
        // A pod never reads as queued; should it, it is still starting.
        ServerStatus::Pending | ServerStatus::Queued => {
            s.status = ServerStatus::Pending;
            s.reason = o.reason;
            s.upstream = None;
            Action::None
        }
    }
}

/// How the proxy reaches a running server's pod.
fn upstream(s: &Server, addr: SocketAddr, token: Arc<str>) -> Upstream {
    Upstream::new(&s.owner, &s.name, &s.launch, addr, &token)
}

/// Kubernetes' answers as our errors. The cluster's own messages reach clients only
/// where they describe the request (invalid, conflict); the rest is logged.
fn api_error(what: &str, e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.is_not_found() => Error::NotFound(format!("{what}: not found")),
        kube::Error::Api(s) if s.code == 409 => {
            Error::Conflict(format!("{what}: {} (try again shortly)", s.message))
        }
        kube::Error::Api(s) if s.code == 400 || s.code == 422 => {
            Error::BadRequest(format!("{what}: the cluster refused it: {}", s.message))
        }
        // RBAC says who may not do what; an admission plugin (PodSecurity, a missing
        // ServiceAccount, a policy) says what is wrong with the object.
        kube::Error::Api(s) if s.code == 403 && s.message.contains(" cannot ") => {
            tracing::error!(what, message = %s.message, "the Kubernetes API refused the aggregator (RBAC)");
            Error::Unavailable(format!(
                "{what}: the cluster does not allow it (the aggregator's RBAC)"
            ))
        }
        kube::Error::Api(s) if s.code == 403 => {
            tracing::error!(what, message = %s.message, "the cluster's admission refused a request");
            Error::Unavailable(format!(
                "{what}: the cluster's admission refused it: {}",
                s.message
            ))
        }
        _ => {
            tracing::error!(what, error = %e, "Kubernetes API call failed");
            Error::Unavailable(format!("{what}: the Kubernetes API failed"))
        }
    }
}
