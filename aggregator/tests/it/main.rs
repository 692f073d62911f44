//! The aggregator's integration tests: one binary (the aggregator links once), a module
//! per area, all on the test kit (`kcloud-testkit`) and [`app::TestApp`].

mod app;

mod api;
mod cluster;
mod events;
mod faults;
mod groups;
mod idle_gpus;
mod kube;
mod ledger;
mod origins;
mod portal;
mod process;
mod prometheus;
mod pvc;
mod queue;
mod sandbox;
mod servers;
mod sessions;
mod sso;
mod storage;
mod store_auth;
mod telemetry;
mod tokens;
mod usage;
