//! Per-MIG utilization through NVML's GPU Performance Monitoring (Hopper and newer).
//!
//! NVML's classic utilization call does not answer for MIG devices; GPM does, per GPU
//! instance, as a metric computed between two samples. The collector keeps each
//! instance's sample from the previous collection and reports the graphics engine's
//! busy share over the interval between them: DCGM's `DCGM_FI_PROF_GR_ENGINE_ACTIVE`.
//! The first collection after start (or after the layout changed) has no previous
//! sample and reports nothing, as does a GPU without GPM: absent, never 0.

use std::collections::HashMap;

use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, GpmSample, Nvml};
use nvml_wrapper_sys::bindings::nvmlGpmSample_t;

/// A sample handle kept between collections. `GpmSample` borrows the `Nvml` it came
/// from, which the collector owns next to it; so the handle is kept raw and wrapped
/// again (by the same `Nvml`) to use or free it.
struct Raw(nvmlGpmSample_t);

// SAFETY: a sample is plain data owned by the driver; the collector uses it from one
// thread at a time (nvml-wrapper's `GpmSample` is `Send` for the same reason).
unsafe impl Send for Raw {}

impl Raw {
    /// The sample again, owned: freed when it drops.
    fn into_sample(self, nvml: &Nvml) -> GpmSample<'_> {
        // SAFETY: every `Raw` comes from `into_handle` on a sample of the collector's
        // one `Nvml` (the map is emptied before that `Nvml` goes) and is owned only by
        // the map it was just taken out of: wrapping it hands it back exactly once.
        unsafe { GpmSample::from_handle(nvml, self.0) }
    }
}

/// The previous sample of every GPU instance, by (parent GPU UUID, GPU instance id).
#[derive(Default)]
pub(super) struct GpmSamples {
    prev: HashMap<(String, u32), Raw>,
    /// Keys sampled in the current collection; the rest are freed at its end.
    seen: Vec<(String, u32)>,
}

impl GpmSamples {
    /// Samples GPU instance `gi` of `parent` and returns its graphics engine's busy
    /// share (0 to 1) since the previous collection's sample, if there was one.
    pub(super) fn sample(
        &mut self,
        nvml: &Nvml,
        parent: &Device<'_>,
        parent_uuid: &str,
        gi: u32,
    ) -> Result<Option<f64>, NvmlError> {
        let key = (parent_uuid.to_owned(), gi);
        let now = parent.gpm_mig_sample(gi)?;
        self.seen.push(key.clone());
        let result = self.prev.remove(&key).map(|raw| {
            let prev = raw.into_sample(nvml);
            nvml_wrapper::gpm::gpm_metrics_get(nvml, &prev, &now, &[GpmMetricId::GraphicsUtil])
        });
        self.prev.insert(key, Raw(now.into_handle()));
        let Some(result) = result else {
            return Ok(None);
        };
        let value = result?.into_iter().next().ok_or(NvmlError::Unknown)??.value;
        if !value.is_finite() {
            return Err(NvmlError::Unknown);
        }
        Ok(Some((value / 100.0).clamp(0.0, 1.0)))
    }

    /// Starts a collection.
    pub(super) fn begin(&mut self) {
        self.seen.clear();
    }

    /// Ends a collection: frees the samples of instances that were not sampled (gone,
    /// or on a GPU that stopped answering), so that a later one starts afresh.
    pub(super) fn end(&mut self, nvml: &Nvml) {
        let seen = &self.seen;
        for (_, raw) in self.prev.extract_if(|k, _| !seen.contains(k)) {
            drop(raw.into_sample(nvml));
        }
    }

    /// Frees every sample; call before `nvml` goes.
    pub(super) fn clear(&mut self, nvml: &Nvml) {
        for (_, raw) in self.prev.drain() {
            drop(raw.into_sample(nvml));
        }
        self.seen.clear();
    }
}
