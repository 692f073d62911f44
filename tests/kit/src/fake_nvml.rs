//! A fake NVML library for tests.
//!
//! [`FakeNvml::new`] compiles `tests/fake-nvml/fake_nvml.c` (once per test
//! process), copies the result into a fresh temporary directory as
//! `libnvidia-ml.so.1`, and writes the configuration next to it as
//! `libnvidia-ml.so.1.conf`. Point `nvml-wrapper` at [`FakeNvml::lib_path`]:
//!
//! ```no_run
//! # use kcloud_testkit::{FakeGpu, FakeNvml, FakeSpec};
//! let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![FakeGpu::a100(0)]));
//! // nvml_wrapper::Nvml::builder().lib_path(fake.lib_path().as_os_str()).init()
//! ```
//!
//! Every `FakeNvml` is a separate file, so `dlopen` gives it a separate copy
//! of the library's state and tests can run in parallel in one process. The
//! library re-reads its configuration on every `nvmlDeviceGetCount_v2`, so
//! [`FakeNvml::update`] between collection cycles changes what the code under
//! test sees next.
//!
//! Keep the `FakeNvml` alive for as long as NVML is in use: dropping it
//! deletes the directory and with it the configuration.

use std::ffi::c_int;
use std::fmt::{self, Display, Write as _};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tempfile::{NamedTempFile, TempDir};

/// Path of the C source, relative to this crate.
const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fake-nvml/fake_nvml.c");

/// File name the library is installed under, as the real driver ships it.
const LIB_NAME: &str = "libnvidia-ml.so.1";

/// A100-SXM4-80GB: 80 GiB as NVML reports it (81920 MiB).
const A100_80GB_MEM: u64 = 80 << 30;

/// One physical GPU: a `gpu` record plus its `mig` and `proc` records.
///
/// `None` in a numeric field is written as `ns`, which makes the matching
/// NVML getter return `NVML_ERROR_NOT_SUPPORTED`. An empty `uuid`, `name` or
/// `bus_id` is left out of the file, with the same effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    /// NVML index; handles are looked up by it. Must be below 16 and unique.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// `DDDDDDDD:BB:DD.F`, as `nvmlPciInfo_t.busId`.
    pub bus_id: String,
    /// `(device id << 16) | vendor id`; reported in the PCI info.
    pub pci_device_id: u32,
    pub pci_subsys_id: u32,
    pub minor: Option<u32>,
    pub mem_total: Option<u64>,
    pub mem_used: Option<u64>,
    /// `None` means no reserved memory (0), not "unsupported".
    pub mem_reserved: Option<u64>,
    /// Utilization needs both `util_gpu` and `util_mem`.
    pub util_gpu: Option<u32>,
    pub util_mem: Option<u32>,
    /// Degrees C.
    pub temp: Option<u32>,
    pub power_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    /// Reported for both the graphics and the SM clock, in MHz.
    pub sm_clock: Option<u32>,
    pub mem_clock: Option<u32>,
    /// MIG mode needs both `mig_current` and `mig_pending`.
    pub mig_current: Option<u32>,
    pub mig_pending: Option<u32>,
    pub max_mig: Option<u32>,
    /// GPU Performance Monitoring is supported (Hopper and newer): samples of the
    /// GPU and of its GPU instances answer, and their graphics utilization is
    /// `util_gpu` and each MIG device's `gr_active`.
    pub gpm: bool,
    /// Every query through this GPU's handles (and its MIG devices') fails
    /// with `NVML_ERROR_GPU_IS_LOST`; getting the handle still works.
    pub lost: bool,
    /// At most 8, with distinct `index` values below 8.
    pub migs: Vec<FakeMig>,
    /// At most 64.
    pub procs: Vec<FakeProc>,
}

