//! Host state through sysinfo.

use kcloud_common::HostInfo;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::{Error, Result};

/// Keeps the sysinfo handle between reads: CPU utilization is the difference between
/// two refreshes, so the first read reports 0.
pub struct HostCollector {
    system: System,
    hostname: String,
}

impl HostCollector {
    pub fn new() -> Result<Self> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )
        .map_err(|e| Error::Host(e.to_string()))?;
        Ok(Self {
            system,
            hostname: System::host_name().unwrap_or_default(),
        })
    }

    pub fn read(&mut self) -> HostInfo {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        // Missing load or uptime (an odd /proc) is reported as 0, not a failed read.
        let load = System::load_average().unwrap_or_default();
        HostInfo {
            hostname: self.hostname.clone(),
            cpu_count: self.system.cpus().len() as u32,
            cpu_utilization_percent: f64::from(self.system.global_cpu_usage()),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            load_average: [load.one, load.five, load.fifteen],
            uptime_seconds: System::uptime().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let mut h = HostCollector::new().unwrap();
        let info = h.read();
        assert!(info.cpu_count >= 1);
        assert!(info.memory_total_bytes > info.memory_used_bytes);
        assert!(info.memory_used_bytes > 0);
        assert!(info.uptime_seconds > 0);
        assert!((0.0..=100.0).contains(&h.read().cpu_utilization_percent));
    }
}
