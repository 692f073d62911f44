//! Drives the real nvml-wrapper against the fake library.

use std::ffi::c_uint;
use std::fs;

use kcloud_testkit::{FakeGpu, FakeNvml, FakeProc, FakeSpec};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

fn init(fake: &FakeNvml) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(fake.lib_path().as_os_str()).init()
}

fn two_a100s() -> FakeSpec {
    let mut gpu0 = FakeGpu::a100(0);
    gpu0.mem_used = Some(1 << 30);
    gpu0.util_gpu = Some(30);
    gpu0.util_mem = Some(10);
    gpu0.temp = Some(40);
    gpu0.power_mw = Some(250_000);
    gpu0.energy_mj = Some(123_456);
    gpu0.procs = vec![
        FakeProc {
            pid: 1234,
            used_mem: Some(1 << 20),
            gi: None,
            ci: None,
        },
        FakeProc {
            pid: 5678,
            used_mem: None,
            gi: None,
            ci: None,
        },
    ];
    FakeSpec::with_gpus(vec![gpu0, FakeGpu::a100(1)])
}

/// Raw GPU/compute instance ids; nvml-wrapper has no safe wrapper for them.
fn instance_ids(
    nvml: &Nvml,
    device: &nvml_wrapper::Device<'_>,
) -> (Result<u32, u32>, Result<u32, u32>) {
    let lib = nvml.lib();
    let gi_fn = *lib
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .expect("fake exports nvmlDeviceGetGpuInstanceId");
    let ci_fn = *lib
        .nvmlDeviceGetComputeInstanceId
        .as_ref()
        .expect("fake exports nvmlDeviceGetComputeInstanceId");
    let call = |f: unsafe extern "C" fn(_, *mut c_uint) -> _| {
        let mut id: c_uint = 0;
        // SAFETY: a live handle from this Nvml and a valid out pointer.
        let rc = unsafe { f(device.handle(), &mut id) };
        if rc == 0 { Ok(id) } else { Err(rc) }
    };
    (call(gi_fn), call(ci_fn))
}

#[test]
fn whole_gpu_fields() {
    let fake = FakeNvml::new(&two_a100s());
    let nvml = init(&fake).unwrap();

    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12040);
    assert_eq!(nvml.device_count().unwrap(), 2);

    let dev = nvml.device_by_index(0).unwrap();
    assert_eq!(dev.name().unwrap(), "NVIDIA A100-SXM4-80GB");
    assert_eq!(
        dev.uuid().unwrap(),
        "GPU-00000000-0000-4000-8000-000000000000"
    );
    assert_eq!(dev.index().unwrap(), 0);
    assert_eq!(dev.minor_number().unwrap(), 0);

    let pci = dev.pci_info().unwrap();
    assert_eq!(pci.bus_id, "00000000:07:00.0");
    assert_eq!((pci.domain, pci.bus, pci.device), (0, 7, 0));
    assert_eq!(pci.pci_device_id, 0x20B2_10DE);
    assert_eq!(pci.pci_sub_system_id, Some(0x147F_10DE));

    let mem = dev.memory_info().unwrap();
    assert_eq!(mem.total, 80 << 30);
    assert_eq!(mem.reserved, 512 << 20);
    assert_eq!(mem.used, 1 << 30);
    assert_eq!(mem.free, (80 << 30) - (512 << 20) - (1 << 30));

    let util = dev.utilization_rates().unwrap();
    assert_eq!((util.gpu, util.memory), (30, 10));
    assert_eq!(dev.temperature(TemperatureSensor::Gpu).unwrap(), 40);
    assert_eq!(dev.power_usage().unwrap(), 250_000);
    assert_eq!(dev.total_energy_consumption().unwrap(), 123_456);
    assert_eq!(dev.clock_info(Clock::Graphics).unwrap(), 1410);
    assert_eq!(dev.clock_info(Clock::SM).unwrap(), 1410);
    assert_eq!(dev.clock_info(Clock::Memory).unwrap(), 1593);
    assert!(matches!(
        dev.clock_info(Clock::Video),
        Err(NvmlError::NotSupported)
    ));

    let procs = dev.running_compute_processes().unwrap();
    assert_eq!(
        procs,
        vec![
            ProcessInfo {
                pid: 1234,
                used_gpu_memory: UsedGpuMemory::Used(1 << 20),
                gpu_instance_id: None,
                compute_instance_id: None,
            },
            ProcessInfo {
                pid: 5678,
                used_gpu_memory: UsedGpuMemory::Unavailable,
                gpu_instance_id: None,
                compute_instance_id: None,
            },
        ]
    );
    assert_eq!(dev.running_compute_processes_count().unwrap(), 2);

    let dev1 = nvml.device_by_index(1).unwrap();
    assert_eq!(dev1.index().unwrap(), 1);
    assert_eq!(dev1.pci_info().unwrap().bus_id, "00000000:0F:00.0");
    assert_eq!(dev1.running_compute_processes().unwrap(), vec![]);
    let mode = dev1.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (0, 0));
    assert!(!dev1.mig_is_mig_device_handle().unwrap());

    // Handle lookups other than by index.
    let by_uuid = nvml
        .device_by_uuid("GPU-00000000-0000-4000-8000-000000000001")
        .unwrap();
    assert_eq!(by_uuid.index().unwrap(), 1);
    let by_bus = nvml.device_by_pci_bus_id("00000000:07:00.0").unwrap();
    assert_eq!(by_bus.index().unwrap(), 0);
    assert!(matches!(
        nvml.device_by_uuid("GPU-nope"),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));

    nvml.shutdown().unwrap();
}

