//! Per-device values in deployment specs (docs/adr/0014-per-device-values.md).
//!
//! A string anywhere inside a resource's `spec` may reference the agent it is
//! rendered for:
//!
//! | reference            | replaced by                                        |
//! |----------------------|----------------------------------------------------|
//! | `${agent.id}`        | the agent id                                       |
//! | `${labels.<key>}`    | the agent's label `<key>`, as its deployment's selector sees it ([`Selector::labels`](crate::deployment::Selector::labels)) |
//! | `${values.<key>}`    | the operator's per-agent value `<key>` (`values.<id>`) |
//!
//! `$${agent.id}` (and so on) is the literal text `${agent.id}`. Any other
//! `${…}` or `$${…}` (shell, make or systemd syntax in a file's content:
//! `${HOME}`, `$${i}`) is left exactly as it is, and a spec without one of
//! our references is not a template at all, so existing payloads keep their
//! meaning. An unterminated reference or an unknown field of `agent`
//! is an error in the deployment document itself; a label or value the agent
//! lacks is an error of that agent's render only ([`Unresolved`]).
//!
//! The control plane expands references when it renders each manifest, so an
//! agent only ever receives plain strings: a signature covers exactly what
//! runs. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ApiVersion;
use crate::ids::AgentId;

/// `values.<agent-id>`: what an operator set for one agent — the values
/// `${values.<key>}` references resolve against, and the labels deployment
/// selectors match (docs/adr/0017). Written by operators (`flotilla values
/// set`, `flotilla label agent`), read by the control plane; never written
/// by agents, so a device cannot select itself into a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentValues {
    pub api_version: ApiVersion,
    pub agent_id: AgentId,
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// The operator-owned labels selectors match (the labels a device
    /// reports in its inventory are hints, matched only where a deployment
    /// opts in with `selector.deviceLabels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Longest value of one key, in bytes.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

impl AgentValues {
    pub fn new(agent_id: AgentId) -> Self {
        Self {
            api_version: ApiVersion,
            agent_id,
            values: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Checks every key (1 to 63 ASCII letters, digits, `-_.`) and value
    /// (at most [`MAX_VALUE_LEN`] bytes, no NUL), and every label.
    pub fn validate(&self) -> Result<(), String> {
        for (k, v) in &self.values {
            validate_value(k, v)?;
        }
        for (k, v) in &self.labels {
            crate::inventory::validate_label(k, v)?;
        }
        Ok(())
    }
}

/// Checks one per-agent value and its key.
pub fn validate_value(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !key_ok {
        return Err(format!(
            "value key {key:?}: 1 to 63 letters, digits, '-', '_' or '.'"
        ));
    }
    if value.len() > MAX_VALUE_LEN || value.contains('\0') {
        return Err(format!(
            "value {key:?}: at most {MAX_VALUE_LEN} bytes and no NUL"
        ));
    }
    Ok(())
}

/// One reference found in a string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    AgentId,
    Label(String),
    Value(String),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AgentId => f.write_str("${agent.id}"),
            Self::Label(k) => write!(f, "${{labels.{k}}}"),
            Self::Value(k) => write!(f, "${{values.{k}}}"),
        }
    }
}

/// A reference that is not well-formed: the deployment document is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error(
        "unterminated reference {0:?} (a reference ends with `}}`; write `$${{` for a literal `${{`)"
    )]
    Unterminated(String),
    #[error("unknown reference {0:?}: the agent offers only ${{agent.id}}")]
    UnknownAgentField(String),
    #[error("empty key in reference {0:?}")]
    EmptyKey(String),
}

/// A reference the agent has no value for: that agent's render fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reference} is not set for agent {agent}")]
pub struct Unresolved {
    pub agent: AgentId,
    pub reference: Reference,
}

/// What references resolve against: one agent.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub agent: &'a AgentId,
    pub labels: &'a BTreeMap<String, String>,
    pub values: &'a BTreeMap<String, String>,
}

/// The namespaces a reference may start with.
const NAMESPACES: [&str; 3] = ["agent.", "labels.", "values."];

/// A piece of a parsed string.
enum Piece<'a> {
    Text(&'a str),
    Ref(Reference),
}

