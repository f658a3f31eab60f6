//! `PUT /logger`: Firecracker's logger settings turned into the process's tracing setup.

use std::fs::OpenOptions;

use tracing_subscriber::EnvFilter;

use super::models::Logger;
use crate::logging::{self, LogFormat, LogSettings};

/// Firecracker's level names (any case) as tracing levels.
fn level(name: Option<&str>) -> Result<&'static str, String> {
    Ok(match name.map(str::to_ascii_lowercase).as_deref() {
        None | Some("info") => "info",
        Some("error") => "error",
        Some("warning") | Some("warn") => "warn",
        Some("debug") => "debug",
        Some("trace") => "trace",
        Some("off") => "off",
        Some(other) => {
            return Err(format!(
                "level {other:?} is not one of Error, Warning, Info, Debug, Trace, Off"
            ))
        }
    })
}

fn format(name: Option<&str>) -> Result<LogFormat, String> {
    match name.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(LogFormat::process_default()),
        Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(format!("format {other:?} is not one of Text, Json")),
    }
}

/// Opens the log file (append, created if missing) and points the process's logs at it.
/// Runs on the VMM thread: the API thread's seccomp filter does not allow opening files.
pub fn apply(config: &Logger) -> Result<(), String> {
    let level = level(config.level.as_deref())?;
    let format = format(config.format.as_deref())?;
    let directive = match &config.module {
        Some(module) => format!("{module}={level}"),
        None => level.to_string(),
    };
    let filter =
        EnvFilter::try_new(&directive).map_err(|e| format!("module {directive:?}: {e}"))?;
    let file = match &config.log_path {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log_path {}: {e}", path.display()))?,
        ),
        None => None,
    };
    logging::reconfigure(LogSettings {
        file,
        filter,
        show_level: config.show_level.unwrap_or(false),
        show_origin: config.show_log_origin.unwrap_or(false),
        format,
    })
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_firecrackers_names_in_any_case() {
        assert_eq!(level(Some("Warning")), Ok("warn"));
        assert_eq!(level(Some("TRACE")), Ok("trace"));
        assert_eq!(level(None), Ok("info"));
        assert!(level(Some("loud")).unwrap_err().contains("\"loud\""));
        assert_eq!(format(Some("JSON")), Ok(LogFormat::Json));
        assert!(format(Some("xml")).unwrap_err().contains("\"xml\""));
    }
}
