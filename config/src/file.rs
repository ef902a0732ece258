//! Reading the `lbd` TOML file: syntax, types and validation errors, each
//! with its field path and line.

use std::ops::Range;

use toml_edit::{ImDocument, Item, Value};

use crate::model::{AdminSpec, Config, Defaults, FileSpec, ListenerSpec, RuntimeSpec};
use crate::validate::{resolve_file, unused_check_settings, unused_default_settings};
use crate::AnnounceSpec;
use crate::{ConfigErrors, FieldError};

/// Parses and validates an `lbd` configuration file's text.
pub fn parse_config(text: &str) -> Result<Config, ConfigErrors> {
    parse_config_warned(text).map(|(config, _)| config)
}

/// [`parse_config`], with the warnings the file deserves: settings that
/// take no effect, each with its path and line.
pub fn parse_config_warned(text: &str) -> Result<(Config, Vec<FieldError>), ConfigErrors> {
    let mut warnings = Vec::new();
    let config = parse_toml(text, |spec: &FileSpec| {
        let config = resolve_file(spec)?;
        warnings = unused_default_settings(&spec.listeners, &spec.defaults);
        warnings.extend(unused_check_settings(
            &spec.listeners,
            &spec.defaults,
            "listener",
        ));
        Ok(config)
    })
    .map_err(|errors| with_more_type_errors(text, errors))?;
    place_lines(text, &mut warnings);
    Ok((config, warnings))
}

/// Gives each of `found` (warnings, say) the line where its path was
/// written in `text`, a TOML file.
pub fn place_lines(text: &str, found: &mut [FieldError]) {
    if found.is_empty() {
        return;
    }
    if let Ok(doc) = ImDocument::parse(text) {
        place_in(&doc, text, found);
    }
}

/// A wrongly typed value or an unknown key stops serde at the first; the
/// sections and listeners are independent, though, so each is read again
/// on its own and its first such error added: one pass over a file with a
/// mistake in several listeners reports each of them. (Validation, which
/// needs the whole file, runs once these are fixed.)
fn with_more_type_errors(text: &str, mut errors: ConfigErrors) -> ConfigErrors {
    let (Ok(doc), Ok(table), Some(first)) = (
        ImDocument::parse(text),
        toml::from_str::<toml::Table>(text),
        errors.0.first().cloned(),
    ) else {
        return errors; // a syntax error: nothing more can be read
    };
    if toml::from_str::<FileSpec>(text).is_ok() {
        return errors; // validation errors: every one is there already
    }
    let mut pieces: Vec<(String, Option<FieldError>)> = Vec::new();
    for (key, value) in &table {
        let error = match key.as_str() {
            "runtime" => first_error::<RuntimeSpec>(value, key),
            "admin" => first_error::<AdminSpec>(value, key),
            "announce" => first_error::<AnnounceSpec>(value, key),
            "defaults" => first_error::<Defaults>(value, key),
            "listener" => {
                if let Some(list) = value.as_array() {
                    for (i, item) in list.iter().enumerate() {
                        let prefix = format!("listener[{i}]");
                        let error = first_error::<ListenerSpec>(item, &prefix);
                        pieces.push((prefix, error));
                    }
                }
                continue;
            }
            _ => continue,
        };
        pieces.push((key.clone(), error));
    }
    let within = |path: &str, prefix: &str| {
        path == prefix
            || path.starts_with(&format!("{prefix}."))
            || path.starts_with(&format!("{prefix}["))
    };
    let reported = errors.0.len();
    for (prefix, error) in pieces {
        // The piece of the error already reported adds nothing.
        if within(&first.path, &prefix) {
            continue;
        }
        errors.0.extend(error);
    }
    place_in(&doc, text, &mut errors.0[reported..]);
    errors
}

/// The first error reading `value` as a `T`, its path under `prefix`.
fn first_error<T: serde::de::DeserializeOwned>(
    value: &toml::Value,
    prefix: &str,
) -> Option<FieldError> {
    let err = serde_path_to_error::deserialize::<_, T>(value.clone()).err()?;
    let inner = err.path().to_string();
    let path = if inner == "." {
        prefix.to_owned()
    } else {
        format!("{prefix}.{inner}")
    };
    Some(FieldError::new(path, err.into_inner().message().trim_end()))
}

