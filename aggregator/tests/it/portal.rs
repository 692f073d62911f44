//! The portal end to end: the `kcloud-aggregator` binary with simulated GPUs and the
//! local provisioner (real JupyterLab), driven in headless Chromium by
//! `tests/browser/portal.mjs` (playwright-core). Screenshots of every step land in
//! `target/portal-screenshots/`.
//!
//! Needs `node`, `chromium`, `jupyter-lab` and `tests/browser/node_modules`
//! (`npm ci` there); `scripts/test.sh` installs them. A missing one fails the test.

use std::path::PathBuf;
use std::process::Command;

use kcloud_testkit::process::AggregatorProcess;
use kcloud_testkit::require_tool;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The binary with a simulated DGX A100 and the bootstrap admin `root`, ready.
async fn start(data: &std::path::Path, password: &str) -> AggregatorProcess {
    AggregatorProcess::new(env!("CARGO_BIN_EXE_kcloud-aggregator"), data)
        .args([
            "--simulate",
            "dgx-a100-mig",
            "--agent-heartbeat",
            "1s",
            "--stop-grace",
            "2s",
        ])
        .env("KCLOUD_BOOTSTRAP_ADMIN_USER", "root")
        .env("KCLOUD_BOOTSTRAP_ADMIN_PASSWORD", password)
        .start()
        .await
}

#[tokio::test]
async fn portal_walkthrough_in_headless_chromium() {
    let node = require_tool("node");
    let chromium = require_tool("chromium");
    require_tool("jupyter-lab");
    let browser_dir = workspace().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core missing: run `npm ci` in tests/browser (scripts/test.sh does)"
    );
    let shots = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from)
        .join("portal-screenshots");
    let _ = std::fs::remove_dir_all(&shots);

    let dir = tempfile::tempdir().expect("tempdir");
    let password = "portal-admin-password-1";
    let agg = start(&dir.path().join("data"), password).await;

    let base = agg.base();
    let shots_arg = shots.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg("portal.mjs")
            .current_dir(&browser_dir)
            .env("KCLOUD_URL", &base)
            .env("KCLOUD_ADMIN_USER", "root")
            .env("KCLOUD_ADMIN_PASSWORD", password)
            .env("CHROMIUM", chromium)
            .env("SCREENSHOTS", &shots_arg)
            .output()
            .expect("run node")
    })
    .await
    .expect("join");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{log}");
    assert!(
        run.status.success() && log.contains("PORTAL OK"),
        "browser walk failed (screenshots in {}):\n{log}",
        shots.display()
    );
    for name in ["cluster", "jupyterlab", "slice-free-again", "admin-denied"] {
        assert!(
            std::fs::read_dir(&shots)
                .expect("screenshots dir")
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(name)),
            "no screenshot of {name} in {}",
            shots.display()
        );
    }
}