/// Splits `s` into text and references.
fn parse(s: &str) -> Result<Vec<Piece<'_>>, SyntaxError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("${") {
        let body = &rest[at + 2..];
        let Some(namespace) = NAMESPACES.iter().find(|n| body.starts_with(**n)) else {
            // Not ours: `${HOME}` and `$${i}` stay as written.
            out.push(Piece::Text(&rest[..at + 2]));
            rest = body;
            continue;
        };
        // `$${agent.id}` is the literal text `${agent.id}`.
        if at > 0 && rest.as_bytes()[at - 1] == b'$' {
            out.push(Piece::Text(&rest[..at - 1]));
            out.push(Piece::Text("${"));
            rest = body;
            continue;
        }
        let Some(end) = body.find('}') else {
            return Err(SyntaxError::Unterminated(
                rest[at..].chars().take(40).collect(),
            ));
        };
        let key = &body[namespace.len()..end];
        let whole = format!("${{{}}}", &body[..end]);
        let reference = match *namespace {
            "agent." if key == "id" => Reference::AgentId,
            "agent." => return Err(SyntaxError::UnknownAgentField(whole)),
            _ if key.is_empty() => return Err(SyntaxError::EmptyKey(whole)),
            "labels." => Reference::Label(key.to_owned()),
            _ => Reference::Value(key.to_owned()),
        };
        out.push(Piece::Text(&rest[..at]));
        out.push(Piece::Ref(reference));
        rest = &body[end + 1..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

/// Every reference in `s`, in order.
pub fn references(s: &str) -> Result<Vec<Reference>, SyntaxError> {
    Ok(parse(s)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Ref(r) => Some(r),
            Piece::Text(_) => None,
        })
        .collect())
}

/// Whether `s` needs expanding: a reference (or an escaped one) in one of
/// our namespaces. Other `${…}` never make a spec a template.
fn is_template(s: &str) -> bool {
    NAMESPACES.iter().any(|n| s.contains(&format!("${{{n}")))
}

/// `s` with every reference replaced.
pub fn expand(s: &str, ctx: &Context<'_>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(s.len());
    for piece in parse(s)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Ref(r) => {
                let value = match &r {
                    Reference::AgentId => Some(ctx.agent.as_str()),
                    Reference::Label(k) => ctx.labels.get(k).map(String::as_str),
                    Reference::Value(k) => ctx.values.get(k).map(String::as_str),
                };
                match value {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(ExpandError::Unresolved(Unresolved {
                            agent: ctx.agent.clone(),
                            reference: r,
                        }));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error(transparent)]
    Unresolved(#[from] Unresolved),
}

/// Whether any string inside `value` is a template.
pub fn has_templates(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => is_template(s),
        serde_json::Value::Array(a) => a.iter().any(has_templates),
        serde_json::Value::Object(o) => o.values().any(has_templates),
        _ => false,
    }
}

/// Checks the syntax of every string inside `value`.
pub fn check(value: &serde_json::Value) -> Result<(), SyntaxError> {
    match value {
        serde_json::Value::String(s) => parse(s).map(drop),
        serde_json::Value::Array(a) => a.iter().try_for_each(check),
        serde_json::Value::Object(o) => o.values().try_for_each(check),
        _ => Ok(()),
    }
}

/// `value` with every string expanded (object keys are left as written).
pub fn expand_value(
    value: &serde_json::Value,
    ctx: &Context<'_>,
) -> Result<serde_json::Value, ExpandError> {
    use serde_json::Value;
    Ok(match value {
        Value::String(s) if is_template(s) => Value::String(expand(s, ctx)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| expand_value(v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), expand_value(v, ctx)?)))
                .collect::<Result<_, ExpandError>>()?,
        ),
        other => other.clone(),
    })
}

/// A stand-in agent for checking a templated spec before any agent exists:
/// every reference resolves to a short plain word, so the spec is parsed and
/// validated as the kind's rules demand (an agent's real values are checked
/// again when its manifest is rendered).
pub fn sample(value: &serde_json::Value) -> Result<serde_json::Value, SyntaxError> {
    check(value)?;
    let mut labels = BTreeMap::new();
    let mut values = BTreeMap::new();
    collect_keys(value, &mut labels, &mut values);
    let agent = AgentId::new("agent").expect("a valid id");
    let ctx = Context {
        agent: &agent,
        labels: &labels,
        values: &values,
    };
    Ok(expand_value(value, &ctx).expect("every reference has a sample"))
}

