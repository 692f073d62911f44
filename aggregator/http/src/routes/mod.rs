//! The API's route groups, one module per resource.

pub(crate) mod files;
pub(crate) mod groups;
pub(crate) mod nodes;
pub(crate) mod ops;
pub(crate) mod schedule;
pub(crate) mod servers;
pub(crate) mod session;
pub(crate) mod sso;
pub(crate) mod tokens;
pub(crate) mod usage;
pub(crate) mod users;
pub(crate) mod volumes;