/// Parses any TOML file into `S` and resolves it with `resolve`, giving every
/// error (syntax, type, unknown key, validation) its field path and line.
/// `lb-controller` reads its own file through this too.
pub fn parse_toml<S, R>(
    text: &str,
    resolve: impl FnOnce(&S) -> Result<R, Vec<FieldError>>,
) -> Result<R, ConfigErrors>
where
    S: serde::de::DeserializeOwned,
{
    let doc = ImDocument::parse(text).map_err(|err| {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        ConfigErrors(vec![FieldError {
            path: String::new(),
            message: format!("syntax error: {}", err.message().trim_end()),
            line: Some(line_of(text, offset)),
        }])
    })?;
    let spec: S = toml::from_str(text).map_err(|err| {
        let span = err.span().unwrap_or(0..0);
        ConfigErrors(vec![FieldError {
            path: path_at(&doc, &span),
            message: err.message().trim_end().to_owned(),
            line: Some(line_of(text, span.start)),
        }])
    })?;
    resolve(&spec).map_err(|mut errors| {
        place_in(&doc, text, &mut errors);
        ConfigErrors(errors)
    })
}

/// Gives each of `found` the line of `doc` (parsed from `text`) where its
/// path was written.
fn place_in(doc: &ImDocument<&str>, text: &str, found: &mut [FieldError]) {
    for f in found {
        f.line = span_of(doc, &f.path).map(|s| line_of(text, s.start));
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(&self) -> Option<Range<usize>> {
        match *self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t.span(),
            Node::Item(Item::ArrayOfTables(a)) => a.span(),
            Node::Item(Item::Value(v)) | Node::Value(v) => v.span(),
            Node::Item(Item::None) => None,
        }
    }

    fn key(&self, key: &str) -> Option<Node<'a>> {
        match *self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t.get(key).map(Node::Item),
            Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
                t.get(key).map(Node::Value)
            }
            _ => None,
        }
    }

    fn index(&self, i: usize) -> Option<Node<'a>> {
        match *self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(i).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(i).map(Node::Value)
            }
            _ => None,
        }
    }

    /// Children with their path segment (`.key` or `[i]`).
    fn children(&self) -> Vec<(String, Node<'a>)> {
        match *self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t
                .iter()
                .map(|(k, v)| (k.to_owned(), Node::Item(v)))
                .collect(),
            Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
                t.iter()
                    .map(|(k, v)| (k.to_owned(), Node::Value(v)))
                    .collect()
            }
            Node::Item(Item::ArrayOfTables(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("[{i}]"), Node::Table(t)))
                .collect(),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("[{i}]"), Node::Value(v)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Splits `listener[2].backends[0].addr` into `listener`, `[2]`, `backends`, `[0]`, `addr`.
fn segments(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for part in path.split('.') {
        match part.find('[') {
            Some(i) => {
                if i > 0 {
                    out.push(&part[..i]);
                }
                let mut rest = &part[i..];
                while let Some(end) = rest.find(']') {
                    out.push(&rest[..=end]);
                    rest = &rest[end + 1..];
                }
            }
            None if !part.is_empty() => out.push(part),
            None => {}
        }
    }
    out
}

/// The span of the deepest node that `path` reaches (a missing field
/// points at its table, so a defaulted value still gets a line).
fn span_of(doc: &ImDocument<&str>, path: &str) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for seg in segments(path) {
        let next = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(i) => i.parse().ok().and_then(|i| node.index(i)),
            None => node.key(seg),
        };
        match next {
            Some(n) => {
                if let Some(s) = n.span() {
                    best = Some(s);
                }
                node = n;
            }
            None => break,
        }
    }
    best
}

/// The path of the deepest node whose span contains `span` (for serde
/// errors, which carry a position but not a path).
fn path_at(doc: &ImDocument<&str>, span: &Range<usize>) -> String {
    let mut path = String::new();
    let mut node = Node::Table(doc.as_table());
    'descend: loop {
        for (seg, child) in node.children() {
            // Tables in an array of tables have a header span only, so
            // fall back to "starts before and the next sibling starts after".
            let contains = child
                .span()
                .is_some_and(|s| s.start <= span.start && span.start < s.end.max(s.start + 1));
            let header_only = matches!(child, Node::Table(_) | Node::Item(Item::Table(_)));
            if contains || (header_only && table_contains(&child, span.start)) {
                if seg.starts_with('[') || path.is_empty() {
                    path.push_str(&seg);
                } else {
                    path.push('.');
                    path.push_str(&seg);
                }
                node = child;
                continue 'descend;
            }
        }
        return path;
    }
}

/// Whether any value of a table (recursively) starts at or covers `offset`.
fn table_contains(node: &Node<'_>, offset: usize) -> bool {
    node.children().iter().any(|(_, c)| {
        c.span()
            .is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
            || table_contains(c, offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split() {
        assert_eq!(
            segments("listener[2].backends[0].addr"),
            ["listener", "[2]", "backends", "[0]", "addr"]
        );
        assert_eq!(segments("admin.metrics"), ["admin", "metrics"]);
    }

    #[test]
    fn line_numbers() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
