//! Shared pieces of agentvm's fuzz targets (fuzz_targets/*.rs); see README.md in this directory.

pub mod hostile_guest;
pub mod protocol_stream;
