//! The NVIDIA device files one server may open, and nothing else of the driver's: for
//! a whole GPU `nvidia{minor}`; for a MIG instance its GPU's `nvidia{minor}` plus the
//! capability files of its GPU instance and compute instance
//! (`nvidia-caps/nvidia-cap{M}`, numbered by the driver's `mig-minors` table); and the
//! control files every CUDA process needs (`nvidiactl`, `nvidia-uvm`,
//! `nvidia-uvm-tools`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kcloud_core::device::DeviceAddress;
use kcloud_core::{Error, Result};

/// Control files a CUDA process opens besides its GPUs, where they exist.
const CONTROL: &[&str] = &["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"];

/// `(host file, file in the sandbox)` for each device file the server may use. A GPU
/// without a known minor number cannot be pinned and is an error; files that do not
/// exist on this host (a simulated GPU set) are left out.
pub(crate) fn device_files(
    root: &Path,
    mig_minors: &Path,
    devices: &[DeviceAddress],
) -> Result<Vec<(PathBuf, PathBuf)>> {
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = CONTROL.iter().map(|s| (*s).to_owned()).collect();
    let caps = if devices.iter().any(|d| d.mig.is_some()) {
        std::fs::read_to_string(mig_minors)
            .map(|t| parse_mig_minors(&t))
            .unwrap_or_default()
    } else {
        HashMap::new()
    };
    for d in devices {
        let minor = d.minor.ok_or_else(|| {
            Error::Unavailable(format!(
                "device {}: its agent did not report the GPU's minor number, so the \
                 sandbox cannot give the server exactly this device",
                d.uuid
            ))
        })?;
        names.push(format!("nvidia{minor}"));
        if let Some((gi, ci)) = d.mig {
            for cap in [
                format!("gpu{minor}/gi{gi}/access"),
                format!("gpu{minor}/gi{gi}/ci{ci}/access"),
            ] {
                if let Some(m) = caps.get(&cap) {
                    names.push(format!("nvidia-caps/nvidia-cap{m}"));
                }
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .map(|n| (root.join(&n), Path::new("/dev").join(&n)))
        .filter(|(host, _)| host.exists())
        .collect())
}

/// `/proc/driver/nvidia-caps/mig-minors`: lines `gpu0/gi1/ci0/access 12`.
fn parse_mig_minors(text: &str) -> HashMap<String, u32> {
    text.lines()
        .filter_map(|l| {
            let (name, minor) = l.trim().rsplit_once(' ')?;
            Some((name.trim().to_owned(), minor.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(uuid: &str, minor: Option<u32>, mig: Option<(u32, u32)>) -> DeviceAddress {
        DeviceAddress {
            uuid: uuid.into(),
            minor,
            mig,
        }
    }

    #[test]
    fn exactly_the_servers_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dev");
        std::fs::create_dir_all(root.join("nvidia-caps")).unwrap();
        for f in [
            "nvidiactl",
            "nvidia-uvm",
            "nvidia0",
            "nvidia1",
            "nvidia2",
            "nvidia-caps/nvidia-cap21",
            "nvidia-caps/nvidia-cap22",
            "nvidia-caps/nvidia-cap30",
        ] {
            std::fs::write(root.join(f), "").unwrap();
        }
        let minors = dir.path().join("mig-minors");
        std::fs::write(
            &minors,
            "config 1\nmonitor 2\ngpu1/gi1/access 21\ngpu1/gi1/ci0/access 22\n\
             gpu1/gi2/access 30\ngpu1/gi2/ci0/access 31\n",
        )
        .unwrap();
        let sandbox = |files: Vec<(PathBuf, PathBuf)>| -> Vec<String> {
            files
                .into_iter()
                .map(|(_, s)| s.display().to_string())
                .collect()
        };

        assert!(device_files(&root, &minors, &[]).unwrap().is_empty());
        let whole = device_files(&root, &minors, &[addr("GPU-a", Some(2), None)]).unwrap();
        assert_eq!(
            sandbox(whole.clone()),
            ["/dev/nvidia-uvm", "/dev/nvidia2", "/dev/nvidiactl"]
        );
        assert_eq!(whole[1].0, root.join("nvidia2"));
        let mig = device_files(&root, &minors, &[addr("MIG-b", Some(1), Some((1, 0)))]).unwrap();
        assert_eq!(
            sandbox(mig),
            [
                "/dev/nvidia-caps/nvidia-cap21",
                "/dev/nvidia-caps/nvidia-cap22",
                "/dev/nvidia-uvm",
                "/dev/nvidia1",
                "/dev/nvidiactl"
            ]
        );
        let err = device_files(&root, &minors, &[addr("GPU-x", None, None)]).unwrap_err();
        assert!(err.to_string().contains("minor number"), "{err}");
    }
}