#[test]
fn mig_devices() {
    let mut gpu = FakeGpu::a100_mig(0, &["3g.40gb", "2g.20gb", "1g.10gb"]);
    gpu.procs = vec![
        FakeProc {
            pid: 100,
            used_mem: Some(2 << 30),
            gi: Some(1),
            ci: Some(0),
        },
        FakeProc {
            pid: 200,
            used_mem: Some(1 << 30),
            gi: Some(3),
            ci: Some(0),
        },
    ];
    let fake = FakeNvml::new(&FakeSpec::with_gpus(vec![gpu]));
    let nvml = init(&fake).unwrap();
    let gpu = nvml.device_by_index(0).unwrap();

    let mode = gpu.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(gpu.mig_device_count().unwrap(), 7);
    assert!(!gpu.mig_is_mig_device_handle().unwrap());
    // Real NVML cannot sample whole-GPU utilization in MIG mode.
    assert!(matches!(
        gpu.utilization_rates(),
        Err(NvmlError::NotSupported)
    ));
    // The raw instance-id calls reject a non-MIG handle with INVALID_ARGUMENT.
    assert_eq!(instance_ids(&nvml, &gpu), (Err(2), Err(2)));
    // Processes on the whole GPU: all of them, with their instance ids.
    let pids: Vec<_> = gpu
        .running_compute_processes()
        .unwrap()
        .into_iter()
        .map(|p| (p.pid, p.gpu_instance_id, p.compute_instance_id))
        .collect();
    assert_eq!(pids, vec![(100, Some(1), Some(0)), (200, Some(3), Some(0))]);

    let expected = [
        ("3g.40gb", 40u64, 1u32),
        ("2g.20gb", 20, 2),
        ("1g.10gb", 10, 3),
    ];
    for (i, (profile, gib, gi)) in (0u32..).zip(expected) {
        let mig = gpu.mig_device_by_index(i).unwrap();
        assert!(mig.mig_is_mig_device_handle().unwrap());
        assert_eq!(
            mig.name().unwrap(),
            format!("NVIDIA A100-SXM4-80GB MIG {profile}")
        );
        assert_eq!(
            mig.uuid().unwrap(),
            format!("MIG-00000000-0000-5000-8000-{i:012x}")
        );
        let mem = mig.memory_info().unwrap();
        assert_eq!((mem.total, mem.used, mem.free), (gib << 30, 0, gib << 30));
        assert_eq!(instance_ids(&nvml, &mig), (Ok(gi), Ok(0)));
        assert!(matches!(
            mig.utilization_rates(),
            Err(NvmlError::NotSupported)
        ));
        assert!(matches!(
            mig.temperature(TemperatureSensor::Gpu),
            Err(NvmlError::NotSupported)
        ));

        let parent = mig.mig_parent_device().unwrap();
        assert_eq!(parent.uuid().unwrap(), gpu.uuid().unwrap());
        assert!(!parent.mig_is_mig_device_handle().unwrap());

        // MIG handles list only the processes in their own instance.
        let pids: Vec<_> = mig
            .running_compute_processes()
            .unwrap()
            .iter()
            .map(|p| p.pid)
            .collect();
        let want: Vec<u32> = match gi {
            1 => vec![100],
            3 => vec![200],
            _ => vec![],
        };
        assert_eq!(pids, want);
    }
    assert!(matches!(
        gpu.mig_device_by_index(3),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        gpu.mig_device_by_index(99),
        Err(NvmlError::NotFound)
    ));
    // A whole GPU has no parent.
    assert!(matches!(
        gpu.mig_parent_device(),
        Err(NvmlError::InvalidArg)
    ));
    // MIG UUIDs resolve to MIG handles.
    let by_uuid = nvml
        .device_by_uuid("MIG-00000000-0000-5000-8000-000000000001")
        .unwrap();
    assert_eq!(by_uuid.name().unwrap(), "NVIDIA A100-SXM4-80GB MIG 2g.20gb");
}

