//! GPU state through NVML (nvml-wrapper).

use std::collections::BTreeMap;
use std::ffi::c_uint;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kcloud_common::{ComputeProcess, Gpu, MemoryInfo, MigInstance, MigMode, NvmlStatus};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, Nvml};

use super::gpm::GpmSamples;
use super::{GpuReading, GpuSource};

/// How long to wait before trying to initialise NVML again after it failed (driver
/// not loaded yet, library missing): the agent keeps serving host metrics meanwhile.
const INIT_RETRY: Duration = Duration::from_secs(30);

/// Reads every GPU through NVML; survives a missing driver and lost GPUs.
pub struct NvmlSource {
    lib_path: Option<PathBuf>,
    nvml: Option<Nvml>,
    next_init: Instant,
    init_retry: Duration,
    /// Whether "NVML unavailable" was already logged, so a node without a driver
    /// says so once, not every interval.
    down_logged: bool,
    /// Every GPU seen since start, by UUID: one that stops answering or vanishes from
    /// the enumeration is still reported, marked lost.
    known: BTreeMap<String, Gpu>,
    /// Each MIG instance's GPM sample from the previous read.
    gpm: GpmSamples,
}

impl NvmlSource {
    pub fn new(lib_path: Option<PathBuf>) -> Self {
        Self::with_retry(lib_path, INIT_RETRY)
    }

    /// As `new`, with another delay between initialisation attempts (tests).
    pub fn with_retry(lib_path: Option<PathBuf>, init_retry: Duration) -> Self {
        Self {
            lib_path,
            nvml: None,
            next_init: Instant::now(),
            init_retry,
            down_logged: false,
            known: BTreeMap::new(),
            gpm: GpmSamples::default(),
        }
    }

    fn init(&mut self) -> Result<(), NvmlError> {
        let mut builder = Nvml::builder();
        if let Some(p) = &self.lib_path {
            builder.lib_path(p.as_os_str());
        }
        let nvml = builder.init()?;
        tracing::info!(
            driver = nvml.sys_driver_version().unwrap_or_default(),
            gpus = nvml.device_count().unwrap_or(0),
            "NVML initialised"
        );
        self.nvml = Some(nvml);
        self.down_logged = false;
        Ok(())
    }

    fn down(&mut self, error: NvmlError) -> GpuReading {
        if !self.down_logged {
            tracing::warn!(
                %error,
                retry_in = ?self.init_retry,
                "NVML unavailable: serving host metrics only"
            );
            self.down_logged = true;
        }
        if let Some(nvml) = &self.nvml {
            self.gpm.clear(nvml);
        }
        self.nvml = None;
        self.next_init = Instant::now() + self.init_retry;
        // What we knew is no longer confirmed: every known GPU is reported lost.
        let gpus = self.known.values().map(lost_copy).collect();
        GpuReading {
            nvml: NvmlStatus {
                up: false,
                error: Some(error.to_string()),
                ..NvmlStatus::default()
            },
            gpus,
            errors: vec![],
        }
    }
}

