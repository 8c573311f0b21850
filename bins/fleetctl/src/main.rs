//! `fleetctl`: the operator's command line.
//!
//! Release keys and manifest signing work offline, with no control plane:
//!
//! ```sh
//! fleetctl keys generate --out release-key        # writes release-key (0600) and release-key.pub
//! fleetctl release sign --key release-key manifest.json > signed.json
//! fleetctl release verify --public-key "$(cat release-key.pub)" signed.json
//! ```
//!
//! The control-plane commands take `--url` (`FLEET_URL`) and `--token` (`FLEET_TOKEN`):
//!
//! ```sh
//! fleetctl release create signed.json
//! fleetctl rollout create --release 1 --channel stable --batch-size 2
//! fleetctl rollout watch 1
//! fleetctl rollout advance 1
//! fleetctl alerts --level critical
//! fleetctl alerts ack 12
//! ```

mod alerts;
mod api;
mod installations;

mod remote;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleet_core::manifest::ReleaseManifest;
use fleet_core::validate::{Limits, Path as FieldPath, Validate, ValidationErrors};
use fleet_core::{ManifestVerifier, PrivateKey, PublicKey};

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate a fleet: release keys, signed manifests, rollouts, plugins, restores, alerts, enrollment, remote commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ed25519 keys that sign release manifests.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Sign and verify release manifests; publish and list releases.
    Release {
        #[command(subcommand)]
        command: ReleaseCommand,
    },
    /// Roll releases out in batches: create, advance, pause, resume, cancel, watch.
    Rollout {
        #[command(flatten)]
        conn: api::Conn,
        #[command(subcommand)]
        command: api::RolloutCommand,
    },
    /// The plugin marketplace: releases, requests, approval or rejection, rollouts.
    Plugin {
        #[command(flatten)]
        conn: api::Conn,
        #[command(subcommand)]
        command: api::PluginCommand,
    },
    /// Restore verification: schedule, list and cancel.
    Restore {
        #[command(flatten)]
        conn: api::Conn,
        #[command(subcommand)]
        command: api::RestoreCommand,
    },
    /// The fleet's alerts, newest first, one line each; `alerts ack ID` acknowledges one.
    Alerts {
        #[command(flatten)]
        conn: api::Conn,
        #[command(flatten)]
        filters: alerts::AlertFilters,
        #[command(subcommand)]
        command: Option<alerts::AlertsCommand>,
    },
    /// The installations, one line each; `installations show ID` shows one, `installations
    /// archive ID` archives one.
    Installations {
        #[command(flatten)]
        conn: api::Conn,
        #[command(flatten)]
        filters: installations::InstallationFilters,
        #[command(subcommand)]
        command: Option<installations::InstallationsCommand>,
    },
    /// Create a one-time enrollment token and print the agent's install snippet.
    Enroll(remote::EnrollArgs),
    /// Run a program on instances and stream its output: `fleetctl run --target ID -- CMD ARGS`.
    Run(remote::RunArgs),
    /// Deploy (or stop) a compose project on instances.
    Deploy(remote::DeployArgs),
    /// Send any command type and wait for every target:
    /// `fleetctl send --target ID UpdateAgent '{"version": "1.4.0", "url": "https://…"}'`.
    Send(remote::SendArgs),
    /// Submitted commands: list, show one, cancel.
    Commands {
        #[command(flatten)]
        conn: api::Conn,
        #[command(subcommand)]
        command: api::CommandsCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Generate a key pair: the private key goes to FILE (mode 0600), the public key to
    /// FILE.pub and to standard output.
    Generate {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Sign a manifest JSON file and print the signed manifest.
    Sign {
        /// Private key file written by `fleetctl keys generate`.
        #[arg(long, env = "FLEET_RELEASE_KEY_FILE")]
        key: PathBuf,
        /// The manifest: {version, sha, channel, migrations_required, breaking_changes, released_at, artifacts?}.
        manifest: PathBuf,
    },
    /// Verify a signed manifest against one or more public keys.
    Verify {
        /// Base64 public key (repeat for several).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<String>,
        /// The signed manifest.
        manifest: PathBuf,
    },
    /// Publish a signed manifest to the control plane (admin).
    Create {
        #[command(flatten)]
        conn: api::Conn,
        /// The signed manifest (`fleetctl release sign` output).
        manifest: PathBuf,
    },
    /// List the control plane's releases.
    List {
        #[command(flatten)]
        conn: api::Conn,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fleetctl: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Keys {
            command: KeysCommand::Generate { out },
        } => generate(&out),
        Command::Release {
            command: ReleaseCommand::Sign { key, manifest },
        } => sign(&key, &manifest),
        Command::Release {
            command:
                ReleaseCommand::Verify {
                    public_keys,
                    manifest,
                },
        } => verify(&public_keys, &manifest),
        Command::Release {
            command: ReleaseCommand::Create { conn, manifest },
        } => api::release_create(&api::Client::new(conn)?, &read_json(&manifest)?),
        Command::Release {
            command: ReleaseCommand::List { conn },
        } => api::release_list(&api::Client::new(conn)?),
        Command::Rollout { conn, command } => api::rollout(&api::Client::new(conn)?, command),
        Command::Plugin { conn, command } => api::plugin(&api::Client::new(conn)?, command),
        Command::Restore { conn, command } => api::restore(&api::Client::new(conn)?, command),
        Command::Alerts {
            conn,
            filters,
            command,
        } => alerts::alerts(&api::Client::new(conn)?, filters, command),
        Command::Installations {
            conn,
            filters,
            command,
        } => installations::installations(&api::Client::new(conn)?, filters, command),
        Command::Enroll(args) => remote::enroll(args),
        Command::Run(args) => remote::run(args),
        Command::Deploy(args) => remote::deploy(args),
        Command::Send(args) => remote::send(args),
        Command::Commands { conn, command } => api::commands(&api::Client::new(conn)?, command),
    }
}

fn generate(out: &Path) -> Result<(), String> {
    if out.exists() {
        return Err(format!(
            "{} exists; refusing to overwrite a key",
            out.display()
        ));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness from the OS: {e}"))?;
    let key = PrivateKey::from_seed(seed);
    write_private(out, &key.to_base64())?;
    let public = key.public_key().to_base64();
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    std::fs::write(&pub_path, format!("{public}\n"))
        .map_err(|e| format!("write {}: {e}", pub_path.display()))?;
    println!("{public}");
    eprintln!(
        "private key: {} (keep it offline)\npublic key: {}",
        out.display(),
        pub_path.display()
    );
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    file.write_all(format!("{text}\n").as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
}

fn sign(key_path: &Path, manifest_path: &Path) -> Result<(), String> {
    let key_text = std::fs::read_to_string(key_path)
        .map_err(|e| format!("read {}: {e}", key_path.display()))?;
    let key =
        PrivateKey::from_base64(&key_text).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let value = read_json(manifest_path)?;
    // Refuse to sign what no agent would accept.
    let manifest: ReleaseManifest = serde_json::from_value(value.clone())
        .map_err(|e| format!("{} is not a release manifest: {e}", manifest_path.display()))?;
    let mut errors = ValidationErrors::default();
    manifest.validate(&Limits::default(), &FieldPath::Root, &mut errors);
    if !errors.is_empty() {
        return Err(format!("{}: {errors}", manifest_path.display()));
    }
    let signed = key.sign_value(&value).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&signed).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn verify(public_keys: &[String], manifest_path: &Path) -> Result<(), String> {
    let keys = public_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| format!("--public-key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let signed = ManifestVerifier::new(keys)
        .verify_value(&read_json(manifest_path)?)
        .map_err(|e| e.to_string())?;
    println!(
        "ok: {} {} ({})",
        signed.manifest.version, signed.manifest.channel, signed.manifest.sha
    );
    Ok(())
}