fn collect_keys(
    value: &serde_json::Value,
    labels: &mut BTreeMap<String, String>,
    values: &mut BTreeMap<String, String>,
) {
    match value {
        serde_json::Value::String(s) => {
            for r in references(s).unwrap_or_default() {
                match r {
                    // One stand-in per key, so two resources that differ
                    // only in their references do not look like one target.
                    Reference::Label(k) => {
                        let v = format!("label-{}", k.replace('/', "-"));
                        labels.insert(k, v);
                    }
                    Reference::Value(k) => {
                        let v = format!("value-{k}");
                        values.insert(k, v);
                    }
                    Reference::AgentId => {}
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_keys(v, labels, values)),
        serde_json::Value::Object(o) => o.values().for_each(|v| collect_keys(v, labels, values)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx<'a>(
        agent: &'a AgentId,
        labels: &'a BTreeMap<String, String>,
        values: &'a BTreeMap<String, String>,
    ) -> Context<'a> {
        Context {
            agent,
            labels,
            values,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn expands_agent_labels_and_values() {
        let a = AgentId::new("pi-7").unwrap();
        let labels = map(&[("site", "berlin"), ("example.com/rack", "r2")]);
        let values = map(&[("cert", "/etc/ssl/pi-7.pem")]);
        let c = ctx(&a, &labels, &values);
        assert_eq!(
            expand(
                "/srv/${labels.site}/${agent.id}-${labels.example.com/rack}",
                &c
            )
            .unwrap(),
            "/srv/berlin/pi-7-r2"
        );
        assert_eq!(
            expand("cert=${values.cert}", &c).unwrap(),
            "cert=/etc/ssl/pi-7.pem"
        );
        assert_eq!(expand("plain", &c).unwrap(), "plain");
    }

    #[test]
    fn foreign_dollar_braces_stay_and_double_dollar_escapes() {
        let a = AgentId::new("pi-7").unwrap();
        let none = BTreeMap::new();
        let c = ctx(&a, &none, &none);
        assert_eq!(
            expand("echo ${HOME} ${PATH:-/bin}", &c).unwrap(),
            "echo ${HOME} ${PATH:-/bin}"
        );
        assert_eq!(
            expand("literal $${agent.id} is ${agent.id}", &c).unwrap(),
            "literal ${agent.id} is pi-7"
        );
        assert_eq!(expand("$$${agent.id}", &c).unwrap(), "$${agent.id}");
        // `$${` before anything but our namespaces is not an escape.
        assert_eq!(
            expand("for i: $${i} $${HOME}", &c).unwrap(),
            "for i: $${i} $${HOME}"
        );
        assert_eq!(expand("cost: $5 {x}", &c).unwrap(), "cost: $5 {x}");
    }

    #[test]
    fn a_missing_label_or_value_is_unresolved_for_that_agent() {
        let a = AgentId::new("pi-7").unwrap();
        let none = BTreeMap::new();
        let c = ctx(&a, &none, &none);
        let e = expand("${labels.site}", &c).unwrap_err();
        assert_eq!(
            e,
            ExpandError::Unresolved(Unresolved {
                agent: a.clone(),
                reference: Reference::Label("site".into())
            })
        );
        assert_eq!(e.to_string(), "${labels.site} is not set for agent pi-7");
        assert!(matches!(
            expand("${values.x}", &c),
            Err(ExpandError::Unresolved(_))
        ));
    }

    #[test]
    fn malformed_references_are_syntax_errors() {
        assert!(matches!(
            references("a ${agent.id"),
            Err(SyntaxError::Unterminated(_))
        ));
        assert!(matches!(
            references("${agent.name}"),
            Err(SyntaxError::UnknownAgentField(_))
        ));
        assert!(matches!(
            references("${labels.}"),
            Err(SyntaxError::EmptyKey(_))
        ));
        assert_eq!(
            references("${agent.id}${values.v}").unwrap(),
            vec![Reference::AgentId, Reference::Value("v".into())]
        );
    }

    #[test]
    fn json_values_expand_strings_only_and_samples_resolve_everything() {
        let spec = json!({"path": "/srv/${agent.id}.conf", "mode": 420,
            "env": {"SITE": "${labels.site}"}, "args": ["${values.a}", "x"]});
        assert!(has_templates(&spec));
        assert!(!has_templates(&json!({"path": "/srv/x"})));
        assert!(!has_templates(&json!({"content": "echo ${HOME} $${i}"})));
        assert!(has_templates(&json!({"content": "$${agent.id}"})));
        let a = AgentId::new("pi-1").unwrap();
        let labels = map(&[("site", "s1")]);
        let values = map(&[("a", "va")]);
        let out = expand_value(&spec, &ctx(&a, &labels, &values)).unwrap();
        assert_eq!(
            out,
            json!({"path": "/srv/pi-1.conf", "mode": 420,
            "env": {"SITE": "s1"}, "args": ["va", "x"]})
        );
        let s = sample(&spec).unwrap();
        assert_eq!(s["path"], "/srv/agent.conf");
        assert_eq!(s["env"]["SITE"], "label-site");
        assert_eq!(s["args"][0], "value-a");
        assert!(sample(&json!({"p": "${agent.nope}"})).is_err());
    }
}
