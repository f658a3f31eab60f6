//! The include/exclude filter of a watch. Patterns are `glob::Pattern`s matched against the path
//! relative to the watch root with a literal separator, so `*` stays within one component and
//! `**` (a whole component) spans any number of them.
//!
//! An exclude also covers everything below a directory it matches (`node_modules` or
//! `**/target` hide those whole trees, as in `.gitignore`), which lets the watcher skip such
//! directories instead of watching them. Includes match the path itself.

use std::path::Path;

use glob::{MatchOptions, Pattern};

use super::service_error::ServiceError;

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

#[derive(Debug, Clone, Default)]
pub struct GlobFilter {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl GlobFilter {
    /// Compiles the patterns; a bad one is an error naming it.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, ServiceError> {
        Ok(Self {
            include: compile(include, "include")?,
            exclude: compile(exclude, "exclude")?,
        })
    }

    /// Whether an exclude matches `relative` or one of its parent directories.
    pub fn excludes(&self, relative: &Path) -> bool {
        relative
            .ancestors()
            .filter(|p| !p.as_os_str().is_empty())
            .any(|p| {
                let text = p.to_string_lossy();
                self.exclude.iter().any(|g| g.matches_with(&text, OPTIONS))
            })
    }

    /// Whether an event about `relative` is reported: it matches some include (or there are
    /// none) and is not excluded.
    pub fn reports(&self, relative: &Path) -> bool {
        if self.excludes(relative) {
            return false;
        }
        if self.include.is_empty() {
            return true;
        }
        let text = relative.to_string_lossy();
        self.include.iter().any(|g| g.matches_with(&text, OPTIONS))
    }
}

fn compile(patterns: &[String], which: &str) -> Result<Vec<Pattern>, ServiceError> {
    patterns
        .iter()
        .map(|p| {
            if p.is_empty() {
                return Err(ServiceError::invalid(format!(
                    "invalid {which} glob \"\": empty pattern"
                )));
            }
            Pattern::new(p).map_err(|e| {
                ServiceError::invalid(format!(
                    "invalid {which} glob {p:?}: {} at position {}",
                    e.msg, e.pos
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::ErrorCode;

    fn filter(include: &[&str], exclude: &[&str]) -> GlobFilter {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        GlobFilter::new(&own(include), &own(exclude)).unwrap()
    }

    fn reports(f: &GlobFilter, path: &str) -> bool {
        f.reports(Path::new(path))
    }

    #[test]
    fn star_stays_within_a_component_and_double_star_spans_them() {
        let f = filter(&["*.rs"], &[]);
        assert!(reports(&f, "main.rs"));
        assert!(!reports(&f, "src/main.rs"));

        let f = filter(&["**/*.rs"], &[]);
        assert!(reports(&f, "main.rs"));
        assert!(reports(&f, "src/a/b/main.rs"));
        assert!(!reports(&f, "src/main.rsx"));

        let f = filter(&["src/*/mod.rs"], &[]);
        assert!(reports(&f, "src/x/mod.rs"));
        assert!(!reports(&f, "src/x/y/mod.rs"));

        let f = filter(&["src/**"], &[]);
        assert!(reports(&f, "src/x/y/mod.rs"));
        assert!(!reports(&f, "lib/x"));

        let f = filter(&["file?.[ch]"], &[]);
        assert!(reports(&f, "file1.c") && reports(&f, "filex.h"));
        assert!(!reports(&f, "file12.c"));
    }

    #[test]
    fn no_include_means_everything_and_excludes_cover_whole_trees() {
        let f = filter(&[], &["target", "**/node_modules", "*.tmp"]);
        assert!(reports(&f, "src/main.rs"));
        assert!(reports(&f, ".hidden"));
        assert!(!reports(&f, "target"));
        assert!(!reports(&f, "target/debug/x"));
        assert!(
            reports(&f, "src/target"),
            "`target` is anchored at the root"
        );
        assert!(!reports(&f, "a/b/node_modules/pkg/index.js"));
        assert!(!reports(&f, "x.tmp"));
        assert!(!reports(&f, "x.tmp/inside"));
        assert!(reports(&f, "dir/x.tmp"), "`*` does not cross `/`");
        assert!(f.excludes(Path::new("target")));
        assert!(!f.excludes(Path::new("src")));
    }

    #[test]
    fn excludes_win_over_includes() {
        let f = filter(&["**/*.rs"], &["gen/**"]);
        assert!(reports(&f, "src/a.rs"));
        assert!(!reports(&f, "gen/a.rs"));
    }

    #[test]
    fn bad_patterns_are_invalid_arguments_naming_them() {
        let err = GlobFilter::new(&["a**b".to_string()], &[]).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(
            err.message.starts_with("invalid include glob \"a**b\":"),
            "{}",
            err.message
        );
        let err = GlobFilter::new(&[], &["[".to_string()]).unwrap_err();
        assert!(
            err.message.starts_with("invalid exclude glob \"[\":"),
            "{}",
            err.message
        );
        let err = GlobFilter::new(&[], &[String::new()]).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
}
