//! The process's tracing setup: stderr by default, and re-pointable at run time to a file with
//! another level and format (the API's `PUT /logger`), through a reload handle.

use std::fs::File;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::Filtered;
use tracing_subscriber::fmt::format::{DefaultFields, Format};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

type FmtLayer = tracing_subscriber::fmt::Layer<Registry, DefaultFields, Format, BoxMakeWriter>;
type LogLayer = Filtered<FmtLayer, EnvFilter, Registry>;

static RELOAD: OnceLock<reload::Handle<LogLayer, Registry>> = OnceLock::new();

/// Where and how log lines go.
pub struct LogSettings {
    /// None: stderr.
    pub file: Option<File>,
    /// An `EnvFilter` directive, e.g. `info` or `vmm::api=debug`.
    pub filter: EnvFilter,
    pub show_level: bool,
    pub show_origin: bool,
}

fn layer(settings: LogSettings) -> LogLayer {
    // Colour codes only where a terminal may show them.
    let ansi = settings.file.is_none();
    let writer = match settings.file {
        Some(file) => BoxMakeWriter::new(Mutex::new(file)),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false)
        .with_level(settings.show_level)
        .with_file(settings.show_origin)
        .with_line_number(settings.show_origin)
        .with_filter(settings.filter)
}

/// Logs to stderr at the level `env_var` names (default `warn`). Only the first call takes effect.
pub fn init(env_var: &str) {
    let filter = EnvFilter::try_from_env(env_var).unwrap_or_else(|_| EnvFilter::new("warn"));
    let (layer, handle) = reload::Layer::new(layer(LogSettings {
        file: None,
        filter,
        show_level: true,
        show_origin: false,
    }));
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(handle);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogConfigError {
    #[error("logging was not set up by this process, so it cannot be reconfigured")]
    NotInitialised,
    #[error("cannot reconfigure logging: {0}")]
    Reload(String),
}

/// Replaces the destination, filter and format of every later log line.
pub fn reconfigure(settings: LogSettings) -> Result<(), LogConfigError> {
    let handle = RELOAD.get().ok_or(LogConfigError::NotInitialised)?;
    handle
        .reload(layer(settings))
        .map_err(|e| LogConfigError::Reload(e.to_string()))
}
