//! Notifications to people outside the portal: an optional Slack-compatible webhook
//! (`[notifications] webhook_url`, a JSON `{"text": ...}` POST), told when a queued
//! server starts, a reservation starts, and before a server is stopped for a
//! reservation. Delivery is best effort: one try, a failure is logged, never retried
//! into a flood.

use std::time::Duration;

use serde::Serialize;

/// What is worth telling. The text is for people; `kind` and the fields let a receiver
/// route it.
#[derive(Clone, Debug, Serialize)]
pub struct Notice {
    pub text: String,
    /// `queue_started`, `reservation_started`, `server_will_stop`, `server_stopped`,
    /// `reservation_released`.
    pub kind: &'static str,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
}

/// Sends [`Notice`]s to the webhook, if one is configured.
#[derive(Clone)]
pub struct Notifier {
    url: Option<String>,
    client: reqwest::Client,
}

impl Notifier {
    pub fn new(url: Option<String>) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { url, client }
    }

    /// Posts `notice` in the background; returns at once.
    pub fn send(&self, notice: Notice) {
        tracing::info!(kind = notice.kind, user = %notice.user, text = %notice.text, "notice");
        let Some(url) = self.url.clone() else {
            return;
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            match client.post(&url).json(&notice).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(status = %r.status(), kind = notice.kind, "webhook refused a notice")
                }
                Err(e) => tracing::warn!(error = %e, kind = notice.kind, "webhook unreachable"),
            }
        });
    }
}
