//! A strict reader of the Prometheus text exposition format (0.0.4), for checking what
//! `GET /metrics` serves: it refuses what a Prometheus server would refuse, and a little
//! more (a sample before its `# TYPE`, a family declared twice, a duplicate series, a
//! counter whose name does not end in `_total`).

use std::collections::BTreeMap;
use std::fmt;

/// One parsed exposition: families by name.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Every family, by metric name.
    pub families: BTreeMap<String, Family>,
}

/// A metric family: its `# HELP`, `# TYPE`, and samples in order.
#[derive(Debug, Default)]
pub struct Family {
    /// The help text.
    pub help: String,
    /// `counter`, `gauge`, `histogram`, `summary` or `untyped`.
    pub kind: String,
    /// The samples.
    pub samples: Vec<Sample>,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Labels by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Why a text is not a valid exposition: the line and what is wrong.
#[derive(Debug, PartialEq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl Exposition {
    /// Parses `text`.
    ///
    /// # Errors
    ///
    /// At the first line that breaks the format.
    pub fn parse(text: &str) -> Result<Exposition, ParseError> {
        let mut exposition = Exposition::default();
        let mut current: Option<String> = None;
        let mut help: Option<(String, String)> = None;
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(ParseError {
                line: text.lines().count(),
                message: "the exposition must end with a newline".into(),
            });
        }
        for (i, line) in text.lines().enumerate() {
            let at = |message: String| ParseError {
                line: i + 1,
                message,
            };
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                check_name(name).map_err(at)?;
                help = Some((name.to_owned(), text.to_owned()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| at(format!("TYPE without a type: {line:?}")))?;
                check_name(name).map_err(at)?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(at(format!("unknown type {kind:?}")));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    return Err(at(format!("counter {name} does not end in _total")));
                }
                if exposition.families.contains_key(name) {
                    return Err(at(format!("family {name} declared twice")));
                }
                let help = match help.take() {
                    Some((help_name, text)) if help_name == name => text,
                    _ => return Err(at(format!("no # HELP right before # TYPE {name}"))),
                };
                exposition.families.insert(
                    name.to_owned(),
                    Family {
                        help,
                        kind: kind.to_owned(),
                        samples: Vec::new(),
                    },
                );
                current = Some(name.to_owned());
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let (name, sample) = parse_sample(line).map_err(at)?;
                let family = current
                    .as_ref()
                    .filter(|c| **c == name)
                    .and_then(|c| exposition.families.get_mut(c))
                    .ok_or_else(|| at(format!("sample of {name} outside its family")))?;
                if family.samples.iter().any(|s| s.labels == sample.labels) {
                    return Err(at(format!("duplicate series {line:?}")));
                }
                family.samples.push(sample);
            }
        }
        Ok(exposition)
    }

    /// The family `name`.
    ///
    /// # Panics
    ///
    /// If there is none, listing the families there are.
    pub fn family(&self, name: &str) -> &Family {
        self.families.get(name).unwrap_or_else(|| {
            panic!(
                "no metric family {name}; there are {:?}",
                self.families.keys().collect::<Vec<_>>()
            )
        })
    }

    /// The value of the series of `name` whose labels include `labels`.
    ///
    /// # Panics
    ///
    /// If there is no such family or series.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.family(name)
            .samples
            .iter()
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no series {name}{labels:?}"))
            .value
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    if valid {
        Ok(())
    } else {
        Err(format!("invalid metric name {name:?}"))
    }
}

fn parse_sample(line: &str) -> Result<(String, Sample), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| format!("sample without a value: {line:?}"))?;
    let name = &line[..name_end];
    check_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest
                .find('=')
                .ok_or_else(|| format!("label without '=': {line:?}"))?;
            let key = &rest[..eq];
            let key_ok = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !key_ok {
                return Err(format!("invalid label name {key:?}"));
            }
            let mut chars = rest[eq + 1..].char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label value not quoted: {line:?}"));
            }
            let mut value = String::new();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in {line:?}")),
                    },
                    '"' => {
                        end = Some(eq + 1 + i + 1);
                        break;
                    }
                    '\n' => return Err("newline in a label value".into()),
                    c => value.push(c),
                }
            }
            let end = end.ok_or_else(|| format!("unterminated label value: {line:?}"))?;
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(format!("label {key} twice: {line:?}"));
            }
            rest = &rest[end..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("sample without a value: {line:?}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("value {v:?} is not a number"))?,
    };
    if let Some(timestamp) = fields.next()
        && timestamp.parse::<i64>().is_err()
    {
        return Err(format!("timestamp {timestamp:?} is not an integer"));
    }
    if fields.next().is_some() {
        return Err(format!("trailing text: {line:?}"));
    }
    Ok((name.to_owned(), Sample { labels, value }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_total As.\n# TYPE a_total counter\na_total{slot=\"0\",x=\"q\\\"\\n\"} 3\na_total{slot=\"1\"} 4 1700000000\n# HELP g A gauge.\n# TYPE g gauge\ng 0.25\n";

    #[test]
    fn reads_families_labels_and_values() {
        let e = Exposition::parse(GOOD).expect("valid");
        assert_eq!(e.family("a_total").kind, "counter");
        assert_eq!(e.family("a_total").help, "As.");
        assert_eq!(e.value("a_total", &[("slot", "1")]), 4.0);
        assert_eq!(e.family("a_total").samples[0].labels["x"], "q\"\n");
        assert_eq!(e.value("g", &[]), 0.25);
    }

    #[test]
    fn refuses_what_prometheus_would() {
        for (text, needle) in [
            ("a 1\n", "outside its family"),
            ("# TYPE a gauge\na 1\n", "no # HELP"),
            ("# HELP a x\n# TYPE a counter\na 1\n", "_total"),
            ("# HELP a x\n# TYPE a gauge\na{b=c} 1\n", "not quoted"),
            ("# HELP a x\n# TYPE a gauge\na one\n", "not a number"),
            ("# HELP a x\n# TYPE a gauge\na 1\na 2\n", "duplicate"),
            (
                "# HELP a x\n# TYPE a gauge\n# HELP a x\n# TYPE a gauge\n",
                "twice",
            ),
            ("# HELP 1a x\n", "invalid metric name"),
            ("# HELP a x\n# TYPE a gauge\na 1", "newline"),
        ] {
            let err = Exposition::parse(text).expect_err(text);
            assert!(err.message.contains(needle), "{text:?}: {err}");
        }
    }
}
