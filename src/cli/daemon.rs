//! `vxnet daemon`: flags and `/etc/vxnet/daemon.json` (src/config.rs), the logger, reloads on
//! SIGHUP, and the daemon itself.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{reload_plan, ConfigError, Layers, LogConfig, LogFormat, Settings};
use crate::systemd::{notify, Notice};

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// The configuration file: a JSON object whose keys are the flags below without `--`
    /// (a key may not be given both there and as a flag) [default: /etc/vxnet/daemon.json,
    /// none if it does not exist]
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Check the configuration (file and flags) and print it, secrets masked; exit 0 when it
    /// is valid, 1 when not. Starts nothing.
    #[arg(long, conflicts_with = "check_configured")]
    validate: bool,
    /// For systemd's ExecCondition: exit 0 when the configuration names a cluster store and is
    /// valid, 1 when it names none (systemd skips the unit), 255 when it is invalid (the unit
    /// fails, with the reason in the journal). Starts nothing.
    #[arg(long)]
    check_configured: bool,
    #[command(flatten)]
    settings: Settings,
}

type LogHandle = reload::Handle<EnvFilter, Registry>;

pub async fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    if args.check_configured {
        return Ok(check_configured(args.settings, args.config_file));
    }
    let (layers, merged) = Layers::load(args.settings, args.config_file.as_deref())?;
    let resolved = layers.resolve(&merged)?;
    if args.validate {
        println!("configuration OK ({})", layers.path.display());
        println!(
            "{}",
            serde_json::to_string_pretty(&merged.to_masked_json())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let log = init_logging(&resolved.log);
    if layers.file != Settings::default() {
        tracing::info!(file = %layers.path.display(), "configuration file read");
    }
    spawn_reloader(layers, merged, log);
    crate::daemon::run(resolved.daemon, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// `--check-configured`: systemd's ExecCondition reads 1..=254 as "skip" and 255 as "fail".
fn check_configured(flags: Settings, file: Option<PathBuf>) -> ExitCode {
    let result = Layers::load(flags, file.as_deref())
        .and_then(|(layers, merged)| layers.resolve(&merged).map(|_| ()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ ConfigError::NoClusterStore { .. }) => {
            eprintln!("vxnet: not starting: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vxnet: invalid configuration: {e}");
            ExitCode::from(255)
        }
    }
}

fn init_logging(log: &LogConfig) -> LogHandle {
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&log.level));
    let output = match log.format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        // One object per line, the event's fields at the top level beside level and time.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
    handle
}

/// SIGHUP re-reads the configuration file: the log level changes at once; any other changed
/// key is named as needing a restart (the running daemon keeps its value); a file that does
/// not parse or check leaves everything as it was.
fn spawn_reloader(layers: Layers, running: Settings, log: LogHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot handle SIGHUP: configuration reloads are off");
        return;
    };
    tokio::spawn(async move {
        let mut running = running;
        while hup.recv().await.is_some() {
            notify(&[Notice::Reloading]);
            match reload(&layers, &mut running, &log) {
                Ok(status) => notify(&[Notice::Ready, Notice::Status(&status)]),
                Err(e) => {
                    tracing::error!(error = %e, file = %layers.path.display(),
                        "configuration not reloaded: fix the file and send SIGHUP again; running with the previous configuration");
                    notify(&[
                        Notice::Ready,
                        Notice::Status(&format!("reload failed: {e}")),
                    ]);
                }
            }
        }
    });
}

fn reload(layers: &Layers, running: &mut Settings, log: &LogHandle) -> Result<String, ConfigError> {
    let file = Settings::from_file(&layers.path, layers.required)?;
    let merged = Settings::merge(&layers.flags, &file, &layers.path)?;
    let next = Layers {
        file,
        ..layers.clone()
    };
    let resolved = next.resolve(&merged)?;
    let plan = reload_plan(running, &merged);
    for (key, old, new) in &plan.apply {
        if key == "log-level" {
            if let Err(e) = log.reload(EnvFilter::new(&resolved.log.level)) {
                tracing::warn!(error = %e, "cannot change the log level");
                continue;
            }
            running.log_level = merged.log_level.clone();
        }
        tracing::info!(key = %key, old = %old, new = %new, "configuration reloaded: applied");
    }
    for key in &plan.restart {
        tracing::warn!(key = %key, file = %layers.path.display(),
            "configuration changed, but this key takes effect only after a restart (systemctl restart vxnet); the running daemon keeps its old value");
    }
    Ok(match (plan.apply.len(), plan.restart.len()) {
        (0, 0) => {
            tracing::info!(file = %layers.path.display(), "configuration reloaded: nothing changed");
            "configuration reloaded: nothing changed".to_string()
        }
        (_, 0) => "configuration reloaded".to_string(),
        (_, _) => format!(
            "configuration reloaded; needs a restart for: {}",
            plan.restart.join(", ")
        ),
    })
}

/// Registers the SIGTERM/SIGINT handlers now, not when the returned future is first polled:
/// the daemon programs the kernel before it starts serving, and a signal in that window
/// must still mean a clean stop (rules removed), not the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
    async move {
        let Ok((mut term, mut int)) = handlers else {
            // Without signal handlers the daemon still stops on SIGKILL; keep serving.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        notify(&[Notice::Stopping]);
        tracing::info!("shutting down");
    }
}
