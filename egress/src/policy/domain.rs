//! Domain patterns of rules: an exact name (`pypi.org`) or every name under a suffix
//! (`*.github.com`, any depth, not the apex itself, which a rule lists on its own).

use std::fmt;

/// A validated, lower-case domain pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// Exactly this name.
    Exact(String),
    /// Any name ending in `.<suffix>`.
    Suffix(String),
}

impl DomainPattern {
    /// Parses `name` or `*.suffix`; the reason when it is neither.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lowered = normalise(text);
        if let Some(suffix) = lowered.strip_prefix("*.") {
            check_name(suffix)?;
            if !suffix.contains('.') {
                return Err(format!(
                    "`{text}` would match every name under a top-level domain; name a registrable domain (`*.example.com`)"
                ));
            }
            return Ok(Self::Suffix(suffix.to_string()));
        }
        check_name(&lowered)?;
        Ok(Self::Exact(lowered))
    }

    /// Whether `name` (any case, trailing dot or not) matches.
    pub fn matches(&self, name: &str) -> bool {
        let name = normalise(name);
        match self {
            Self::Exact(exact) => name == *exact,
            Self::Suffix(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Lower case without the root's trailing dot: the form names are compared in.
pub fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// RFC 1035 host-name shape (letters, digits, hyphens, underscores for service labels).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty domain name".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "domain name `{name}` is longer than 253 characters"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "domain name `{name}` has an empty label or one longer than 63 characters"
            ));
        }
        let shape_ok = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !shape_ok {
            return Err(format!(
                "domain name `{name}`: label `{label}` may hold only letters, digits, `-` and `_` (a `*` only as `*.` at the start)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_suffix_matching() {
        let exact = DomainPattern::parse("PyPI.org.").unwrap();
        assert!(exact.matches("pypi.org"));
        assert!(exact.matches("PYPI.ORG."));
        assert!(!exact.matches("files.pypi.org"));
        let suffix = DomainPattern::parse("*.github.com").unwrap();
        assert!(suffix.matches("api.github.com"));
        assert!(suffix.matches("a.b.github.com"));
        assert!(!suffix.matches("github.com"));
        assert!(!suffix.matches("evilgithub.com"));
        assert!(!suffix.matches("github.com.evil.net"));
        assert_eq!(suffix.to_string(), "*.github.com");
    }

    #[test]
    fn bad_patterns_are_explained() {
        for (text, needle) in [
            ("", "empty"),
            ("*.com", "top-level"),
            ("a..b", "empty label"),
            ("exa mple.com", "may hold only"),
            ("api.*.com", "may hold only"),
            ("-bad.com", "may hold only"),
        ] {
            let err = DomainPattern::parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(DomainPattern::parse(&long).unwrap_err().contains("63"));
    }
}
