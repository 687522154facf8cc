//! `flotilla apply`: parse and validate a deployment document, then
//! compare-and-swap it into `deployments.<name>`.
//!
//! An apply that loses the race (someone else wrote the key since it was
//! read, or since `--expect-revision`) fails with [`CliError::Conflict`] and
//! never retries over the other operator's change.

use std::io::Read;
use std::path::Path;

use async_nats::jetstream::kv;
use manifest_types::{ChangeNote, Deployment, keys};
use serde::Serialize;

use crate::args::{ApplyArgs, Format, GlobalArgs};
use crate::exit::CliError;
use crate::kv::Fleet;
use crate::output;
use crate::wait::{self, Reporter};

/// What the write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ApplyDoc<'a> {
    name: &'a str,
    revision: u64,
    result: Outcome,
}

pub async fn run(g: &GlobalArgs, args: &ApplyArgs) -> Result<(), CliError> {
    let mut deployment = load(&args.file)?;
    deployment.change = Some(ChangeNote {
        by: Some(who(g.nats.creds.as_deref())),
        cause: args.cause.clone(),
    });
    let fleet = Fleet::open_or_create(g).await?;
    let (outcome, revision) = write(&fleet, &deployment, args.expect_revision).await?;
    match g.output {
        Format::Table => println!(
            "{}: {} (revision {revision})",
            deployment.name,
            outcome.as_str()
        ),
        format => print!(
            "{}",
            output::document(
                format,
                &ApplyDoc {
                    name: deployment.name.as_str(),
                    revision,
                    result: outcome,
                }
            )?
        ),
    }
    if args.wait {
        let reporter = Reporter {
            to_stderr: g.output != Format::Table,
        };
        wait::wait(
            &fleet,
            &deployment.name,
            revision,
            args.timeout,
            &g.thresholds(),
            &reporter,
        )
        .await?;
    }
    Ok(())
}

/// Who makes a change, for the deployment's history (`rollout history`'s
/// BY): with a credentials file (`--creds`, which wins over every other
/// authentication), the `name` of its user JWT, the identity the server
/// checked; else `FLOTILLA_USER`, else `<user>@<host>` from the environment
/// and `/etc/hostname`.
pub fn who(creds: Option<&Path>) -> String {
    let named = creds
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| crate::authority::creds_user_name(&text));
    if let Some(name) = named {
        return name;
    }
    if let Ok(u) = std::env::var("FLOTILLA_USER")
        && !u.is_empty()
    {
        return u;
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

/// Reads and validates the document at `path` (`-`: stdin).
pub fn load(path: &Path) -> Result<Deployment, CliError> {
    let (origin, value) = load_value(path)?;
    if !value.is_object() {
        return Err(CliError::InvalidDocument {
            origin,
            message: "expected a mapping with apiVersion, kind, name, selector and resources"
                .into(),
        });
    }
    Deployment::from_value(value).map_err(|e| CliError::InvalidDocument {
        origin,
        message: e.to_string(),
    })
}

/// Reads the YAML or JSON document at `path` (`-`: stdin) into a JSON
/// value, with the name it came from.
pub fn load_value(path: &Path) -> Result<(String, serde_json::Value), CliError> {
    let origin = path.display().to_string();
    let mut text = String::new();
    let read = if origin == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    read.map_err(|e| CliError::Io {
        context: format!("cannot read {origin}"),
        source: e,
    })?;
    let json = path.extension().is_some_and(|e| e == "json");
    let value = parse_value(&origin, &text, json)?;
    Ok((origin, value))
}

/// Parses YAML (or JSON) into a JSON value, then validates it with
/// [`Deployment::from_value`] so every error is the contract's own.
pub fn parse(origin: &str, text: &str, json: bool) -> Result<Deployment, CliError> {
    let invalid = |message: String| CliError::InvalidDocument {
        origin: origin.to_owned(),
        message,
    };
    let value = parse_value(origin, text, json)?;
    if !value.is_object() {
        return Err(invalid(
            "expected a mapping with apiVersion, kind, name, selector and resources".into(),
        ));
    }
    Deployment::from_value(value).map_err(|e| invalid(e.to_string()))
}

/// YAML 1.2 (or JSON) text into a JSON value.
pub fn parse_value(origin: &str, text: &str, json: bool) -> Result<serde_json::Value, CliError> {
    let invalid = |message: String| CliError::InvalidDocument {
        origin: origin.to_owned(),
        message,
    };
    if text.trim().is_empty() {
        return Err(invalid("empty document".into()));
    }
    let value: serde_json::Value = if json || text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| invalid(format!("not valid JSON: {e}")))?
    } else {
        // YAML 1.2 scalars: `mode: 0644` stays the string "0644", and `no`
        // is a string, not a boolean.
        let options = serde_saphyr::options! {
            leading_zero_numbers_as_strings: true,
            strict_booleans: true,
        };
        serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| invalid(format!("not valid YAML: {e}")))?
    };
    Ok(value)
}

