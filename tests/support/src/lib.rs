//! Test support for kcloud.
//!
//! [`fake_nvml`] builds `tests/fake-nvml/fake_nvml.c` into a stand-in for
//! `libnvidia-ml.so.1` and configures it, so that tests run the real
//! `nvml-wrapper` code path on machines without a GPU.

pub mod fake_nvml;
pub mod tools;

pub use fake_nvml::{FakeGpu, FakeMig, FakeNvml, FakeProc, FakeSpec};
pub use tools::{free_port, require_tool};
