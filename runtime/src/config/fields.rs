//! How each kind of TOML value becomes a setting, and where a key sits in the file.
//!
//! Every deserializer here reads the value as a [`toml::Value`] first, so a value of the
//! wrong type gets the same words as a bad value of the right type: the key's line (from
//! the `toml` parser), what was given, and what is allowed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use toml::Value;

use super::{Parsed, SettingValue, StatusPaths, WorkerCount};

/// A TOML type's name for messages: "a string", "an integer", ...
fn kind(value: &Value) -> String {
    match value {
        Value::String(s) => format!("the string {s:?}"),
        Value::Integer(n) => format!("the integer {n}"),
        Value::Float(f) => format!("the float {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}

/// A string setting parsed by its [`SettingValue`] (`listen`, `balance`, durations, sizes).
pub(super) fn from_str<'de, D, T>(d: D) -> Result<Option<Parsed<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: SettingValue,
{
    match Value::deserialize(d)? {
        Value::String(text) => T::parse_setting(&text)
            .map(|v| Some(Parsed(v)))
            .map_err(|reason| D::Error::custom(format!("invalid value {text:?}: {reason}"))),
        other => Err(D::Error::custom(format!(
            "invalid value {}: expected {}",
            kind(&other),
            T::EXPECTED
        ))),
    }
}

/// `listen`: one `[NAME=][SCHEME://]HOST:PORT` string, or an array of them.
pub(super) fn listeners<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<super::Listener>>, D::Error> {
    let expected = "expected a listener string such as \"127.0.0.1:8000\" or \"dns=udp://[::]:53\", or an array of them";
    let items = match Value::deserialize(d)? {
        Value::String(s) => vec![s],
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "invalid element {}: {expected}",
                    kind(&other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(D::Error::custom(format!(
                "invalid value {}: {expected}",
                kind(&other)
            )));
        }
    };
    items
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|reason| D::Error::custom(format!("invalid value {text:?}: {reason}")))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// `workers`: a number or `"auto"`.
pub(super) fn workers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WorkerCount>, D::Error> {
    let (text, shown) = match Value::deserialize(d)? {
        Value::Integer(n) => (n.to_string(), n.to_string()),
        Value::String(s) => (s.clone(), format!("{s:?}")),
        other => (String::new(), kind(&other)),
    };
    text.parse::<WorkerCount>()
        .map(Some)
        .map_err(|reason| D::Error::custom(format!("invalid value {shown}: {reason}")))
}

/// An integer in `min..=max`.
fn whole_number<'de, D: Deserializer<'de>>(d: D, min: u64, max: u64) -> Result<u64, D::Error> {
    let value = Value::deserialize(d)?;
    let expected = format!("expected a whole number from {min} to {max}");
    match value {
        Value::Integer(n) => u64::try_from(n)
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| D::Error::custom(format!("invalid value {n}: {expected}"))),
        other => Err(D::Error::custom(format!(
            "invalid value {}: {expected}",
            kind(&other)
        ))),
    }
}

/// `max-restarts`: `0..=u32::MAX`.
pub(super) fn max_restarts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = whole_number(d, 0, u64::from(u32::MAX))?;
    Ok(u32::try_from(n).ok())
}

/// `worker-nofile`: see [`super::WORKER_NOFILE_RANGE`].
pub(super) fn worker_nofile<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::WORKER_NOFILE_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `client-conn-burst`: see [`super::limits::BURST_RANGE`].
pub(super) fn client_conn_burst<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::limits::BURST_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `client-prefix-v4`: see [`super::limits::PREFIX_V4_RANGE`].
pub(super) fn client_prefix_v4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::limits::PREFIX_V4_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `client-prefix-v6`: see [`super::limits::PREFIX_V6_RANGE`].
pub(super) fn client_prefix_v6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::limits::PREFIX_V6_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `client-table-size`: see [`super::limits::TABLE_SIZE_RANGE`].
pub(super) fn client_table_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::limits::TABLE_SIZE_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `udp-flow-table`: see [`super::listeners::FLOW_TABLE_RANGE`].
pub(super) fn udp_flow_table<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let range = super::listeners::FLOW_TABLE_RANGE;
    whole_number(d, *range.start(), *range.end()).map(Some)
}