/// Writes `d` to `deployments.<name>` with compare-and-swap: create when
/// absent, update at the revision read (or `expect`). Identical content at
/// the expected revision writes nothing.
pub async fn write(
    fleet: &Fleet,
    d: &Deployment,
    expect: Option<u64>,
) -> Result<(Outcome, u64), CliError> {
    let key = keys::deployment(&d.name);
    let live = fleet.entry(&key).await?;
    if let Some(e) = &live
        && expect.is_none_or(|x| x == e.revision)
        && Deployment::from_json(&e.value).is_ok_and(|stored| stored.same_intent(d))
    {
        return Ok((Outcome::Unchanged, e.revision));
    }
    let bytes = d.to_json().into();
    let base = expect.or(live.as_ref().map(|e| e.revision)).unwrap_or(0);
    let outcome = if live.is_some() {
        Outcome::Configured
    } else {
        Outcome::Created
    };
    let written = if base == 0 {
        fleet.store.create(&key, bytes).await.map_err(|e| {
            if e.kind() == kv::CreateErrorKind::AlreadyExists {
                None
            } else {
                Some(CliError::nats(format!("cannot create {key}"), e))
            }
        })
    } else {
        fleet.store.update(&key, bytes, base).await.map_err(|e| {
            if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                None
            } else {
                Some(CliError::nats(format!("cannot update {key}"), e))
            }
        })
    };
    match written {
        Ok(revision) => Ok((outcome, revision)),
        Err(Some(e)) => Err(e),
        Err(None) => Err(conflict(fleet, &key, base).await),
    }
}

/// The error for a lost compare-and-swap, naming the revision now stored.
async fn conflict(fleet: &Fleet, key: &str, expected: u64) -> CliError {
    let now = match fleet.raw_entry(key).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => {
            format!("it is at revision {}", e.revision)
        }
        Ok(Some(e)) => format!("it was deleted (KV sequence {})", e.revision),
        Ok(None) => "it does not exist".into(),
        Err(_) => "its current revision could not be read".into(),
    };
    let expected = if expected == 0 {
        "expected it not to exist".to_owned()
    } else {
        format!("expected revision {expected}")
    };
    CliError::Conflict(format!(
        "conflict: {key} was changed by someone else ({expected}, {now}); nothing was written. \
         Review it with `flotilla describe deployment`, then apply again."
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = include_str!("../../examples/hello.yaml");

    #[test]
    fn the_example_parses() {
        let d = parse("hello.yaml", HELLO, false).unwrap();
        assert_eq!(d.name.as_str(), "hello");
        assert_eq!(d.resources.len(), 2);
        assert_eq!(d.selector.match_labels["role"], "kiosk");
    }

    #[test]
    fn every_example_parses_with_typed_specs() {
        for (name, doc, kinds) in [
            (
                "web.yaml",
                include_str!("../../examples/web.yaml"),
                vec!["File", "Container"],
            ),
            (
                "sensor.yaml",
                include_str!("../../examples/sensor.yaml"),
                vec!["File", "SystemdUnit"],
            ),
            (
                "health-report.yaml",
                include_str!("../../examples/health-report.yaml"),
                vec!["SystemdUnit", "SystemdUnit"],
            ),
            (
                "per-device.yaml",
                include_str!("../../examples/per-device.yaml"),
                vec!["File"],
            ),
            (
                "staged.yaml",
                include_str!("../../examples/staged.yaml"),
                vec!["File"],
            ),
        ] {
            let d = parse(name, doc, false).unwrap_or_else(|e| panic!("{name}: {e}"));
            let got: Vec<&str> = d.resources.iter().map(|r| r.spec.kind_str()).collect();
            assert_eq!(got, kinds, "{name}");
            for r in &d.resources {
                assert!(
                    !matches!(r.spec, manifest_types::ResourceSpec::Unsupported(_)),
                    "{name}: {} has an unknown field: {:?}",
                    r.id,
                    r.spec
                );
            }
        }
    }

    #[test]
    fn yaml_and_json_give_the_same_document() {
        let from_yaml = parse("hello.yaml", HELLO, false).unwrap();
        let json = String::from_utf8(from_yaml.to_json()).unwrap();
        assert_eq!(parse("hello.json", &json, true).unwrap(), from_yaml);
        assert_eq!(parse("-", &json, false).unwrap(), from_yaml);
    }

    #[test]
    fn unquoted_octal_mode_is_read_as_written() {
        let doc = "apiVersion: flotilla.dev/v1\nkind: Deployment\nname: m\n\
                   selector: {agents: [pi-1]}\nresources:\n\
                   - id: f\n  kind: File\n  spec: {path: /etc/x, content: \"\", mode: 0640}\n";
        let d = parse("m.yaml", doc, false).unwrap();
        let spec = d.resources[0].spec.normalised();
        assert_eq!(spec["mode"], "0640");
    }

    #[test]
    fn invalid_documents_name_their_origin() {
        let cases = [
            ("", "empty document"),
            ("- a\n- b\n", "expected a mapping"),
            ("a: [unclosed\n", "not valid YAML"),
            ("{\"a\": ", "not valid JSON"),
            (
                "apiVersion: flotilla.dev/v1\nname: x\nselector: {}\nresources: []\n",
                "selects nothing",
            ),
        ];
        for (doc, want) in cases {
            let err = parse("bad.yaml", doc, false).unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let msg = err.to_string();
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert!(msg.contains(want), "{doc:?}: {msg}");
        }
    }
}