/// A MIG device of the [`FakeGpu`] that contains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMig {
    /// Position for `nvmlDeviceGetMigDeviceHandleByIndex`, below 8.
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// GPU instance id.
    pub gi: Option<u32>,
    /// Compute instance id.
    pub ci: Option<u32>,
    pub mem_total: Option<u64>,
    pub mem_used: Option<u64>,
    /// Percent of time its graphics engine is busy, as GPM measures it between two
    /// samples; `None` reads as 0 (GPM has no "unknown" per instance).
    pub gr_active: Option<u32>,
}

/// A compute process on the [`FakeGpu`] that contains it.
///
/// It is listed on the GPU's handle, and on the handle of a MIG device whose
/// `gi`/`ci` match its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeProc {
    pub pid: u32,
    /// `None` is reported as NVML's "not available" value.
    pub used_mem: Option<u64>,
    /// `None` is reported as "no instance" (0xFFFFFFFF).
    pub gi: Option<u32>,
    pub ci: Option<u32>,
}

/// Everything the fake library reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSpec {
    /// Empty makes `nvmlSystemGetDriverVersion` unsupported.
    pub driver_version: String,
    /// As `nvmlSystemGetCudaDriverVersion_v2` reports it (12040 = 12.4);
    /// `None` makes it unsupported.
    pub cuda_driver_version: Option<u32>,
    /// When set, `nvmlInit_v2`/`nvmlInitWithFlags` return this code (for
    /// example 9, `NVML_ERROR_DRIVER_NOT_LOADED`).
    pub init_error: Option<u32>,
    pub gpus: Vec<FakeGpu>,
}

impl Default for FakeSpec {
    fn default() -> Self {
        Self {
            driver_version: "550.54.15".to_owned(),
            cuda_driver_version: Some(12040),
            init_error: None,
            gpus: Vec::new(),
        }
    }
}

impl FakeSpec {
    /// The default driver with these GPUs.
    pub fn with_gpus(gpus: Vec<FakeGpu>) -> Self {
        Self {
            gpus,
            ..Self::default()
        }
    }

    /// The configuration file's text (format: `tests/fake-nvml/README.md`).
    ///
    /// # Panics
    ///
    /// If a string contains a tab or a line break, which the format cannot
    /// carry.
    pub fn render(&self) -> String {
        let mut out = String::from("# written by kcloud-testkit\n");
        if !self.driver_version.is_empty() {
            record(
                &mut out,
                "driver_version",
                &[("", field_str(&self.driver_version))],
            );
        }
        record(
            &mut out,
            "cuda_driver_version",
            &[("", opt(self.cuda_driver_version))],
        );
        if let Some(code) = self.init_error {
            record(&mut out, "init_error", &[("", code.to_string())]);
        }
        for gpu in &self.gpus {
            gpu.render(&mut out);
        }
        out
    }
}

impl FakeGpu {
    /// An idle NVIDIA A100-SXM4-80GB with MIG off, with a UUID, PCI bus id and
    /// minor number derived from `index` (the bus ids of a DGX A100).
    pub fn a100(index: u32) -> Self {
        const DGX_A100_BUSES: [u32; 8] = [0x07, 0x0F, 0x47, 0x4E, 0x87, 0x90, 0xB7, 0xBD];
        let bus = DGX_A100_BUSES
            .get(index as usize)
            .copied()
            .unwrap_or(0xC0 + index);
        Self {
            index,
            uuid: format!("GPU-00000000-0000-4000-8000-{index:012x}"),
            name: "NVIDIA A100-SXM4-80GB".to_owned(),
            bus_id: format!("00000000:{bus:02X}:00.0"),
            pci_device_id: 0x20B2_10DE,
            pci_subsys_id: 0x147F_10DE,
            minor: Some(index),
            mem_total: Some(A100_80GB_MEM),
            mem_used: Some(0),
            mem_reserved: Some(512 << 20),
            util_gpu: Some(0),
            util_mem: Some(0),
            temp: Some(33),
            power_mw: Some(61_000),
            energy_mj: Some(123_456_789),
            sm_clock: Some(1410),
            mem_clock: Some(1593),
            mig_current: Some(0),
            mig_pending: Some(0),
            max_mig: Some(7),
            gpm: false,
            lost: false,
            migs: Vec::new(),
            procs: Vec::new(),
        }
    }