impl GpuSource for NvmlSource {
    fn read(&mut self) -> GpuReading {
        if self.nvml.is_none() {
            if Instant::now() < self.next_init {
                return self.down(NvmlError::Uninitialized);
            }
            if let Err(e) = self.init() {
                return self.down(e);
            }
        }
        let Some(nvml) = self.nvml.as_ref() else {
            return self.down(NvmlError::Uninitialized);
        };
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => return self.down(e),
        };
        let mut errors = Vec::new();
        let mut gpus = Vec::with_capacity(count as usize);
        self.gpm.begin();
        for index in 0..count {
            match read_gpu(nvml, index, &mut self.gpm, &mut errors) {
                Ok(gpu) => gpus.push(gpu),
                Err(e) => {
                    // Without a handle or UUID we cannot name the GPU; the one known
                    // at this index (if any) is reported lost below.
                    tracing::debug!(index, error = %e, "cannot read GPU");
                    if !matches!(e, NvmlError::GpuLost) {
                        errors.push("device_identity");
                    }
                }
            }
        }
        self.gpm.end(nvml);
        let status = NvmlStatus {
            up: true,
            driver_version: nvml.sys_driver_version().ok(),
            cuda_driver_version: nvml.sys_cuda_driver_version().ok(),
            error: None,
        };
        for gpu in gpus.iter().filter(|g| !g.lost) {
            self.known.insert(gpu.uuid.clone(), gpu.clone());
        }
        for (uuid, gpu) in &self.known {
            if !gpus.iter().any(|g| &g.uuid == uuid) {
                gpus.push(lost_copy(gpu));
            }
        }
        for gpu in gpus.iter().filter(|g| g.lost) {
            tracing::debug!(uuid = %gpu.uuid, index = gpu.index, "GPU lost");
        }
        gpus.sort_by_key(|g| g.index);
        GpuReading {
            nvml: status,
            gpus,
            errors,
        }
    }

    fn simulated(&self) -> bool {
        false
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        // Samples are freed through the library, so before it is unloaded.
        if let Some(nvml) = &self.nvml {
            self.gpm.clear(nvml);
        }
    }
}

/// A lost GPU keeps its identity and loses every reading.
fn lost_copy(gpu: &Gpu) -> Gpu {
    Gpu {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        model: gpu.model.clone(),
        pci_bus_id: gpu.pci_bus_id.clone(),
        minor_number: gpu.minor_number,
        lost: true,
        memory: None,
        utilization_gpu_percent: None,
        utilization_memory_percent: None,
        temperature_celsius: None,
        power_watts: None,
        energy_millijoules: None,
        sm_clock_mhz: None,
        memory_clock_mhz: None,
        mig_mode: gpu.mig_mode,
        mig_instances: vec![],
        processes: vec![],
    }
}

/// Turns NVML results into optional fields: "not supported" (or a symbol the driver
/// lacks) is an absent field, "GPU lost" marks the GPU, anything else is counted.
struct Fields<'a> {
    errors: &'a mut Vec<&'static str>,
    lost: bool,
}

impl Fields<'_> {
    fn get<T>(&mut self, call: &'static str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => None,
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(e) => {
                tracing::debug!(call, error = %e, "NVML call failed");
                self.errors.push(call);
                None
            }
        }
    }
}

fn memory(m: nvml_wrapper::struct_wrappers::device::MemoryInfo) -> MemoryInfo {
    MemoryInfo {
        total_bytes: m.total,
        used_bytes: m.used,
        free_bytes: m.free,
    }
}

fn read_gpu(
    nvml: &Nvml,
    index: u32,
    gpm: &mut GpmSamples,
    errors: &mut Vec<&'static str>,
) -> Result<Gpu, NvmlError> {
    let dev = nvml.device_by_index(index)?;
    let uuid = dev.uuid()?;
    let mut f = Fields {
        errors,
        lost: false,
    };
    let model = f.get("name", dev.name()).unwrap_or_default();
    let pci_bus_id = f
        .get("pci_info", dev.pci_info())
        .map(|p| p.bus_id)
        .unwrap_or_default();
    let util = f.get("utilization_rates", dev.utilization_rates());
    let mig_mode = f.get("mig_mode", dev.mig_mode()).map(|m| MigMode {
        current: m.current == 1,
        pending: m.pending == 1,
    });
    let mig_instances = if mig_mode.is_some_and(|m| m.current) {
        read_mig_instances(nvml, &dev, &uuid, gpm, &mut f)
    } else {
        vec![]
    };
    let processes = f
        .get("running_compute_processes", dev.running_compute_processes())
        .unwrap_or_default()
        .into_iter()
        .map(|p| ComputeProcess {
            pid: p.pid,
            used_memory_bytes: match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            },
            gpu_instance_id: p.gpu_instance_id,
            compute_instance_id: p.compute_instance_id,
        })
        .collect();
    let gpu = Gpu {
        index: f.get("index", dev.index()).unwrap_or(index),
        uuid,
        model,
        pci_bus_id,
        minor_number: f.get("minor_number", dev.minor_number()),
        lost: false,
        memory: f.get("memory_info", dev.memory_info()).map(memory),
        utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
        utilization_memory_percent: util.as_ref().map(|u| u.memory),
        temperature_celsius: f.get("temperature", dev.temperature(TemperatureSensor::Gpu)),
        power_watts: f
            .get("power_usage", dev.power_usage())
            .map(|mw| f64::from(mw) / 1000.0),
        energy_millijoules: f.get("total_energy_consumption", dev.total_energy_consumption()),
        sm_clock_mhz: f.get("clock_info", dev.clock_info(Clock::SM)),
        memory_clock_mhz: f.get("clock_info", dev.clock_info(Clock::Memory)),
        mig_mode,
        mig_instances,
        processes,
    };
    Ok(if f.lost { lost_copy(&gpu) } else { gpu })
}