#[test]
fn ns_fields_are_not_supported() {
    let mut gpu = FakeGpu::a100(0);
    gpu.util_mem = None; // either half makes utilization unsupported
    gpu.temp = None;
    gpu.power_mw = None;
    gpu.energy_mj = None;
    gpu.sm_clock = None;
    gpu.mem_used = None;
    gpu.mig_pending = None;
    gpu.max_mig = None;
    gpu.minor = None;
    gpu.mem_reserved = None; // means 0, not unsupported
    gpu.bus_id.clear();
    let spec = FakeSpec {
        cuda_driver_version: None,
        ..FakeSpec::with_gpus(vec![gpu])
    };
    let fake = FakeNvml::new(&spec);
    let nvml = init(&fake).unwrap();
    let dev = nvml.device_by_index(0).unwrap();

    let ns = |r: Result<(), NvmlError>| matches!(r, Err(NvmlError::NotSupported));
    assert!(ns(dev.utilization_rates().map(drop)));
    assert!(ns(dev.temperature(TemperatureSensor::Gpu).map(drop)));
    assert!(ns(dev.power_usage().map(drop)));
    assert!(ns(dev.total_energy_consumption().map(drop)));
    assert!(ns(dev.clock_info(Clock::SM).map(drop)));
    assert!(ns(dev.memory_info().map(drop)));
    assert!(ns(dev.mig_mode().map(drop)));
    assert!(ns(dev.mig_device_count().map(drop)));
    assert!(ns(dev.minor_number().map(drop)));
    assert!(ns(dev.pci_info().map(drop)));
    assert!(ns(nvml.sys_cuda_driver_version().map(drop)));
    // Fields that were given still work.
    assert_eq!(dev.clock_info(Clock::Memory).unwrap(), 1593);
    assert_eq!(dev.name().unwrap(), "NVIDIA A100-SXM4-80GB");
}

#[test]
fn init_error_fails_init() {
    let spec = FakeSpec {
        init_error: Some(9),
        ..two_a100s()
    };
    let fake = FakeNvml::new(&spec);
    assert!(matches!(init(&fake), Err(NvmlError::DriverNotLoaded)));

    // Clearing it lets the next init through.
    fake.update(&two_a100s());
    assert_eq!(init(&fake).unwrap().device_count().unwrap(), 2);
}

#[test]
fn lost_gpu() {
    let mut spec = FakeSpec::with_gpus(vec![FakeGpu::a100(0), FakeGpu::a100_mig(1, &["7g.80gb"])]);
    spec.gpus[1].lost = true;
    let fake = FakeNvml::new(&spec);
    let nvml = init(&fake).unwrap();

    assert_eq!(nvml.device_count().unwrap(), 2);
    let lost = nvml.device_by_index(1).unwrap(); // the handle is still handed out
    let gone = |r: Result<(), NvmlError>| matches!(r, Err(NvmlError::GpuLost));
    assert!(gone(lost.name().map(drop)));
    assert!(gone(lost.uuid().map(drop)));
    assert!(gone(lost.memory_info().map(drop)));
    assert!(gone(lost.temperature(TemperatureSensor::Gpu).map(drop)));
    assert!(gone(lost.running_compute_processes().map(drop)));
    assert!(gone(lost.mig_mode().map(drop)));
    assert!(gone(lost.mig_device_by_index(0).map(drop)));
    // Other GPUs are unaffected.
    assert_eq!(
        nvml.device_by_index(0)
            .unwrap()
            .temperature(TemperatureSensor::Gpu)
            .unwrap(),
        33
    );

    // A MIG handle taken before the loss fails too, and recovers with it.
    spec.gpus[1].lost = false;
    fake.update(&spec);
    nvml.device_count().unwrap();
    let mig = nvml
        .device_by_index(1)
        .unwrap()
        .mig_device_by_index(0)
        .unwrap();
    assert_eq!(mig.name().unwrap(), "NVIDIA A100-SXM4-80GB MIG 7g.80gb");
    spec.gpus[1].lost = true;
    fake.update(&spec);
    nvml.device_count().unwrap();
    assert!(gone(mig.name().map(drop)));
    assert!(gone(mig.mig_parent_device().map(drop)));
}