    /// [`FakeGpu::a100`] with MIG mode on and one MIG device per profile (for
    /// example `"3g.40gb"`), in order: MIG index `i`, GPU instance id `i + 1`,
    /// compute instance 0, memory from the profile's `NNgb`.
    ///
    /// As on real hardware in MIG mode, whole-GPU utilization is unsupported.
    ///
    /// # Panics
    ///
    /// If a profile has no `.NNgb` part, or there are more than 8 profiles.
    pub fn a100_mig(index: u32, profiles: &[&str]) -> Self {
        assert!(profiles.len() <= 8, "at most 8 MIG devices per GPU");
        let mut gpu = Self::a100(index);
        gpu.mig_current = Some(1);
        gpu.mig_pending = Some(1);
        gpu.util_gpu = None;
        gpu.util_mem = None;
        gpu.migs = profiles
            .iter()
            .zip(0u32..)
            .map(|(profile, i)| FakeMig {
                index: i,
                uuid: format!("MIG-{index:08x}-0000-5000-8000-{i:012x}"),
                name: format!("NVIDIA A100-SXM4-80GB MIG {profile}"),
                gi: Some(i + 1),
                ci: Some(0),
                mem_total: Some(profile_memory(profile)),
                mem_used: Some(0),
                gr_active: None,
            })
            .collect();
        gpu
    }

    /// An NVIDIA H100 80GB HBM3 with MIG on and one MIG device per profile (as
    /// [`FakeGpu::a100_mig`]): Hopper, so GPM answers for it and its instances.
    pub fn h100_mig(index: u32, profiles: &[&str]) -> Self {
        let mut gpu = Self::a100_mig(index, profiles);
        gpu.name = "NVIDIA H100 80GB HBM3".to_owned();
        gpu.pci_device_id = 0x2330_10DE;
        gpu.gpm = true;
        for m in &mut gpu.migs {
            m.name = m
                .name
                .replace("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3");
        }
        gpu
    }

    fn render(&self, out: &mut String) {
        let fields = [
            ("index", self.index.to_string()),
            ("uuid", field_str(&self.uuid)),
            ("name", field_str(&self.name)),
            ("bus_id", field_str(&self.bus_id)),
            ("pci_device_id", format!("0x{:08X}", self.pci_device_id)),
            ("pci_subsys_id", format!("0x{:08X}", self.pci_subsys_id)),
            ("minor", opt(self.minor)),
            ("mem_total", opt(self.mem_total)),
            ("mem_used", opt(self.mem_used)),
            ("mem_reserved", opt(self.mem_reserved)),
            ("util_gpu", opt(self.util_gpu)),
            ("util_mem", opt(self.util_mem)),
            ("temp", opt(self.temp)),
            ("power_mw", opt(self.power_mw)),
            ("energy_mj", opt(self.energy_mj)),
            ("sm_clock", opt(self.sm_clock)),
            ("mem_clock", opt(self.mem_clock)),
            ("mig_current", opt(self.mig_current)),
            ("mig_pending", opt(self.mig_pending)),
            ("max_mig", opt(self.max_mig)),
            ("gpm", u8::from(self.gpm).to_string()),
            ("lost", u8::from(self.lost).to_string()),
        ];
        record(out, "gpu", &fields);
        for mig in &self.migs {
            record(
                out,
                "mig",
                &[
                    ("parent", self.index.to_string()),
                    ("index", mig.index.to_string()),
                    ("uuid", field_str(&mig.uuid)),
                    ("name", field_str(&mig.name)),
                    ("gi", opt(mig.gi)),
                    ("ci", opt(mig.ci)),
                    ("mem_total", opt(mig.mem_total)),
                    ("mem_used", opt(mig.mem_used)),
                    ("gr_active", opt(mig.gr_active)),
                ],
            );
        }
        for proc in &self.procs {
            let mut fields = vec![
                ("gpu", self.index.to_string()),
                ("pid", proc.pid.to_string()),
                ("used_mem", opt(proc.used_mem)),
            ];
            // Absent, not "ns": the fake reports a missing instance id as
            // NVML's "no instance" rather than as unsupported.
            fields.extend(proc.gi.map(|gi| ("gi", gi.to_string())));
            fields.extend(proc.ci.map(|ci| ("ci", ci.to_string())));
            record(out, "proc", &fields);
        }
    }
}