/// `client-exempt`: an array of prefixes (`["10.0.0.0/8", "::1"]`), or one string of them
/// separated by commas; an empty array is none.
pub(super) fn client_exempt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<super::Cidr>>, D::Error> {
    let expected = "expected an array of prefixes such as [\"10.0.0.0/8\", \"::1\"]";
    let items: Vec<String> = match Value::deserialize(d)? {
        Value::String(s) => s.split(',').map(str::to_owned).collect(),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "invalid element {}: {expected}",
                    kind(&other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(D::Error::custom(format!(
                "invalid value {}: {expected}",
                kind(&other)
            )));
        }
    };
    items
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.parse()
                .map_err(|reason| D::Error::custom(format!("invalid element {s:?}: {reason}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `true` or `false`.
pub(super) fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Value::deserialize(d)? {
        Value::Boolean(b) => Ok(Some(b)),
        other => Err(D::Error::custom(format!(
            "invalid value {}: expected true or false",
            kind(&other)
        ))),
    }
}

/// A non-empty path string (`pid-file`).
pub(super) fn path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) if !s.is_empty() => Ok(Some(PathBuf::from(s))),
        other => Err(D::Error::custom(format!(
            "invalid value {}: expected a non-empty string",
            kind(&other)
        ))),
    }
}

/// A user or group: a name, or a numeric id.
pub(super) fn account<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) if !s.is_empty() => Ok(Some(s)),
        Value::Integer(n) if u32::try_from(n).is_ok() => Ok(Some(n.to_string())),
        other => Err(D::Error::custom(format!(
            "invalid value {}: expected a name such as \"nobody\" or a numeric id",
            kind(&other)
        ))),
    }
}

/// `status-public`: an array of paths (`["/ready", "/live"]`), or one comma-separated
/// string of them; an empty array is no path.
pub(super) fn status_paths<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<StatusPaths>, D::Error> {
    let expected = "expected an array of paths such as [\"/ready\", \"/live\"]";
    let text = match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "invalid element {}: {expected}",
                    kind(&other)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        other => {
            return Err(D::Error::custom(format!(
                "invalid value {}: {expected}",
                kind(&other)
            )));
        }
    };
    text.parse()
        .map(Some)
        .map_err(|reason| D::Error::custom(format!("invalid value {text:?}: {reason}")))
}

/// `command`: a non-empty array of strings.
pub(super) fn command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let expected = "expected an array of strings such as [\"python3\", \"app.py\"]";
    match Value::deserialize(d)? {
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "invalid element {}: {expected}",
                    kind(&other)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        other => Err(D::Error::custom(format!(
            "invalid value {}: {expected}",
            kind(&other)
        ))),
    }
}

/// Rewrites a `toml` error as one line naming the key and its line (the parser's own
/// message spans several lines with a source excerpt, which does not suit a log line).
pub(super) fn describe_error(
    text: &str,
    lines: &BTreeMap<String, usize>,
    err: &toml::de::Error,
) -> String {
    let Some(span) = err.span() else {
        return err.message().to_owned();
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let column = start - text[..start].rfind('\n').map_or(0, |i| i + 1) + 1;
    match lines.iter().find(|(_, l)| **l == line) {
        Some((key, _)) => format!("key `{key}` at line {line}: {}", err.message()),
        None => format!("line {line}, column {column}: {}", err.message()),
    }
}

/// The 1-based line of every top-level key of a TOML document. Empty if it does not
/// parse (the parser's own error, with its line, is reported instead).
pub(super) fn key_lines(text: &str) -> BTreeMap<String, usize> {
    let Ok(table) = toml::de::DeTable::parse(text) else {
        return BTreeMap::new();
    };
    table
        .get_ref()
        .keys()
        .map(|key| {
            let line = text[..key.span().start.min(text.len())]
                .matches('\n')
                .count()
                + 1;
            (key.get_ref().to_string(), line)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lines_are_one_based_and_skip_comments() {
        let lines = key_lines("# settings\nworkers = 2\n\n  listen = \"127.0.0.1:1\"\n");
        assert_eq!(lines.get("workers"), Some(&2));
        assert_eq!(lines.get("listen"), Some(&4));
        assert!(key_lines("workers = = 2").is_empty());
    }
}
