//! `vxnet node …`: every host of the cluster and its health, as `docker node ls` shows a
//! swarm's.

use std::process::ExitCode;

use clap::Subcommand;

use crate::api::client::Client;
use crate::format::table;
use crate::health::NodeStatus;

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List every host: name, address, state, lag behind the store, errors.
    #[command(alias = "list")]
    Ls {
        /// Output format: `json` for scripts.
        #[arg(long)]
        format: Option<String>,
        /// Only node IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Full node IDs.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show hosts in detail (JSON): their last health report and what their state means.
    Inspect {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Forget hosts that are gone (down or stopped, lease expired): their health reports.
    Rm {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

pub async fn run(client: &Client, cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCommand::Ls {
            format,
            quiet,
            no_trunc,
        } => {
            let nodes = client.node_ls().await?;
            match format.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&nodes)?),
                Some(other) => anyhow::bail!("unknown --format {other:?}: use json"),
                None if quiet => {
                    for n in &nodes {
                        println!("{}", short(&n.id, no_trunc));
                    }
                }
                None => print!("{}", node_table(&nodes, no_trunc)),
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Inspect { nodes: wanted } => {
            let nodes = client.node_ls().await?;
            let mut found = Vec::new();
            let mut missing = Vec::new();
            for w in &wanted {
                match nodes.iter().find(|n| {
                    &n.id == w || &n.name == w || (w.len() >= 4 && n.id.starts_with(w.as_str()))
                }) {
                    Some(n) => found.push(n.clone()),
                    None => missing.push(w.as_str()),
                }
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
            if !missing.is_empty() {
                eprintln!("Error: no such node: {}", missing.join(", "));
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Rm { nodes } => {
            let mut failed = false;
            for n in &nodes {
                match client.node_rm(n).await {
                    Ok(removed) => println!("{}", printable(&removed.name)),
                    Err(e) => {
                        eprintln!("Error: {e}");
                        failed = true;
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

fn short(id: &str, no_trunc: bool) -> String {
    if no_trunc {
        id.to_string()
    } else {
        id.chars().take(12).collect()
    }
}

/// Names and addresses come from other hosts' records: no terminal control characters.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(64)
        .collect()
}

fn ago(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86_399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

pub fn node_table(nodes: &[NodeStatus], no_trunc: bool) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let mut id = short(&n.id, no_trunc);
            if n.is_self {
                id.push_str(" *");
            }
            vec![
                id,
                printable(&n.name),
                printable(&n.address),
                n.state.clone(),
                n.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                n.errors.to_string(),
                n.report
                    .as_ref()
                    .map(|r| printable(&r.version))
                    .unwrap_or_else(|| "-".into()),
                n.last_seen_secs.map(ago).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "ADDRESS",
            "STATE",
            "LAG",
            "ERRORS",
            "VERSION",
            "LAST REPORT",
        ],
        &rows,
    )
}
