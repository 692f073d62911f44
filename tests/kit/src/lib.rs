//! The test kit for kcloud: what every test needs and no test should copy.
//!
//! - [`fake_nvml`] builds `tests/fake-nvml/fake_nvml.c` into a stand-in for
//!   `libnvidia-ml.so.1`, so tests run the real `nvml-wrapper` without a GPU;
//! - [`tools`] finds the real tools tests run (a missing one fails the test);
//! - [`fixtures`]: node inventories (from `kcloud-common`'s `fixtures` feature);
//! - [`process::AggregatorProcess`]: the aggregator binary as a child process;
//! - [`fake_kube::FakeKube`]: a fake Kubernetes API server over `tower_test`;
//! - [`cluster`]: a real control plane built from source, and simulated GPU nodes.
//!
//! The aggregator in-process (`TestApp`) lives in its integration tests
//! (`aggregator/tests/it/app.rs`), the only place that runs it: here it would link the
//! whole aggregator into every test that only wants a fake NVML.

pub mod cluster;
pub mod fake_kube;
pub mod fake_nvml;
pub mod oidc;
pub mod process;
pub mod tools;

pub use fake_nvml::{FakeGpu, FakeMig, FakeNvml, FakeProc, FakeSpec};
pub use kcloud_common::fixtures;
pub use tools::{free_port, free_ports, require_tool};
