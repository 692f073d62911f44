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
            // SAFETY: the handle came from `into_handle` on a sample of this same
            // `Nvml` (the map is emptied before the `Nvml` goes) and was owned only
            // by the map, from which it was just removed: wrapped, it is freed on drop.
            let prev = unsafe { GpmSample::from_handle(nvml, raw.0) };
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
        let stale: Vec<_> = self
            .prev
            .keys()
            .filter(|k| !self.seen.contains(k))
            .cloned()
            .collect();
        for k in stale {
            if let Some(raw) = self.prev.remove(&k) {
                // SAFETY: as in `sample`: ours alone, from this `Nvml`.
                drop(unsafe { GpmSample::from_handle(nvml, raw.0) });
            }
        }
    }

    /// Frees every sample; call before `nvml` goes.
    pub(super) fn clear(&mut self, nvml: &Nvml) {
        for (_, raw) in self.prev.drain() {
            // SAFETY: as in `sample`.
            drop(unsafe { GpmSample::from_handle(nvml, raw.0) });
        }
        self.seen.clear();
    }
}
