//! `flotilla keys generate|public|rotate`: the control plane's manifest
//! signing keys (docs/adr/0004 and 0017). A seed is written once, to a file
//! only its owner can read, and is never printed; only public keys are.

use std::io::Write;
use std::path::Path;

use manifest_types::signing::Signer;
use serde_json::json;

use crate::args::{Format, GlobalArgs, KeysAction};
use crate::exit::CliError;

pub fn run(g: &GlobalArgs, action: &KeysAction) -> Result<(), CliError> {
    match action {
        KeysAction::Generate { out } => {
            let public = generate(out)?;
            print_key(g, out, &public);
            Ok(())
        }
        KeysAction::Public { file } => {
            let public = load(file)?.public_key();
            print_key(g, file, &public);
            Ok(())
        }
        KeysAction::Rotate { current, out } => {
            let old = load(current)?.public_key();
            let new = generate(out)?;
            if g.output == Format::Json {
                println!("{}", json!({"current": old, "new": new, "file": out}));
                return Ok(());
            }
            let (c, o) = (current.display(), out.display());
            println!(
                "new signing key {new} written to {o}\n\
                 \n\
                 Move the fleet to it with no downtime:\n\
                 1. Sign with both keys: restart flotilla-control with\n\
                 \x20  --signing-key-file {c} --signing-key-file {o}\n\
                 \x20  (every manifest is re-signed, carrying both signatures).\n\
                 2. Trust the new key on every device: add\n\
                 \x20  --trusted-key {new}   (agent.toml: trusted-keys = [\"{old}\", \"{new}\"])\n\
                 \x20  and restart the agents, at any pace: each accepts either signature.\n\
                 3. Sign with the new key only: restart flotilla-control with\n\
                 \x20  --signing-key-file {o}\n\
                 4. Drop {old} from the devices' trusted keys, then destroy {c}."
            );
            Ok(())
        }
    }
}

fn print_key(g: &GlobalArgs, file: &Path, public: &str) {
    match g.output {
        Format::Json => println!("{}", json!({"publicKey": public, "file": file})),
        _ => println!("{public}"),
    }
}

fn load(file: &Path) -> Result<Signer, CliError> {
    let seed = std::fs::read_to_string(file).map_err(|source| CliError::Io {
        context: format!("cannot read {}", file.display()),
        source,
    })?;
    Signer::from_seed(&seed).map_err(|_| CliError::InvalidDocument {
        origin: file.display().to_string(),
        message: "not an nkey seed".into(),
    })
}

/// Writes a new seed to `out` (created, mode 0600); the public key.
fn generate(out: &Path) -> Result<String, CliError> {
    let (seed, public) = Signer::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let io = |source| CliError::Io {
        context: format!("cannot create {}", out.display()),
        source,
    };
    let mut file = options.open(out).map_err(io)?;
    file.write_all(format!("{seed}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    Ok(public)
}