#[test]
fn update_takes_effect_at_next_count() {
    let mut spec = two_a100s();
    let fake = FakeNvml::new(&spec);
    let nvml = init(&fake).unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);
    let gpu1 = nvml.device_by_index(1).unwrap();
    assert_eq!(gpu1.temperature(TemperatureSensor::Gpu).unwrap(), 33);

    spec.gpus[1].temp = Some(85);
    fake.update(&spec);
    // Not re-read yet: the old value stands until the next count.
    assert_eq!(gpu1.temperature(TemperatureSensor::Gpu).unwrap(), 33);
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(gpu1.temperature(TemperatureSensor::Gpu).unwrap(), 85);

    spec.gpus.truncate(1);
    fake.update(&spec);
    assert_eq!(nvml.device_count().unwrap(), 1);
    // The old handle is still a valid pointer but no longer names a device.
    assert!(matches!(gpu1.name(), Err(NvmlError::InvalidArg)));
    assert!(matches!(
        nvml.device_by_index(1),
        Err(NvmlError::InvalidArg)
    ));
    assert_eq!(nvml.device_by_index(0).unwrap().index().unwrap(), 0);

    // And it comes back.
    fake.update(&two_a100s());
    assert_eq!(nvml.device_count().unwrap(), 2);
    assert_eq!(gpu1.name().unwrap(), "NVIDIA A100-SXM4-80GB");
}

#[test]
fn bad_config_is_reported_and_keeps_old_state() {
    let fake = FakeNvml::new(&two_a100s());
    let nvml = init(&fake).unwrap();
    assert_eq!(nvml.device_count().unwrap(), 2);

    fs::write(fake.config_path(), "gpu\tindex=0\ttemperature=40\n").unwrap();
    assert!(matches!(nvml.device_count(), Err(NvmlError::Unknown)));
    // The last good configuration is still served.
    assert_eq!(nvml.device_by_index(1).unwrap().index().unwrap(), 1);

    fs::write(
        fake.config_path(),
        "# comment\n\n  \ngpu\tindex=0\tname=X Y\tmem_total=0x10\tmem_used=ns\n",
    )
    .unwrap();
    assert_eq!(nvml.device_count().unwrap(), 1);
    let dev = nvml.device_by_index(0).unwrap();
    assert_eq!(dev.name().unwrap(), "X Y");
    assert!(matches!(dev.uuid(), Err(NvmlError::NotSupported)));
    assert!(matches!(dev.memory_info(), Err(NvmlError::NotSupported)));
    // No driver_version record: the wrapper's init tolerates that.
    assert!(matches!(
        nvml.sys_driver_version(),
        Err(NvmlError::NotSupported)
    ));
    drop(nvml);

    fs::write(fake.config_path(), "mig\tparent=3\tindex=0\n").unwrap();
    assert!(matches!(init(&fake), Err(NvmlError::Unknown)));
    fs::remove_file(fake.config_path()).unwrap();
    assert!(matches!(init(&fake), Err(NvmlError::Unknown)));
}

#[test]
fn instances_are_independent() {
    let a = FakeNvml::new(&FakeSpec::with_gpus(vec![FakeGpu::a100(0)]));
    let mut three = two_a100s();
    three.gpus.push(FakeGpu::a100(2));
    three.driver_version = "535.104.05".to_owned();
    let b = FakeNvml::new(&three);

    let nvml_a = init(&a).unwrap();
    let nvml_b = init(&b).unwrap();
    assert_eq!(nvml_a.device_count().unwrap(), 1);
    assert_eq!(nvml_b.device_count().unwrap(), 3);
    assert_eq!(nvml_a.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml_b.sys_driver_version().unwrap(), "535.104.05");

    // Updating one leaves the other alone.
    b.update(&FakeSpec::default());
    assert_eq!(nvml_b.device_count().unwrap(), 0);
    assert_eq!(nvml_a.device_count().unwrap(), 1);
}

#[test]
fn call_count_tracks_calls_while_loaded() {
    let fake = FakeNvml::new(&two_a100s());
    assert_eq!(fake.call_count(), None);

    let nvml = init(&fake).unwrap();
    // init_v2 + sys_driver_version
    let before = fake.call_count().unwrap();
    assert_eq!(before, 2);
    assert_eq!(
        fake.call_count(),
        Some(before),
        "reading the count is not a call"
    );

    nvml.device_by_index(0).unwrap().name().unwrap();
    assert_eq!(fake.call_count(), Some(before + 2));

    drop(nvml);
    assert_eq!(fake.call_count(), None, "unloaded with the Nvml");
}

#[test]
fn concurrent_queries_during_updates() {
    let spec = two_a100s();
    let fake = FakeNvml::new(&spec);
    let nvml = init(&fake).unwrap();

    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..300 {
                    let n = nvml.device_count().unwrap();
                    assert!(n == 1 || n == 2);
                    // Index 1 may vanish between the count and the lookup.
                    if let Ok(dev) = nvml.device_by_index(0) {
                        dev.memory_info().unwrap();
                        dev.name().unwrap();
                    }
                }
            });
        }
        let mut small = spec.clone();
        small.gpus.truncate(1);
        for i in 0..200 {
            fake.update(if i % 2 == 0 { &small } else { &spec });
        }
    });
}
