//! Where the aggregator's `tracing` events and spans go: log lines (text or JSON) on
//! stderr always, and with `--otlp-endpoint` (a build with the `otel` feature) the
//! spans to an OpenTelemetry collector over OTLP/HTTP, batched. The feature is off by
//! default: the exporter's dependencies are for those who run a collector.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Config, LogFormat};

/// Keeps the exporter alive; [`Telemetry::shutdown`] sends what is still batched.
pub struct Telemetry {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the global subscriber. Fails on a bad endpoint, or an endpoint given
    /// to a build without the `otel` feature.
    pub fn init(config: &Config) -> anyhow::Result<Telemetry> {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // One JSON object per line, for log collectors (Loki, Elasticsearch).
        let (json, text) = match config.log_format {
            LogFormat::Json => (Some(tracing_subscriber::fmt::layer().json()), None),
            LogFormat::Text => (None, Some(tracing_subscriber::fmt::layer())),
        };
        let registry = tracing_subscriber::registry()
            .with(filter)
            .with(json)
            .with(text);
        #[cfg(feature = "otel")]
        {
            let provider = config
                .otlp_endpoint
                .as_deref()
                .map(otel::provider)
                .transpose()?;
            let layer = provider.as_ref().map(|p| {
                use opentelemetry::trace::TracerProvider as _;
                tracing_opentelemetry::layer().with_tracer(p.tracer("kcloud-aggregator"))
            });
            registry.with(layer).try_init()?;
            Ok(Telemetry { provider })
        }
        #[cfg(not(feature = "otel"))]
        {
            if config.otlp_endpoint.is_some() {
                anyhow::bail!(
                    "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) needs a kcloud-aggregator \
                     built with the `otel` feature (cargo build --features otel)"
                );
            }
            registry.try_init()?;
            Ok(Telemetry {})
        }
    }

    /// Sends the spans still batched (at exit).
    pub fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("kcloud: sending the last traces failed: {e}");
        }
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::KeyValue;
    use opentelemetry_otlp::{SpanExporter, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// A batching tracer provider exporting to `endpoint` (the collector's base URL;
    /// traces go to `{endpoint}/v1/traces`).
    pub fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| anyhow::anyhow!("--otlp-endpoint {endpoint:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--otlp-endpoint {endpoint:?}: must be http:// or https://");
        }
        let exporter = SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()?;
        let resource = Resource::builder()
            .with_attributes([
                KeyValue::new("service.name", "kcloud-aggregator"),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    }
}
