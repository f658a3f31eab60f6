//! `agentvm-jailer`: runs one VMM process per sandbox in a jail that cannot hurt the host, in the
//! shape of Firecracker's jailer.
//!
//! The jailer (root) validates everything first, then creates the jail directory and the sandbox's
//! cgroup, forks a child that becomes PID 1 of a new PID namespace, and supervises it:
//! - the child ([`child`]) enters new mount/IPC/UTS (and optionally net) namespaces, builds the
//!   jail root on a private tmpfs (the VMM binary and every `--mount` bind-mounted, read-only
//!   unless asked otherwise; only the device nodes asked for), pivots into it, sets rlimits, drops
//!   to the sandbox uid/gid, closes every inherited fd and execs the VMM;
//! - the parent ([`supervise`]) forwards SIGINT/SIGTERM/SIGHUP, enforces `--lifetime`, waits, tells
//!   in words which limit ended the VMM ([`outcome`]) and removes everything it created.
//!
//! Exit status (see [`exit_code`]): the VMM's own status when it exits by itself; 100–109 for
//! jailer errors; 110–119 when a sandbox limit ended the VMM; 128+n when a signal n killed it.

pub mod cgroup;
pub mod child;
pub mod config;
pub mod devices;
pub mod error;
pub mod exit_code;
pub mod fds;
pub mod jail_dir;
pub mod mounts;
pub mod outcome;
pub mod privileges;
pub mod rlimits;
pub mod supervise;
pub mod sys;
