//! `vxnet events`: the cluster's changes as this host's daemon sees them, like
//! `docker events` (one line each, or one JSON object each with `--format json`).

use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;

use crate::api::client::Client;
use crate::events::{parse_time, EventFilter, StreamLine};

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Show the daemon's buffered events since this time first: RFC 3339
    /// (2026-12-04T19:00:00Z), Unix seconds, or a duration ago (10m).
    #[arg(long)]
    since: Option<String>,
    /// Stop at this time (same forms); without it, stream until interrupted.
    #[arg(long)]
    until: Option<String>,
    /// Only events matching KEY=VALUE: type=network|endpoint|node|record,
    /// event=create|update|rm|up|down|join|leave|rejected, network=NAME|ID, node=NAME|ID.
    /// Repeat a key for either value; different keys must all match.
    #[arg(short, long = "filter", value_name = "KEY=VALUE")]
    filter: Vec<String>,
    /// Output format: `json` for one JSON object a line.
    #[arg(long)]
    format: Option<String>,
}

pub async fn run(client: &Client, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let json = match args.format.as_deref() {
        None => false,
        Some("json") => true,
        Some(other) => anyhow::bail!("unknown --format {other:?}: use json"),
    };
    let now = SystemTime::now();
    let mut filter = EventFilter::default();
    // Durations are resolved here, against this host's clock, and sent as Unix times.
    if let Some(s) = &args.since {
        filter.since = Some(parse_time(s, now).context("invalid --since")?);
    }
    if let Some(u) = &args.until {
        filter.until = Some(parse_time(u, now).context("invalid --until")?);
    }
    if let (Some(s), Some(u)) = (filter.since, filter.until) {
        anyhow::ensure!(u >= s, "--until is before --since: nothing can match");
    }
    for f in &args.filter {
        filter.add_arg(f)?;
    }
    let mut stream = client.events(&filter).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut out = std::io::stdout().lock();
    loop {
        let line = tokio::select! {
            line = stream.next() => line?,
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        let written = match line {
            None if filter.until.is_some() => return Ok(ExitCode::SUCCESS),
            None => anyhow::bail!(
                "the daemon ended the event stream (stopping?): run `vxnet events` again once it is back"
            ),
            Some(StreamLine::Event(e)) if json => writeln!(out, "{}", serde_json::to_string(&e)?),
            Some(StreamLine::Event(e)) => writeln!(out, "{e}"),
            // A gap is said where the reader looks: in the stream for scripts, on stderr
            // beside the text lines.
            Some(missed @ StreamLine::Missed { .. }) if json => {
                writeln!(out, "{}", serde_json::to_string(&missed)?)
            }
            Some(StreamLine::Missed { message, .. }) => {
                eprintln!("vxnet: {message}");
                Ok(())
            }
        };
        match written {
            Ok(()) => {}
            // `vxnet events | head`: the reader is done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e).context("cannot write the events"),
        }
    }
}
