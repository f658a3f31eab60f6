//! Harnesses for agentvm's integration tests: test guests, their builders, and helpers to run the
//! `agentvm` binary against them.

pub mod agentvm;
pub mod api;
pub mod elf;
pub mod jailer;
pub mod nested;
pub mod probe;
pub mod prometheus;
pub mod serve;
pub mod upstream;
