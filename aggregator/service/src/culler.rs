//! Idle culling: servers nobody has used for a configured time are stopped and their
//! devices freed, so that a forgotten notebook does not hold a GPU for days.
//!
//! Idle means no proxied traffic for that long and, for JupyterLab, no busy kernel and
//! no kernel activity either: a training loop that prints nothing still counts as
//! work. An admin can exempt a server (`PATCH .../servers/{server}`). Off unless
//! `[culling] idle_timeout` is set.

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, header};
use serde::Deserialize;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use kcloud_core::now_ms;
use kcloud_core::server::{Server, ServerStatus, Upstream};
use kcloud_provision::upstream::HttpClient;

use crate::servers::Servers;

/// What JupyterLab says about its kernels.
struct KernelActivity {
    busy: bool,
    /// Newest kernel activity, ms since the epoch.
    last_ms: Option<u64>,
}

/// What the culler needs: the servers and a client to ask JupyterLab about kernels.
pub struct Culler {
    pub servers: std::sync::Arc<Servers>,
    pub http: HttpClient,
}

/// Runs [`sweep`] every `every` until `shutdown`.
pub async fn run(state: Culler, idle: Duration, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sweep(&state, idle).await;
    }
}

/// Stops every running, non-exempt server idle for longer than `idle`; returns how
/// many it stopped.
pub async fn sweep(state: &Culler, idle: Duration) -> usize {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    let mut culled = 0;
    for server in state
        .servers
        .list(&kcloud_core::caller::Caller::system(), None)
        .unwrap_or_default()
    {
        if server.status != ServerStatus::Running || server.cull_exempt {
            continue;
        }
        let now = now_ms();
        if now.saturating_sub(server.last_activity_ms) < idle_ms {
            continue;
        }
        if let (Some(up), true) = (&server.upstream, server.launch.run_profile().is_jupyter())
            && let Some(k) = kernels(state, up, &server).await
        {
            let last = if k.busy { Some(now) } else { k.last_ms };
            if let Some(last) = last.filter(|l| now.saturating_sub(*l) < idle_ms) {
                // Working without traffic: count it as activity, look again later.
                state.servers.touch(&server.owner, &server.name, last);
                continue;
            }
        }
        let idle_for = now.saturating_sub(server.last_activity_ms);
        match state.servers.cull(&server, idle_for).await {
            Ok(true) => culled += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(owner = %server.owner, server = %server.name, error = %e, "could not cull an idle server");
            }
        }
    }
    culled
}

/// JupyterLab's `api/kernels` (which, unlike most of its API, does not count as
/// activity itself); `None` when it does not answer sensibly.
async fn kernels(state: &Culler, up: &Upstream, server: &Server) -> Option<KernelActivity> {
    #[derive(Deserialize)]
    struct Kernel {
        execution_state: Option<String>,
        last_activity: Option<String>,
    }
    let token = up.token.as_deref()?;
    let req = Request::get(format!("http://{}{}api/kernels", up.addr, server.url()))
        .header(header::AUTHORIZATION, format!("token {token}"))
        .body(Body::empty())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), state.http.request(req))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = axum::body::to_bytes(Body::new(resp.into_body()), 1 << 20)
        .await
        .ok()?;
    let kernels: Vec<Kernel> = serde_json::from_slice(&body).ok()?;
    Some(KernelActivity {
        busy: kernels
            .iter()
            .any(|k| k.execution_state.as_deref() == Some("busy")),
        last_ms: kernels
            .iter()
            .filter_map(|k| k.last_activity.as_deref())
            .filter_map(|t| humantime::parse_rfc3339_weak(t).ok())
            .filter_map(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .max(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn jupyter_timestamps_parse() {
        // The shape JupyterLab writes (microseconds, Z).
        let t = humantime::parse_rfc3339_weak("2026-11-26T01:23:45.123456Z").unwrap();
        let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms % 1000, 123);
    }
}
