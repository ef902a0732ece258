//! Equality-based label selectors (`a=b,c!=d,e,!f`), as `nodes.selector`
//! is written.

/// One term of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` (or `key==value`).
    Equals(String, String),
    /// `key!=value`.
    NotEquals(String, String),
    /// `key`.
    Exists(String),
    /// `!key`.
    NotExists(String),
}

impl Requirement {
    /// Whether `labels` satisfy this term.
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Self::Equals(k, v) => labels.get(k) == Some(v),
            Self::NotEquals(k, v) => labels.get(k) != Some(v),
            Self::Exists(k) => labels.contains_key(k),
            Self::NotExists(k) => !labels.contains_key(k),
        }
    }
}

/// A Kubernetes label value: empty, or at most 63 characters of
/// `A-Z a-z 0-9 - _ .` that begin and end with a letter or digit. The API
/// server refuses a selector with any other, and the Node watch would
/// never start.
fn valid_value(v: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    v.is_empty()
        || (v.len() <= 63
            && edge(v.chars().next())
            && edge(v.chars().last())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// Parses an equality-based label selector (`a=b,c!=d,e,!f`).
pub fn parse_selector(text: &str) -> Result<Vec<Requirement>, String> {
    let valid = |k: &str| {
        !k.is_empty()
            && k.len() <= 317
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    let mut out = Vec::new();
    for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().into())
        } else {
            Requirement::Exists(term.into())
        };
        let (Requirement::Equals(k, _)
        | Requirement::NotEquals(k, _)
        | Requirement::Exists(k)
        | Requirement::NotExists(k)) = &req;
        if !valid(k) {
            return Err(format!("bad label key {k:?} in {term:?}"));
        }
        if let Requirement::Equals(_, v) | Requirement::NotEquals(_, v) = &req {
            if !valid_value(v) {
                return Err(format!(
                    "bad label value {v:?} in {term:?} (at most 63 of A-Z a-z 0-9 - _ ., starting and ending with a letter or digit)"
                ));
            }
        }
        out.push(req);
    }
    if out.is_empty() {
        return Err("empty selector".into());
    }
    Ok(out)
}