/// Memory of a MIG profile such as `3g.40gb` or `1g.10gb+me`, in bytes.
fn profile_memory(profile: &str) -> u64 {
    profile
        .split_once('.')
        .and_then(|(_, rest)| rest.split_once("gb"))
        .and_then(|(gib, _)| gib.parse::<u64>().ok())
        .map(|gib| gib << 30)
        .unwrap_or_else(|| panic!("MIG profile {profile:?} has no .NNgb part"))
}

fn opt<T: Display>(value: Option<T>) -> String {
    value.map_or_else(|| "ns".to_owned(), |v| v.to_string())
}

fn field_str(value: &str) -> String {
    assert!(
        !value.contains(['\t', '\n', '\r']),
        "fake NVML strings cannot contain tabs or line breaks: {value:?}"
    );
    value.to_owned()
}

/// Appends one record; an empty key writes a bare value, and an empty string
/// value leaves the field out.
fn record(out: &mut String, kind: &str, fields: &[(&str, String)]) {
    out.push_str(kind);
    for (key, value) in fields {
        match (key.is_empty(), value.is_empty()) {
            (_, true) => {}
            (true, false) => write!(out, "\t{value}").unwrap(),
            (false, false) => write!(out, "\t{key}={value}").unwrap(),
        }
    }
    out.push('\n');
}

/// A configured copy of the fake library in its own temporary directory.
pub struct FakeNvml {
    dir: TempDir,
    lib_path: PathBuf,
    config_path: PathBuf,
}

impl fmt::Debug for FakeNvml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeNvml")
            .field("lib_path", &self.lib_path)
            .finish_non_exhaustive()
    }
}

impl FakeNvml {
    /// Installs a fresh copy of the library configured with `spec`.
    ///
    /// # Panics
    ///
    /// If the C compiler (`$CC`, default `cc`) fails (with its output), or on
    /// I/O errors: this is test support.
    pub fn new(spec: &FakeSpec) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fake-nvml-")
            .tempdir()
            .expect("create temp dir for fake NVML");
        let lib_path = dir.path().join(LIB_NAME);
        let config_path = dir.path().join(format!("{LIB_NAME}.conf"));
        fs::write(&lib_path, library_bytes()).expect("install fake NVML library");
        let fake = Self {
            dir,
            lib_path,
            config_path,
        };
        fake.update(spec);
        fake
    }

    /// The library to load, e.g. with `Nvml::builder().lib_path(..)`.
    pub fn lib_path(&self) -> &Path {
        &self.lib_path
    }

    /// The configuration file the library reads (`<lib_path>.conf`). Writing
    /// it directly lets a test feed the library text `FakeSpec` cannot
    /// express, such as a malformed file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the configuration atomically; the library picks it up at the
    /// next `nvmlDeviceGetCount_v2` (or `nvmlInit`).
    pub fn update(&self, spec: &FakeSpec) {
        let mut tmp = NamedTempFile::new_in(self.dir.path()).expect("create temp config");
        tmp.write_all(spec.render().as_bytes())
            .expect("write temp config");
        tmp.persist(&self.config_path)
            .expect("rename config into place");
    }

    /// How many `nvml*` calls this library instance has answered since it was
    /// loaded, or `None` if nothing in the process has it loaded right now.
    ///
    /// Unloading resets the count, so take both readings while the code under
    /// test holds its `Nvml`.
    pub fn call_count(&self) -> Option<u64> {
        // glibc's RTLD_NOLOAD: attach to the instance already loaded (same
        // file), never load a fresh one whose count would trivially be 0.
        const RTLD_NOLOAD: c_int = 0x4;
        // SAFETY: the fake library has no initialisers or finalisers, and
        // `fake_nvml_call_count` has exactly this signature.
        unsafe {
            let lib = libloading::os::unix::Library::open(
                Some(&self.lib_path),
                libloading::os::unix::RTLD_LAZY | RTLD_NOLOAD,
            )
            .ok()?;
            let count = lib
                .get::<unsafe extern "C" fn() -> u64>(b"fake_nvml_call_count\0")
                .expect("fake NVML exports fake_nvml_call_count");
            Some(count())
        }
    }
}

