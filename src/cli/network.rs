//! `vxnet network …`: create, ls, inspect, rm — Docker's verbs and output.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::ExitCode;

use clap::Subcommand;
use ipnet::Ipv4Net;

use crate::api::client::Client;
use crate::cluster::NetworkCreate;
use crate::format::network_table;

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Create a global overlay network, visible on every host.
    Create {
        /// Network driver (only `overlay`).
        #[arg(short, long, default_value = "overlay")]
        driver: String,
        /// Subnet in CIDR form, e.g. 10.0.4.0/24 (default: the first free 10.x.y.0/24).
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address (default: the subnet's first address).
        #[arg(long)]
        gateway: Option<String>,
        /// Allocate container addresses from this sub-range only.
        #[arg(long)]
        ip_range: Option<String>,
        /// VXLAN network identifier (default: the lowest free from 256).
        #[arg(long)]
        vni: Option<u32>,
        /// Overlay MTU (default: each host's underlay MTU minus 50).
        #[arg(long)]
        mtu: Option<u32>,
        /// Metadata, KEY=VALUE; repeat for more.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Restrict external access: containers get no gateway bridge interface (eth1).
        #[arg(long)]
        internal: bool,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        /// Output format: `json` for scripts.
        #[arg(long)]
        format: Option<String>,
        /// Only network IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Full network IDs.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show networks in detail (JSON), with their endpoints on every host.
    Inspect {
        #[arg(required = true)]
        networks: Vec<String>,
    },
    /// Connect a container to a network.
    Connect {
        /// Address on that network (default: the next free one).
        #[arg(long)]
        ip: Option<String>,
        /// Another name for the container on this network's DNS; repeatable.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        network: String,
        container: String,
    },
    /// Disconnect a container from a network.
    Disconnect { network: String, container: String },
    /// Remove networks (refused while endpoints are attached).
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

fn parse_net(flag: &str, s: &str) -> anyhow::Result<Ipv4Net> {
    s.parse().map_err(|_| {
        anyhow::anyhow!("invalid {flag} {s:?}: use IPv4 CIDR notation such as 10.0.4.0/24")
    })
}

fn parse_ip(flag: &str, s: &str) -> anyhow::Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| anyhow::anyhow!("invalid {flag} {s:?}: use an IPv4 address such as 10.0.4.1"))
}

pub async fn run(client: &Client, cmd: NetworkCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworkCommand::Create {
            driver,
            subnet,
            gateway,
            ip_range,
            vni,
            mtu,
            labels,
            internal,
            name,
        } => {
            let mut label_map = BTreeMap::new();
            for l in labels {
                let (k, v) = l.split_once('=').unwrap_or((l.as_str(), ""));
                label_map.insert(k.to_string(), v.to_string());
            }
            let req = NetworkCreate {
                name,
                driver: Some(driver),
                subnet: subnet
                    .as_deref()
                    .map(|s| parse_net("--subnet", s))
                    .transpose()?,
                gateway: gateway
                    .as_deref()
                    .map(|s| parse_ip("--gateway", s))
                    .transpose()?,
                ip_range: ip_range
                    .as_deref()
                    .map(|s| parse_net("--ip-range", s))
                    .transpose()?,
                vni,
                mtu,
                labels: label_map,
                internal,
            };
            let net = client.network_create(&req).await?;
            println!("{}", net.id);
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Ls {
            format,
            quiet,
            no_trunc,
        } => {
            let nets = client.network_ls().await?;
            match format.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&nets)?),
                Some(other) => anyhow::bail!("unknown --format {other:?}: use json"),
                None if quiet => {
                    for n in &nets {
                        println!(
                            "{}",
                            if no_trunc {
                                n.id.as_str()
                            } else {
                                n.id.short()
                            }
                        );
                    }
                }
                None => print!("{}", network_table(&nets, no_trunc)),
            }
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Inspect { networks } => {
            let mut found = Vec::new();
            let mut failed = Vec::new();
            for n in &networks {
                match client.network_inspect(n).await {
                    Ok(i) => found.push(i),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            println!("{}", serde_json::to_string_pretty(&found)?);
            for f in &failed {
                eprintln!("{f}");
            }
            Ok(if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        NetworkCommand::Connect {
            ip,
            aliases,
            network,
            container,
        } => {
            let ip = ip.as_deref().map(|s| parse_ip("--ip", s)).transpose()?;
            client
                .network_connect(
                    &container,
                    &crate::container::ConnectRequest {
                        network,
                        ip,
                        aliases,
                    },
                )
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Disconnect { network, container } => {
            client.network_disconnect(&container, &network).await?;
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Rm { networks } => {
            super::for_each(&networks, |n| async move { client.network_rm(&n).await }).await
        }
    }
}
