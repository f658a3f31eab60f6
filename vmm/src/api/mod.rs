//! The per-VM HTTP API over a Unix socket (`agentvm serve`), Firecracker-compatible where the two
//! overlap. The spec is `vmm/api/openapi.yaml`.
//!
//! Threads: the API thread runs a current-thread tokio runtime serving hyper connections
//! ([`server`]); requests are parsed ([`models`], [`routes`]) and applied to the
//! [`controller::Controller`] ([`handlers`]). Whatever must happen on the VMM thread (booting, which
//! spawns the vCPU and device threads; opening log and metrics files, which the API thread's
//! seccomp filter forbids) goes there as a [`handlers::VmmRequest`]; pause/resume go to the running
//! VM's event channel, and so does PUT /snapshot/create ([`snapshot`]). The `/sandbox/...` agent extensions ([`sandbox`]) run on job threads
//! outside the API thread's filter ([`agent`]); so does the after-restore step that gives a
//! loaded VM's guest the host's time and fresh entropy ([`after_restore`]).
//!
//! The guest's network: [`egress_policy`] (`/egress/...`) gives the VM a NIC behind the egress
//! filter and changes its policy at run time.
//!
//! Observability: `GET /metrics` ([`metrics`]: requests by route and status
//! ([`request_counts`]), boot milestones, vCPU exits, vsock traffic, exec outcomes and latency
//! ([`exec_metrics`]), the NIC's counters ([`net_metrics`])), and the exec audit log
//! ([`audit`], fed by [`exec_trace`]).

pub mod after_restore;
pub mod agent;
pub mod audit;
pub mod config_file;
pub mod controller;
pub mod egress_policy;
pub mod exec_metrics;
pub mod exec_trace;
pub mod fault;
pub mod handlers;
pub mod logger;
pub mod metrics;
pub mod models;
pub mod net_metrics;
pub mod port_forward;
pub mod pty;
pub mod request_counts;
pub mod routes;
pub mod sandbox;
pub mod server;
pub mod snapshot;
pub mod upgrade;
pub mod watch;
