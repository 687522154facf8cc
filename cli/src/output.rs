//! Rendering: aligned plain-text tables, JSON/YAML documents, ages.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::args::Format;
use crate::exit::CliError;

/// A table with a header row; columns are left-aligned and separated by
/// three spaces, the last column unpadded.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders with every line prefixed by `indent`.
    pub fn render_indented(&self, indent: &str) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::from(indent);
            for (i, w) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                line.push_str(cell);
                if i + 1 < columns {
                    line.extend(std::iter::repeat_n(' ', w - width(cell) + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn render(&self) -> String {
        self.render_indented("")
    }
}

/// Display width, counting chars (the CLI prints ASCII plus a few symbols).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// A serialised document in the requested machine format.
pub fn document<T: Serialize>(format: Format, value: &T) -> Result<String, CliError> {
    match format {
        Format::Json | Format::Table => {
            let mut s = serde_json::to_string_pretty(value).map_err(|e| CliError::Io {
                context: "cannot serialise JSON".into(),
                source: e.into(),
            })?;
            s.push('\n');
            Ok(s)
        }
        Format::Yaml => serde_saphyr::to_string(value).map_err(|e| CliError::Io {
            context: format!("cannot serialise YAML: {e}"),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Compact age like kubectl: `42s`, `5m`, `3h`, `2d`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago a server timestamp was, by this machine's clock (clamped at
/// zero when the clocks disagree the other way).
pub fn since(t: SystemTime) -> Duration {
    SystemTime::now().duration_since(t).unwrap_or_default()
}

/// RFC 3339 in UTC, whole seconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Shortens a long hex digest for tables.
pub fn short_hash(h: &str) -> &str {
    let h = h.strip_prefix("sha256:").unwrap_or(h);
    h.get(..12).unwrap_or(h)
}

/// `k=v,k2=v2`, or `-` when empty.
pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let joined: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if joined.is_empty() {
        "-".into()
    } else {
        joined.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(["AGENT", "READY", "LABELS"]);
        t.row(["pi-1", "2/2", "role=kiosk"]);
        t.row(["a-much-longer-id", "0/0", ""]);
        assert_eq!(
            t.render(),
            "AGENT              READY   LABELS\n\
             pi-1               2/2     role=kiosk\n\
             a-much-longer-id   0/0\n"
        );
        assert_eq!(
            t.render_indented("  ").lines().next(),
            Some("  AGENT              READY   LABELS")
        );
    }

    #[test]
    fn short_rows_are_padded() {
        let mut t = Table::new(["A", "B", "C"]);
        t.row(["x"]);
        assert_eq!(t.render(), "A   B   C\nx\n");
    }

    #[test]
    fn ages() {
        assert_eq!(age(Duration::from_secs(0)), "0s");
        assert_eq!(age(Duration::from_secs(119)), "119s");
        assert_eq!(age(Duration::from_secs(600)), "10m");
        assert_eq!(age(Duration::from_secs(3 * 3600)), "3h");
        assert_eq!(age(Duration::from_secs(5 * 86400)), "5d");
    }

    #[test]
    fn hashes_and_labels() {
        assert_eq!(short_hash("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_hash("abc"), "abc");
        let l: std::collections::BTreeMap<String, String> =
            [("a".into(), "1".into()), ("b".into(), "2".into())].into();
        assert_eq!(labels(&l), "a=1,b=2");
        assert_eq!(labels(&std::collections::BTreeMap::new()), "-");
    }

    #[test]
    fn documents() {
        let v = serde_json::json!({"name": "hello", "n": 1});
        let json = document(Format::Json, &v).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap(), v);
        let yaml = document(Format::Yaml, &v).unwrap();
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, v);
    }
}
