//! The agent's file, watch, port-forward and after-restore services, as plain logic with no tie
//! to the protocol server: each takes its request's fields and reports through closures or
//! `Read`/`Write` values, so it is tested directly on the host. `server::{files, watch,
//! port_forward, after_restore}` plug them into request contexts.

pub mod after_restore;
pub mod file_ops;
pub mod file_read;
pub mod file_write;
pub mod frame_batch;
pub mod glob_filter;
pub mod inotify_tree;
pub mod port_forward;
pub mod service_error;
pub mod watch_loop;

pub use service_error::{ServiceError, StreamFailure};
