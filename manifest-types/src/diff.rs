//! What changes between two revisions of a deployment: resources added,
//! changed (field by field) and removed, the selector and the rollout
//! policy. `flotilla diff` prints it before an apply; the control plane
//! keeps its [`DeploymentDiff::summary`] in each revision's history record.
//! Pure.

use serde::Serialize;
use serde_json::Value;

use crate::deployment::{Deployment, DeploymentResource, Selector};
use crate::ids::LocalId;

/// One field that differs, by its path in the resource (`spec.content`,
/// `spec.env.LOG`, `restartOn`); `None` on a side that lacks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldChange {
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceChange {
    pub id: LocalId,
    pub fields: Vec<FieldChange>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentDiff {
    pub added: Vec<LocalId>,
    pub changed: Vec<ResourceChange>,
    pub removed: Vec<LocalId>,
    /// `(old, new)` when the selector changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<(Selector, Selector)>,
    /// Whether the rollout policy changed.
    pub rollout_changed: bool,
}

/// The resource as written: kind, spec (a template as written), restartOn.
fn wire(r: &DeploymentResource) -> Value {
    let mut v = serde_json::json!({
        "kind": r.spec.kind_str(),
        "spec": r.template.clone().unwrap_or_else(|| r.spec.normalised()),
    });
    if !r.restart_on.is_empty() {
        v["restartOn"] = serde_json::to_value(&r.restart_on).expect("ids serialise");
    }
    v
}

/// Every leaf that differs between `old` and `new`, in path order.
fn fields(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                fields(&p, a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(FieldChange {
            path: path.to_owned(),
            old: a.cloned(),
            new: b.cloned(),
        }),
        _ => {}
    }
}

/// What `new` changes from `old` (`None`: a new deployment, all added).
pub fn diff(old: Option<&Deployment>, new: &Deployment) -> DeploymentDiff {
    let mut out = DeploymentDiff::default();
    let before = |id: &LocalId| old.and_then(|o| o.resources.iter().find(|r| &r.id == id));
    for r in &new.resources {
        match before(&r.id) {
            None => out.added.push(r.id.clone()),
            Some(o) => {
                let mut f = Vec::new();
                fields("", Some(&wire(o)), Some(&wire(r)), &mut f);
                if !f.is_empty() {
                    out.changed.push(ResourceChange {
                        id: r.id.clone(),
                        fields: f,
                    });
                }
            }
        }
    }
    if let Some(o) = old {
        out.removed = o
            .resources
            .iter()
            .filter(|r| !new.resources.iter().any(|n| n.id == r.id))
            .map(|r| r.id.clone())
            .collect();
        if o.selector != new.selector {
            out.selector = Some((o.selector.clone(), new.selector.clone()));
        }
        out.rollout_changed = o.rollout != new.rollout;
    }
    out
}

impl DeploymentDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.selector.is_none()
            && !self.rollout_changed
    }

    /// One line: `~app (spec.image); +conf; -old; selector; rollout policy`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for c in &self.changed {
            let paths: Vec<&str> = c.fields.iter().map(|f| f.path.as_str()).collect();
            parts.push(format!("~{} ({})", c.id, paths.join(", ")));
        }
        parts.extend(self.added.iter().map(|id| format!("+{id}")));
        parts.extend(self.removed.iter().map(|id| format!("-{id}")));
        if self.selector.is_some() {
            parts.push("selector".into());
        }
        if self.rollout_changed {
            parts.push("rollout policy".into());
        }
        if parts.is_empty() {
            "no change".into()
        } else {
            parts.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(selector: Value, resources: Value) -> Deployment {
        Deployment::from_value(
            json!({"apiVersion": crate::API_VERSION, "kind": "Deployment",
            "name": "web", "selector": selector, "resources": resources}),
        )
        .unwrap()
    }

    #[test]
    fn added_changed_and_removed_resources_with_their_fields() {
        let sel = json!({"matchLabels": {"role": "edge"}});
        let old = doc(
            sel.clone(),
            json!([
                {"id": "conf", "kind": "File", "spec": {"path": "/etc/w", "content": "a"}},
                {"id": "old", "kind": "File", "spec": {"path": "/etc/o", "content": ""}},
                {"id": "app", "kind": "Container", "spec": {"image": "web:1", "env": {"A": "1"}}}
            ]),
        );
        let new = doc(
            json!({"matchLabels": {"role": "kiosk"}}),
            json!([
                {"id": "conf", "kind": "File", "spec": {"path": "/etc/w", "content": "a"}},
                {"id": "app", "kind": "Container", "spec": {"image": "web:2", "env": {"A": "1", "B": "2"}},
                 "restartOn": ["conf"]},
                {"id": "new", "kind": "File", "spec": {"path": "/etc/n", "content": ""}}
            ]),
        );
        let d = diff(Some(&old), &new);
        assert_eq!(d.added, vec![LocalId::new("new").unwrap()]);
        assert_eq!(d.removed, vec![LocalId::new("old").unwrap()]);
        assert_eq!(d.changed.len(), 1);
        let paths: Vec<&str> = d.changed[0]
            .fields
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(paths, ["restartOn", "spec.env.B", "spec.image"]);
        assert_eq!(d.changed[0].fields[2].old, Some(json!("web:1")));
        assert_eq!(d.changed[0].fields[2].new, Some(json!("web:2")));
        assert_eq!(d.changed[0].fields[1].old, None);
        assert!(d.selector.is_some());
        assert_eq!(
            d.summary(),
            "~app (restartOn, spec.env.B, spec.image); +new; -old; selector"
        );
        assert!(diff(Some(&new), &new).is_empty());
        assert_eq!(diff(Some(&new), &new).summary(), "no change");
        let first = diff(None, &old);
        assert_eq!(first.added.len(), 3);
        assert!(first.selector.is_none() && first.removed.is_empty());
    }
}
