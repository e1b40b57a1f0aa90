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
use crate::container::CreateRequest;
use crate::registry::{ContainerRecord, ContainerState};

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
    /// Publish a port on this host's addresses: HOSTPORT:CONTAINERPORT[/tcp|udp]; repeatable.
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// Another name for the container on the network's DNS; repeatable.
    #[arg(long = "alias", alias = "network-alias")]
    aliases: Vec<String>,
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

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Read end of the pipe on which `run` says "registered, go".
    #[arg(long)]
    ready_fd: i32,
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// Namespaces to enter and a hostname to set, prepared before fork so that the child does
/// nothing but system calls between fork and exec.
struct Enter {
    net: File,
    uts: Option<File>,
    mounts: Mounts,
    hostname: Option<CString>,
    die_with_parent: bool,
    new_session: bool,
    /// An fd the child keeps across exec (the start gate's read end).
    keep_fd: Option<i32>,
}

/// The container's view of /etc/resolv.conf and /etc/hosts.
enum Mounts {
    /// The caller's own (DNS off, or a container from before it).
    Inherit,
    /// A new mount namespace with these files (source, target) bound over /etc's.
    Bind(Vec<(CString, CString)>),
    /// The running container's mount namespace (`exec`).
    Join(File),
}

impl Mounts {
    /// `run`: the record's resolv.conf and hosts over the host's.
    fn for_record(record: &ContainerRecord) -> anyhow::Result<Self> {
        let Some(dir) = &record.etc_dir else {
            return Ok(Mounts::Inherit);
        };
        let mut binds = Vec::new();
        for f in ["resolv.conf", "hosts"] {
            let src = dir.join(f);
            let src = CString::new(src.as_os_str().as_encoded_bytes())
                .context("the container's file path holds a NUL byte")?;
            binds.push((src, CString::new(format!("/etc/{f}"))?));
        }
        Ok(Mounts::Bind(binds))
    }

    /// `exec`: the container's mount namespace, when it has its own.
    fn of_process(pid: u32) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let theirs = File::open(format!("/proc/{pid}/ns/mnt"))
            .with_context(|| format!("cannot open the mount namespace of process {pid}"))?;
        let ours = std::fs::metadata("/proc/self/ns/mnt")?;
        Ok(if theirs.metadata()?.ino() == ours.ino() {
            Mounts::Inherit
        } else {
            Mounts::Join(theirs)
        })
    }
}

/// The container's first program: waits for `run`'s go (so the daemon holds its PID before
/// the user's command can exit), then execs the command under the same PID. EOF instead of
/// a go means `run` gave up: exit without running anything.
pub fn container_init(args: &InitArgs) -> ExitCode {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: `run` passed this fd to us for exactly this read; nothing else owns it.
    let mut gate = unsafe { File::from_raw_fd(args.ready_fd) };
    let mut go = [0u8; 1];
    if !matches!(gate.read(&mut go), Ok(1)) || go[0] != b'1' {
        return ExitCode::FAILURE;
    }
    drop(gate);
    let (program, rest) = match args.command.split_first() {
        Some(p) => p,
        None => return ExitCode::FAILURE,
    };
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!("vxnet: cannot start {program:?}: {err}");
    ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// Whether `program` names an executable file (directly, or found on PATH), so that a
/// typo fails before anything is created.
fn resolve_program(program: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.contains('/') {
        executable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| executable(&d.join(program))))
            .unwrap_or(false)
    };
    if !found {
        bail!("cannot start {program:?}: executable file not found (in $PATH or as given)");
    }
    Ok(())
}

