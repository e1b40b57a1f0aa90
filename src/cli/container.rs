//! `vxnet run`, `exec`, `ps`, `stop`, `rm`: containers as network + UTS namespaces running one
//! command. The daemon prepares the namespace and its interfaces; this process starts the
//! command inside it, so the command keeps this terminal.

use std::ffi::CString;
use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, Stdio};

use anyhow::{bail, Context};
use clap::Args;

use crate::api::client::Client;
use crate::container::record::{ContainerRecord, ContainerState};
use crate::container::CreateRequest;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Container name (default: the short ID).
    #[arg(long)]
    name: Option<String>,
    /// Network to connect to (name or ID).
    #[arg(long = "net", alias = "network")]
    net: String,
    /// Address on that network (default: the next free one).
    #[arg(long)]
    ip: Option<String>,
    /// Run in the background and print the container ID.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Keep stdin attached.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// The command uses this terminal (stdin must be a TTY).
    #[arg(short = 't', long)]
    tty: bool,
    /// Remove the container when its command exits.
    #[arg(long)]
    rm: bool,
    /// Host name inside the container (default: the short ID).
    #[arg(long)]
    hostname: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[arg(short = 'i', long)]
    interactive: bool,
    #[arg(short = 't', long)]
    tty: bool,
    container: String,
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show exited containers too.
    #[arg(short, long)]
    all: bool,
    /// Only IDs.
    #[arg(short, long)]
    quiet: bool,
    /// Output format: `json` for scripts.
    #[arg(long)]
    format: Option<String>,
}

/// Namespaces to enter and a hostname to set, prepared before fork so that the child does
/// nothing but system calls between fork and exec.
struct Enter {
    net: File,
    uts: Option<File>,
    hostname: Option<CString>,
    die_with_parent: bool,
    new_session: bool,
}