/// The compiled library, built once per process.
fn library_bytes() -> &'static [u8] {
    static LIBRARY: OnceLock<Vec<u8>> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        // Built in a scratch dir and kept in memory so that no build output
        // outlives the test process.
        let dir = tempfile::Builder::new()
            .prefix("fake-nvml-build-")
            .tempdir()
            .expect("create build dir for fake NVML");
        let out = dir.path().join(LIB_NAME);
        let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
        let result = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(SOURCE)
            .arg("-ldl")
            .output()
            .unwrap_or_else(|e| panic!("run C compiler {cc:?}: {e}"));
        assert!(
            result.status.success(),
            "building fake NVML from {SOURCE} failed ({}):\n{}{}",
            result.status,
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr),
        );
        fs::read(&out).expect("read built fake NVML")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_records_with_ns_and_bare_values() {
        let mut gpu = FakeGpu::a100_mig(1, &["3g.40gb", "1g.10gb+me"]);
        gpu.temp = None;
        gpu.procs.push(FakeProc {
            pid: 42,
            used_mem: Some(1 << 20),
            gi: Some(1),
            ci: None,
        });
        let spec = FakeSpec {
            init_error: Some(9),
            ..FakeSpec::with_gpus(vec![gpu])
        };
        let text = spec.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "driver_version\t550.54.15");
        assert_eq!(lines[2], "cuda_driver_version\t12040");
        assert_eq!(lines[3], "init_error\t9");
        assert!(
            lines[4].starts_with("gpu\tindex=1\tuuid=GPU-00000000-0000-4000-8000-000000000001\t")
        );
        assert!(lines[4].contains("\tbus_id=00000000:0F:00.0\t"));
        assert!(lines[4].contains("\ttemp=ns\t"));
        assert!(lines[4].contains("\tutil_gpu=ns\t"));
        assert!(lines[4].contains("\tmig_current=1\t"));
        assert_eq!(
            lines[5],
            "mig\tparent=1\tindex=0\tuuid=MIG-00000001-0000-5000-8000-000000000000\t\
             name=NVIDIA A100-SXM4-80GB MIG 3g.40gb\tgi=1\tci=0\tmem_total=42949672960\tmem_used=0\t\
             gr_active=ns"
        );
        assert!(lines[6].contains("\tgi=2\tci=0\tmem_total=10737418240\t"));
        assert_eq!(lines[7], "proc\tgpu=1\tpid=42\tused_mem=1048576\tgi=1");
        assert_eq!(lines.len(), 8);
    }

    #[test]
    #[should_panic(expected = "no .NNgb part")]
    fn rejects_profile_without_memory() {
        FakeGpu::a100_mig(0, &["3g"]);
    }

    #[test]
    #[should_panic(expected = "cannot contain tabs")]
    fn rejects_tab_in_name() {
        let mut gpu = FakeGpu::a100(0);
        gpu.name = "a\tb".to_owned();
        FakeSpec::with_gpus(vec![gpu]).render();
    }
}