fn command_in(enter: Enter, argv: &[String]) -> anyhow::Result<tokio::process::Command> {
    let (program, args) = argv.split_first().context("no command given")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    // SAFETY: only async-signal-safe system calls (setns, unshare, mount, sethostname,
    // prctl, setsid) on fds and strings prepared before fork.
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
            match &enter.mounts {
                Mounts::Inherit => {}
                Mounts::Join(mnt) => {
                    if libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Mounts::Bind(binds) => {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // Nothing mounted here may reach the host's namespace.
                    let root = c"/";
                    let flags = libc::MS_REC | libc::MS_SLAVE;
                    if libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    for (src, dst) in binds {
                        if libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
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
            if let Some(fd) = enter.keep_fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
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
    resolve_program(&args.command[0])?;
    let ip = match &args.ip {
        Some(s) => Some(
            s.parse()
                .map_err(|_| anyhow::anyhow!("invalid --ip {s:?}: use an IPv4 address"))?,
        ),
        None => None,
    };
    let publish = args
        .publish
        .iter()
        .map(|p| p.parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<anyhow::Result<Vec<crate::model::PublishedPort>>>()?;
    let record = client
        .container_create(&CreateRequest {
            name: args.name.clone(),
            network: args.net.clone(),
            ip,
            hostname: args.hostname.clone(),
            command: args.command.clone(),
            auto_remove: args.rm,
            publish,
            aliases: args.aliases.clone(),
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
    use std::io::Write;
    let net = File::open(&record.netns).with_context(|| {
        format!(
            "cannot open the container's namespace {}",
            record.netns.display()
        )
    })?;
    // The start gate: the child runs `vxnet container-init`, which waits on this pipe until
    // the daemon holds the PID, so even `true` cannot exit unnoticed.
    let (gate_r, gate_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("cannot make the start gate pipe")?;
    let gate_fd = gate_r.as_raw_fd();
    let exe = std::env::current_exe().context("cannot find the vxnet binary")?;
    let mut argv = vec![
        exe.to_string_lossy().into_owned(),
        "container-init".into(),
        "--ready-fd".into(),
        gate_fd.to_string(),
        "--".into(),
    ];
    argv.extend(args.command.iter().cloned());
    let enter = Enter {
        net,
        uts: None,
        mounts: Mounts::for_record(record)?,
        hostname: Some(CString::new(record.hostname.clone()).context("hostname holds a NUL byte")?),
        die_with_parent: !args.detach,
        new_session: args.detach,
        keep_fd: Some(gate_fd),
    };
    let mut cmd = command_in(enter, &argv)?;
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
    // Only the child keeps the read end.
    drop(File::from(gate_r));
    let mut gate = File::from(gate_w);
    let pid = child
        .id()
        .context("the command exited before it could be registered")?;
    if let Err(e) = client.container_start(record.id.as_str(), pid).await {
        drop(gate); // EOF: the child exits without running the command
        let _ = child.wait().await;
        return Err(e.into());
    }
    gate.write_all(b"1")
        .context("cannot release the container's command")?;
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
        mounts: Mounts::of_process(pid)?,
        hostname: None,
        die_with_parent: true,
        new_session: false,
        keep_fd: None,
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
    let status = match &r.state {
        ContainerState::Created => "Created".into(),
        ContainerState::Running { pid, .. } => format!("Up (pid {pid})"),
        ContainerState::Exited { at } => format!("Exited {at}"),
        ContainerState::Cni { .. } => "Up (CNI)".into(),
    };
    if r.conflicts.is_empty() {
        status
    } else {
        format!("{status} CONFLICT: {}", r.conflicts.join("; "))
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
                        r.ports
                            .iter()
                            .map(|p| {
                                format!("0.0.0.0:{}->{}/{}", p.host_port, p.container_port, p.proto)
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
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
                    &[
                        "CONTAINER ID",
                        "NAME",
                        "COMMAND",
                        "STATUS",
                        "PORTS",
                        "NETWORKS"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stop(client: &Client, time: u64, containers: &[String]) -> anyhow::Result<ExitCode> {
    super::for_each(containers, |c| async move {
        client.container_stop(&c, time).await.map(drop)
    })
    .await
}

pub async fn rm(client: &Client, force: bool, containers: &[String]) -> anyhow::Result<ExitCode> {
    super::for_each(containers, |c| async move {
        client.container_rm(&c, force).await
    })
    .await
}