fn command_in(enter: Enter, argv: &[String]) -> anyhow::Result<tokio::process::Command> {
    let (program, args) = argv.split_first().context("no command given")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe system calls (setns, unshare, sethostname, prctl,
    // setsid) on fds and a string prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(enter.net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match &enter.uts {
                Some(uts) => {
                    if libc::setns(uts.as_raw_fd(), libc::CLONE_NEWUTS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                None => {
                    if libc::unshare(libc::CLONE_NEWUTS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some(h) = &enter.hostname {
                if libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if enter.die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if enter.new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    }
}

fn check_tty(tty: bool) -> anyhow::Result<()> {
    if tty && !std::io::stdin().is_terminal() {
        bail!("the input device is not a TTY: drop -t, or run from a terminal");
    }
    Ok(())
}

pub async fn run(client: &Client, args: RunArgs) -> anyhow::Result<ExitCode> {
    check_tty(args.tty)?;
    let ip = match &args.ip {
        Some(s) => Some(
            s.parse()
                .map_err(|_| anyhow::anyhow!("invalid --ip {s:?}: use an IPv4 address"))?,
        ),
        None => None,
    };
    let record = client
        .container_create(&CreateRequest {
            name: args.name.clone(),
            network: args.net.clone(),
            ip,
            hostname: args.hostname.clone(),
            command: args.command.clone(),
            auto_remove: args.rm,
        })
        .await?;
    let started = start_process(client, &record, &args).await;
    let mut child = match started {
        Ok(child) => child,
        Err(e) => {
            // Nothing half-made: the daemon drops the container and its endpoint.
            let _ = client.container_rm(record.id.as_str(), true).await;
            return Err(e);
        }
    };
    if args.detach {
        println!("{}", record.id);
        return Ok(ExitCode::SUCCESS);
    }
    let status = child
        .wait()
        .await
        .context("waiting for the container's command")?;
    Ok(exit_code(status))
}

async fn start_process(
    client: &Client,
    record: &ContainerRecord,
    args: &RunArgs,
) -> anyhow::Result<tokio::process::Child> {
    let net = File::open(&record.netns).with_context(|| {
        format!(
            "cannot open the container's namespace {}",
            record.netns.display()
        )
    })?;
    let enter = Enter {
        net,
        uts: None,
        hostname: Some(CString::new(record.hostname.clone()).context("hostname holds a NUL byte")?),
        die_with_parent: !args.detach,
        new_session: args.detach,
    };
    let mut cmd = command_in(enter, &args.command)?;
    if args.detach {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else if !(args.interactive || args.tty) {
        cmd.stdin(Stdio::null());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", args.command[0]))?;
    let pid = child
        .id()
        .context("the command exited before it could be registered")?;
    if let Err(e) = client.container_start(record.id.as_str(), pid).await {
        let _ = child.start_kill();
        return Err(e.into());
    }
    Ok(child)
}

pub async fn exec(client: &Client, args: ExecArgs) -> anyhow::Result<ExitCode> {
    check_tty(args.tty)?;
    let record = client.container(&args.container).await?;
    let Some(pid) = record.pid() else {
        bail!(
            "Error response from daemon: container {} is not running",
            record.name
        );
    };
    let net = File::open(format!("/proc/{pid}/ns/net")).with_context(|| {
        format!(
            "container {} is not running (process {pid} gone)",
            record.name
        )
    })?;
    let uts = File::open(format!("/proc/{pid}/ns/uts")).with_context(|| {
        format!(
            "container {} is not running (process {pid} gone)",
            record.name
        )
    })?;
    let enter = Enter {
        net,
        uts: Some(uts),
        hostname: None,
        die_with_parent: true,
        new_session: false,
    };
    let mut cmd = command_in(enter, &args.command)?;
    if !(args.interactive || args.tty) {
        cmd.stdin(Stdio::null());
    }
    let status = cmd
        .spawn()
        .with_context(|| format!("cannot start {:?}", args.command[0]))?
        .wait()
        .await?;
    Ok(exit_code(status))
}

fn status_text(r: &ContainerRecord) -> String {
    match &r.state {
        ContainerState::Created => "Created".into(),
        ContainerState::Running { pid, .. } => format!("Up (pid {pid})"),
        ContainerState::Exited { at } => format!("Exited {at}"),
    }
}

pub async fn ps(client: &Client, args: PsArgs) -> anyhow::Result<ExitCode> {
    let mut list = client.containers().await?;
    if !args.all {
        list.retain(|r| !matches!(r.state, ContainerState::Exited { .. }));
    }
    match args.format.as_deref() {
        Some("json") => println!("{}", serde_json::to_string_pretty(&list)?),
        Some(other) => bail!("unknown --format {other:?}: use json"),
        None if args.quiet => {
            for r in &list {
                println!("{}", r.id.short());
            }
        }
        None => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|r| {
                    vec![
                        r.id.short().to_string(),
                        r.name.clone(),
                        format!("{:?}", r.command.join(" ")),
                        status_text(r),
                        r.attachments
                            .iter()
                            .map(|a| format!("{}:{}", a.network_name, a.ip))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            print!(
                "{}",
                crate::format::table(
                    &["CONTAINER ID", "NAME", "COMMAND", "STATUS", "NETWORKS"],
                    &rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(client: &Client, time: u64, containers: &[String]) -> anyhow::Result<ExitCode> {
    each(containers, |c| async move {
        client.container_stop(&c, time).await.map(drop)
    })
    .await
}

pub async fn rm(client: &Client, force: bool, containers: &[String]) -> anyhow::Result<ExitCode> {
    each(containers, |c| async move {
        client.container_rm(&c, force).await
    })
    .await
}

/// Runs `f` for each name, printing the name on success and the error otherwise (Docker's
/// way for multi-argument verbs); exit 1 if any failed.
async fn each<F, Fut>(names: &[String], f: F) -> anyhow::Result<ExitCode>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::api::client::ClientError>>,
{
    let mut ok = true;
    for n in names {
        match f(n.clone()).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
