//! A small reader of Prometheus' text exposition format (0.0.4) for tests: it checks the rules
//! agentvm's `GET /metrics` promises (every sample's family has HELP and TYPE first, counters end
//! in `_total`, histograms have cumulative `_bucket{le}` ending in `+Inf` equal to `_count`, and
//! `_sum`) and gives the samples back.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// Family name → type.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// The value of the first sample named `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

/// Parses and checks `text`; the error names the offending line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut helped = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            helped.insert(name.to_string(), help.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("TYPE without a type: {line:?}"))?;
            if !helped.contains_key(name) {
                return Err(format!("TYPE before HELP for {name}"));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("unknown type in {line:?}"));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(format!("counter {name} does not end in _total"));
            }
            out.types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line)?;
        family_of(&out.types, &sample.name)
            .ok_or_else(|| format!("sample before its HELP/TYPE: {line:?}"))?;
        out.samples.push(sample);
    }
    check_histograms(&out)?;
    Ok(out)
}

/// The declared family a sample belongs to.
fn family_of<'a>(types: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    if let Some((family, _)) = types.get_key_value(name) {
        return Some(family);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        let (family, kind) = types.get_key_value(base)?;
        (kind == "histogram").then_some(family.as_str())
    })
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let bad = |why: &str| format!("{why}: {line:?}");
    let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
    let name = &line[..name_end];
    let valid_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    if name.is_empty() || !name.chars().all(valid_name) {
        return Err(bad("bad metric name"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some(&(i, c)) = chars.peek() {
            if c == '}' {
                end = Some(i);
                break;
            }
            let key_start = i;
            while chars.peek().is_some_and(|&(_, c)| c != '=') {
                chars.next();
            }
            let (eq, _) = chars.next().ok_or_else(|| bad("label without '='"))?;
            let key = body[key_start..eq].to_string();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(bad("label value not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        _ => return Err(bad("bad escape in a label value")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(bad("unterminated label value")),
                }
            }
            labels.insert(key, value);
            if chars.peek().map(|&(_, c)| c) == Some(',') {
                chars.next();
            }
        }
        let end = end.ok_or_else(|| bad("labels not closed"))?;
        rest = &body[end + 1..];
    }
    let value = rest
        .strip_prefix(' ')
        .ok_or_else(|| bad("no space before the value"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| bad("value is not a number"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn check_histograms(out: &Exposition) -> Result<(), String> {
    for (family, kind) in &out.types {
        if kind != "histogram" {
            continue;
        }
        let named = |suffix: &str| {
            let name = format!("{family}{suffix}");
            out.samples.iter().filter(move |s| s.name == name)
        };
        let mut previous = 0.0;
        let mut last_le = None;
        for bucket in named("_bucket") {
            let le = bucket
                .labels
                .get("le")
                .ok_or_else(|| format!("{family}_bucket without le"))?;
            if bucket.value < previous {
                return Err(format!("{family} buckets are not cumulative at le={le}"));
            }
            previous = bucket.value;
            last_le = Some(le.clone());
        }
        if last_le.as_deref() != Some("+Inf") {
            return Err(format!("{family} has no final +Inf bucket"));
        }
        let count = named("_count").next().map(|s| s.value);
        if count != Some(previous) {
            return Err(format!(
                "{family}_count {count:?} != +Inf bucket {previous}"
            ));
        }
        if named("_sum").next().is_none() {
            return Err(format!("{family} has no _sum"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_good_text_and_names_what_is_wrong() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{id=\"x\\\"y\",k=\"v\"} 3\n\
                    # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n\
                    h_sum 0.5\nh_count 2\n";
        let parsed = parse(good).unwrap();
        assert_eq!(parsed.value("a_total", &[("id", "x\"y")]), Some(3.0));
        assert_eq!(parsed.value("h_bucket", &[("le", "+Inf")]), Some(2.0));
        for (bad, why) in [
            ("b 1\n", "before its HELP"),
            ("# HELP c C.\n# TYPE c counter\nc 1\n", "_total"),
            ("# HELP g G.\n# TYPE g gauge\ng{a=b} 1\n", "not quoted"),
            ("# HELP g G.\n# TYPE g gauge\ng one\n", "not a number"),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",
                "!= +Inf",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
