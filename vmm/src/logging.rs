//! The process's tracing setup: stderr by default, as text or one JSON object per line
//! (`--log-format`), and re-pointable at run time to a file with another level and format (the
//! API's `PUT /logger`), through a reload handle.

use std::fs::File;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// Boxed so that text and JSON layers (different types) can replace each other on reload.
type LogLayer = Box<dyn Layer<Registry> + Send + Sync>;

static RELOAD: OnceLock<reload::Handle<LogLayer, Registry>> = OnceLock::new();
/// The format chosen at start-up: what `PUT /logger` keeps unless it names another.
static DEFAULT_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// How each log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp` (RFC 3339), `level`, `message` and the event's
    /// fields, `target`, and `filename`/`line_number` when the origin is shown.
    Json,
}

impl LogFormat {
    /// The format given to [`init`] (text if logging was set up otherwise).
    pub fn process_default() -> Self {
        DEFAULT_FORMAT.get().copied().unwrap_or_default()
    }
}

/// Where and how log lines go.
pub struct LogSettings {
    /// None: stderr.
    pub file: Option<File>,
    /// An `EnvFilter` directive, e.g. `info` or `vmm::api=debug`.
    pub filter: EnvFilter,
    /// Text only: JSON lines always carry the level.
    pub show_level: bool,
    pub show_origin: bool,
    pub format: LogFormat,
}

fn layer(settings: LogSettings) -> LogLayer {
    // Colour codes only where a terminal may show them.
    let ansi = settings.file.is_none();
    let writer = match settings.file {
        Some(file) => BoxMakeWriter::new(Mutex::new(file)),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_file(settings.show_origin)
        .with_line_number(settings.show_origin);
    match settings.format {
        LogFormat::Text => fmt
            .with_ansi(ansi)
            .with_target(false)
            .with_level(settings.show_level)
            .with_filter(settings.filter)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .with_target(true)
            .with_level(true)
            .with_filter(settings.filter)
            .boxed(),
    }
}

/// Logs to stderr in `format` at the level `env_var` names (default `warn`). Only the first call
/// takes effect.
pub fn init(env_var: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env(env_var).unwrap_or_else(|_| EnvFilter::new("warn"));
    let (layer, handle) = reload::Layer::new(layer(LogSettings {
        file: None,
        filter,
        show_level: true,
        show_origin: false,
        format,
    }));
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_ok()
    {
        let _ = RELOAD.set(handle);
        let _ = DEFAULT_FORMAT.set(format);
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