fn read_mig_instances(
    nvml: &Nvml,
    parent: &Device<'_>,
    parent_uuid: &str,
    gpm: &mut GpmSamples,
    f: &mut Fields<'_>,
) -> Vec<MigInstance> {
    let slots = f
        .get("max_mig_device_count", parent.mig_device_count())
        .unwrap_or(0);
    // Drivers older than GPM lack the symbol: "not supported", like pre-Hopper GPUs.
    let gpm_ok = f.get("gpm_support", parent.gpm_support()).unwrap_or(false);
    let mut out = Vec::new();
    for index in 0..slots {
        let mig = match parent.mig_device_by_index(index) {
            Ok(m) => m,
            // Slots are sparse: an index without an instance is normal.
            Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
            Err(e) => {
                f.get::<()>("mig_device_by_index", Err(e));
                continue;
            }
        };
        let Some(uuid) = f.get("mig_uuid", mig.uuid()) else {
            continue;
        };
        let name = f.get("mig_name", mig.name()).unwrap_or_default();
        let gpu_instance_id = instance_id(nvml, &mig, InstanceId::Gpu, f);
        let gr_engine_active = match gpu_instance_id {
            Some(gi) if gpm_ok => f
                .get("gpm_mig_sample", gpm.sample(nvml, parent, parent_uuid, gi))
                .flatten(),
            _ => None,
        };
        out.push(MigInstance {
            uuid,
            parent_uuid: parent_uuid.to_string(),
            index,
            profile: kcloud_common::mig_profile_from_name(&name)
                .unwrap_or("unknown")
                .to_string(),
            gpu_instance_id,
            compute_instance_id: instance_id(nvml, &mig, InstanceId::Compute, f),
            memory: f.get("mig_memory_info", mig.memory_info()).map(memory),
            gr_engine_active,
        });
    }
    out
}

enum InstanceId {
    Gpu,
    Compute,
}

/// nvml-wrapper has no safe call for a MIG device's GPU/compute instance id; call the
/// raw binding, checking that the driver exports it (the unchecked wrapper panics).
fn instance_id(
    nvml: &Nvml,
    mig: &Device<'_>,
    which: InstanceId,
    f: &mut Fields<'_>,
) -> Option<u32> {
    let lib = nvml.lib();
    let (call, sym) = match which {
        InstanceId::Gpu => ("gpu_instance_id", lib.nvmlDeviceGetGpuInstanceId.as_ref()),
        InstanceId::Compute => (
            "compute_instance_id",
            lib.nvmlDeviceGetComputeInstanceId.as_ref(),
        ),
    };
    let sym = sym.ok()?;
    let mut id: c_uint = 0;
    // SAFETY: the handle comes from this live `Nvml`, and `id` outlives the call.
    let rc = unsafe { sym(mig.handle(), &mut id) };
    f.get(call, nvml_try(rc).map(|()| id))
}
