//! The Debian package as `scripts/package` builds it (target/debian/vxnet_*.deb): what it
//! holds, its unit under `systemd-analyze verify`, and a real `dpkg -i` on a lab host: an
//! overlay over the machine's root in a private mount namespace (tmpfs upper directory, so
//! neither this machine's files nor its dpkg database change), the daemon not started by the
//! install, skipped until configured, then started from the installed unit's ExecStart line
//! with the installed configuration, notifying a socket this test reads.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, TestLab};

/// The newest package of this version in target/debian (`./scripts/package` makes it).
fn built_deb() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("debian");
    let prefix = format!("vxnet_{}-", env!("CARGO_PKG_VERSION"));
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, path)) => path,
        None => panic!(
            "no {prefix}*.deb in {}: build it first with ./scripts/package",
            dir.display()
        ),
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory on this machine removed when dropped (after a failure too).
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vxnet-package-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One `key=value` line of a unit file, `[section]` by section; every value of a repeated key.
fn unit_entries(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut entries: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a unit file line: {line:?}"));
        entries
            .entry((section.clone(), key.trim().to_string()))
            .or_default()
            .push(value.trim().to_string());
    }
    entries
}

fn unit_value(
    entries: &BTreeMap<(String, String), Vec<String>>,
    section: &str,
    key: &str,
) -> String {
    match entries.get(&(section.to_string(), key.to_string())) {
        Some(values) if values.len() == 1 => values[0].clone(),
        other => panic!("[{section}] {key}= should be set once in the unit, found {other:?}"),
    }
}

/// A unit's command line as systemd runs it: the prefixes systemd reads (`-`, `@`, `:`, `+`,
/// `!`) would change what runs, and quoting or `$VAR` expansion would need systemd's own
/// parser, so this unit is kept to plain words and the test refuses anything else.
fn command_line(line: &str) -> Vec<String> {
    assert!(
        !line.starts_with(['-', '@', ':', '+', '!']) && !line.contains(['"', '\'', '$', '\\', ';']),
        "unit command line {line:?} has syntax this test does not parse"
    );
    line.split_whitespace().map(str::to_string).collect()
}

/// The long options `vxnet daemon --help` lists.
fn daemon_flags(vxnet: &Path) -> BTreeSet<String> {
    let help = stdout(&run(vxnet.to_str().unwrap(), &["daemon", "--help"]));
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let at = l.find("--")?;
            // "-s, --socket <SOCKET>" or "--socket <SOCKET>": the flag is the line's first word
            // starting with "--".
            if !(at == 0 || l[..at].ends_with(", ")) {
                return None;
            }
            let name: String = l[at + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn the_package_holds_each_file_at_its_path_with_its_mode() {
    let deb = built_deb();
    let deb_s = deb.to_str().unwrap();

    // Every file and its mode and owner, from the archive itself.
    let listing = stdout(&run("dpkg-deb", &["-c", deb_s]));
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(cols.len() >= 6, "unexpected dpkg-deb -c line {line:?}");
        let (mode, owner, path) = (cols[0], cols[1], cols[5]);
        // cargo-deb writes numeric owners; either form is root.
        assert!(
            owner == "0/0" || owner == "root/root",
            "{path} is not owned by root: {line}"
        );
        if !mode.starts_with('d') {
            files.insert(path.trim_start_matches('.').to_string(), mode.to_string());
        }
    }
    let expected = [
        ("/usr/bin/vxnet", "-rwxr-xr-x"),
        ("/usr/lib/cni/vxnet", "-rwxr-xr-x"),
        ("/usr/lib/systemd/system/vxnet.service", "-rw-r--r--"),
        ("/etc/vxnet/daemon.json", "-rw-------"),
        ("/usr/share/doc/vxnet/daemon.json.example", "-rw-r--r--"),
        ("/usr/share/doc/vxnet/README.md", "-rw-r--r--"),
        ("/usr/share/doc/vxnet/install.md", "-rw-r--r--"),
        ("/usr/share/doc/vxnet/architecture.md", "-rw-r--r--"),
        ("/usr/share/doc/vxnet/copyright", "-rw-r--r--"),
    ];
    for (path, mode) in expected {
        assert_eq!(
            files.get(path).map(String::as_str),
            Some(mode),
            "{path} in the package:\n{listing}"
        );
    }
    // Nothing else but the docs (every docs/*.md, each 0644).
    let docs_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut doc_names: Vec<String> = std::fs::read_dir(&docs_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    doc_names.sort();
    for name in &doc_names {
        let path = format!("/usr/share/doc/vxnet/{name}");
        assert_eq!(
            files.get(&path).map(String::as_str),
            Some("-rw-r--r--"),
            "docs/{name} should be {path}, 0644:\n{listing}"
        );
    }
    for path in files.keys() {
        let known = expected.iter().any(|(p, _)| p == path)
            || doc_names
                .iter()
                .any(|n| *path == format!("/usr/share/doc/vxnet/{n}"));
        assert!(known, "{path} in the package is not one of its files");
    }

    // The control fields.
    let field = |name: &str| {
        stdout(&run("dpkg-deb", &["-f", deb_s, name]))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "vxnet");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(field("Section"), "net");
    let depends = field("Depends");
    for lib in ["libc6", "libnftnl11", "libmnl0"] {
        assert!(depends.contains(lib), "Depends: {depends} (no {lib})");
    }

    // The maintainer scripts and the conffile list.
    let control = TempDir::new("control");
    run("dpkg-deb", &["-e", deb_s, control.0.to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(control.0.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        ["/etc/vxnet/daemon.json"],
        "conffiles"
    );
    let postinst = std::fs::read_to_string(control.0.join("postinst")).unwrap();
    assert!(
        postinst.contains("deb-systemd-helper enable vxnet.service"),
        "the unit is enabled on install:\n{postinst}"
    );
    assert!(
        !postinst.contains("deb-systemd-invoke $_dh_action")
            && !postinst.contains("deb-systemd-invoke start"),
        "the install must not start the daemon:\n{postinst}"
    );
    // An upgrade restarts a running daemon onto the new binary, and only a running one.
    assert!(
        postinst.contains("deb-systemd-invoke try-restart vxnet.service"),
        "{postinst}"
    );
    let prerm = std::fs::read_to_string(control.0.join("prerm")).unwrap();
    assert!(
        prerm.contains("deb-systemd-invoke stop vxnet.service"),
        "removal stops the daemon:\n{prerm}"
    );

    // The unit and the configuration files, from the unpacked tree.
    let tree = TempDir::new("tree");
    run("dpkg-deb", &["-x", deb_s, tree.0.to_str().unwrap()]);
    let unit =
        std::fs::read_to_string(tree.0.join("usr/lib/systemd/system/vxnet.service")).unwrap();
    let u = unit_entries(&unit);
    for (section, key, value) in [
        ("Unit", "Wants", "network-online.target"),
        ("Unit", "After", "network-online.target"),
        ("Unit", "Before", "docker.service containerd.service"),
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        (
            "Service",
            "ExecCondition",
            "/usr/bin/vxnet daemon --check-configured",
        ),
        ("Service", "ExecStart", "/usr/bin/vxnet daemon"),
        ("Service", "ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service", "Restart", "on-failure"),
        ("Service", "KillMode", "mixed"),
        ("Install", "WantedBy", "multi-user.target"),
    ] {
        assert_eq!(unit_value(&u, section, key), value, "[{section}] {key}=");
    }
    assert!(
        unit_value(&u, "Service", "LimitNOFILE")
            .parse::<u64>()
            .unwrap()
            >= 65536,
        "LimitNOFILE"
    );

    let shipped: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tree.0.join("etc/vxnet/daemon.json")).unwrap())
            .expect("the shipped daemon.json is JSON");
    let shipped = shipped.as_object().expect("daemon.json is a JSON object");
    assert!(
        !shipped.contains_key("cluster-store"),
        "the shipped configuration must name no cluster store (the unit would start): {shipped:?}"
    );

    // The example names every key `vxnet daemon` reads from a file, and no other.
    let example: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tree.0.join("usr/share/doc/vxnet/daemon.json.example")).unwrap(),
    )
    .expect("daemon.json.example is JSON");
    let example_keys: BTreeSet<String> = example
        .as_object()
        .expect("daemon.json.example is a JSON object")
        .keys()
        .cloned()
        .collect();
    let mut flags = daemon_flags(&tree.0.join("usr/bin/vxnet"));
    // Not configuration: the CLI's global -H/--host, help, and the file's own flags.
    for not_a_key in [
        "help",
        "host",
        "config-file",
        "check-configured",
        "validate",
    ] {
        flags.remove(not_a_key);
    }
    assert_eq!(
        example_keys, flags,
        "packaging/daemon.json.example should show every `vxnet daemon` flag as a key"
    );
}

/// A lab host's private mount namespace holding an overlay of the machine's root with the
/// package installed by `dpkg -i`; `sleep` holds it until dropped (killed by PID).
struct InstalledRoot {
    holder: Child,
    /// This machine's directory: the tmpfs for the overlay is mounted on `mnt/` inside the
    /// private namespace only; `sock/` is bound on the root's /run/test.
    dir: TempDir,
    /// Processes started in the root (daemon, containers), killed on drop.
    started: Vec<u32>,
}

const NOTIFY_SOCKET: &str = "/run/test/notify.sock";

/// Makes the overlay, installs the .deb in it and prints "installed". No systemd runs in
/// the root (its /run is empty), and a policy-rc.d refuses every start besides.
const INSTALL_SCRIPT: &str = r#"
set -eu
t=$1
mount -t tmpfs -o mode=0755 vxnet-package "$t/mnt"
mkdir "$t/mnt/upper" "$t/mnt/work" "$t/mnt/root"
r=$t/mnt/root
mount -t overlay vxnet-package -o "lowerdir=/,upperdir=$t/mnt/upper,workdir=$t/mnt/work" "$r"
mount --rbind /dev "$r/dev"
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount -t tmpfs -o mode=0755 tmpfs "$r/run"
mount -t tmpfs -o mode=1777 tmpfs "$r/tmp"
mkdir "$r/run/test"
mount --bind "$t/sock" "$r/run/test"
# The machine's own state, if any, is not the new host's (whiteouts: the lower is untouched).
rm -rf "$r/var/lib/vxnet" "$r/etc/vxnet"
printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
chmod 0755 "$r/usr/sbin/policy-rc.d"
cp "$t/vxnet.deb" "$r/tmp/vxnet.deb"
chroot "$r" dpkg -i /tmp/vxnet.deb >&2
echo installed
exec sleep infinity
"#;

impl InstalledRoot {
    fn install(lab: &TestLab, host: &str, deb: &Path) -> InstalledRoot {
        let dir = TempDir::new("root");
        for sub in ["mnt", "sock"] {
            std::fs::create_dir(dir.0.join(sub)).unwrap();
        }
        std::fs::copy(deb, dir.0.join("vxnet.deb")).unwrap();
        let log = std::fs::File::create(dir.0.join("install.log")).unwrap();
        let mut cmd = lab.lab.host(host).unwrap().command("unshare").unwrap();
        cmd.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            INSTALL_SCRIPT,
            "sh",
        ])
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
        let mut holder = cmd.spawn().expect("cannot start unshare on the lab host");
        let mut line = String::new();
        let read = BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line);
        let root = InstalledRoot {
            holder,
            dir,
            started: Vec::new(),
        };
        assert!(
            matches!(read, Ok(n) if n > 0) && line.trim() == "installed",
            "installing the package failed: {}",
            root.install_log()
        );
        root
    }

    fn install_log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("install.log")).unwrap_or_default()
    }

    fn root_in_ns(&self) -> PathBuf {
        self.dir.0.join("mnt/root")
    }

    /// `path` of the installed root, as this process reaches it (through the holder's root).
    fn path(&self, path: &str) -> PathBuf {
        let mut p = PathBuf::from(format!("/proc/{}/root", self.holder.id()));
        p.push(self.root_in_ns().strip_prefix("/").unwrap());
        p.push(path.trim_start_matches('/'));
        p
    }

    fn mount_ns(&self) -> String {
        format!("--mount=/proc/{}/ns/mnt", self.holder.id())
    }

    /// `argv` run inside the installed root on the lab host (its network namespace), with a
    /// plain environment: nothing of the lab's (its PATH, VXNET_HOST) leaks in.
    fn command(&self, lab: &TestLab, host: &str, argv: &[&str]) -> Command {
        let mut cmd = lab.lab.host(host).unwrap().command("nsenter").unwrap();
        cmd.arg(self.mount_ns())
            .arg("chroot")
            .arg(self.root_in_ns())
            .args(argv)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null());
        cmd
    }

    fn output(&self, lab: &TestLab, host: &str, argv: &[&str]) -> Output {
        self.command(lab, host, argv)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {argv:?} in the installed root: {e}"))
    }

    fn ok(&self, lab: &TestLab, host: &str, argv: &[&str]) -> String {
        let out = self.output(lab, host, argv);
        assert!(
            out.status.success(),
            "{argv:?} in the installed root failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    }

    /// Processes in the root's mount namespace besides the holder.
    fn others_in_namespace(&self) -> Vec<(u32, String)> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).unwrap();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == self.holder.id() {
                continue;
            }
            if std::fs::read_link(e.path().join("ns/mnt")).ok().as_ref() == Some(&ns) {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
        found
    }
}

impl Drop for InstalledRoot {
    fn drop(&mut self) {
        for &pid in self.started.iter().rev() {
            kill_and_wait(pid);
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// SIGKILL to a process this test started, then a bounded wait for it to be gone.
fn kill_and_wait(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let started = Instant::now();
    while alive(pid) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The sd_notify datagrams the daemon sends, as systemd would receive them.
struct NotifySocket {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).unwrap();
        // The daemon runs as root; so does the test, but be explicit for the bind mount.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a datagram holding `line`, while `running` holds.
    fn wait_for(&mut self, line: &str, mut running: impl FnMut() -> bool) -> bool {
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = text.lines().any(|l| l == line);
                self.seen.push(text);
                if hit {
                    return true;
                }
            } else if !running() {
                return false;
            }
        }
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_package_stays_stopped_until_configured_then_runs_from_its_unit() {
    let deb = built_deb();
    // vm1 runs etcd and no daemon: the installed one is this host's only vxnet daemon.
    let lab = TestLab::up(1).await;
    let host = "vm1";
    let addr = lab.lab.host(host).unwrap().addr().to_string();
    let mut root = InstalledRoot::install(&lab, host, &deb);

    // Installed where the package puts things, the unit enabled, nothing started.
    for (path, mode) in [
        ("/usr/bin/vxnet", 0o755),
        ("/usr/lib/cni/vxnet", 0o755),
        ("/usr/lib/systemd/system/vxnet.service", 0o644),
        ("/etc/vxnet/daemon.json", 0o600),
    ] {
        let meta = std::fs::metadata(root.path(path))
            .unwrap_or_else(|e| panic!("{path} not installed: {e}\n{}", root.install_log()));
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "mode of {path}");
    }
    let wants = root.path("/etc/systemd/system/multi-user.target.wants/vxnet.service");
    // deb-systemd-helper links to the unit where it found it (/lib is /usr/lib on a merged /usr).
    let link = std::fs::read_link(&wants).ok();
    assert!(
        link.as_deref().is_some_and(|l| [
            Path::new("/usr/lib/systemd/system/vxnet.service"),
            Path::new("/lib/systemd/system/vxnet.service")
        ]
        .contains(&l)),
        "the install enables the unit: {} -> {link:?}",
        wants.display()
    );
    assert!(
        root.others_in_namespace().is_empty(),
        "the install left processes running: {:?}",
        root.others_in_namespace()
    );
    assert!(
        !root.path("/run/vxnet").exists(),
        "the install started a daemon (it made /run/vxnet)"
    );

    // systemd's own check of the installed unit, its ExecStart binaries included.
    let verify = root.output(
        &lab,
        host,
        &[
            "systemd-analyze",
            "verify",
            "/usr/lib/systemd/system/vxnet.service",
        ],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed: {said}"
    );
    assert!(
        !said.contains("vxnet.service"),
        "systemd-analyze verify has something to say about the unit: {said}"
    );

    let unit = unit_entries(
        &std::fs::read_to_string(root.path("/usr/lib/systemd/system/vxnet.service")).unwrap(),
    );
    let condition = command_line(&unit_value(&unit, "Service", "ExecCondition"));
    let start = command_line(&unit_value(&unit, "Service", "ExecStart"));
    let condition: Vec<&str> = condition.iter().map(String::as_str).collect();
    let start: Vec<&str> = start.iter().map(String::as_str).collect();

    // As shipped, the unit is skipped (ExecCondition exit 1), not failed.
    let skipped = root.output(&lab, host, &condition);
    assert_eq!(
        skipped.status.code(),
        Some(1),
        "{condition:?} with the shipped configuration: {}{}",
        String::from_utf8_lossy(&skipped.stdout),
        String::from_utf8_lossy(&skipped.stderr)
    );

    // The configuration an operator writes (the file keeps its mode: it may hold credentials).
    let config = serde_json::json!({
        "cluster-store": lab.lab.cluster_store(),
        "cluster-advertise": addr,
    });
    std::fs::write(
        root.path("/etc/vxnet/daemon.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(root.path("/etc/vxnet/daemon.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    root.ok(&lab, host, &condition);
    // The example in the docs is a valid configuration too, but for its TLS files, which
    // `--validate` reads (as the daemon does at start) and which this host does not have.
    let mut example: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.path("/usr/share/doc/vxnet/daemon.json.example")).unwrap(),
    )
    .unwrap();
    if let Some(o) = example.as_object_mut() {
        o.remove("cluster-store-opt");
    }
    std::fs::write(root.path("/tmp/example.json"), example.to_string()).unwrap();
    root.ok(
        &lab,
        host,
        &[
            "/usr/bin/vxnet",
            "daemon",
            "--config-file",
            "/tmp/example.json",
            "--validate",
        ],
    );

    // The unit's ExecStart, as systemd runs it: NOTIFY_SOCKET set, nothing else.
    let mut notify = NotifySocket::bind(&root.dir.0.join("sock/notify.sock"));
    let log_path = root.dir.0.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = root
        .command(&lab, host, &start)
        .env("NOTIFY_SOCKET", NOTIFY_SOCKET)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("cannot start the installed daemon");
    let daemon_pid = daemon.id();
    root.started.push(daemon_pid);
    let daemon_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let ready = notify.wait_for("READY=1", || matches!(daemon.try_wait(), Ok(None)));
    assert!(
        ready,
        "no READY=1 from the daemon (notifications {:?}); its log:\n{}",
        notify.seen,
        daemon_log()
    );
    assert!(
        notify
            .seen
            .iter()
            .any(|m| m.lines().any(|l| l.starts_with("STATUS="))),
        "no STATUS= line: {:?}",
        notify.seen
    );

    // The installed CLI against the installed daemon, on the default socket.
    let id = root.ok(
        &lab,
        host,
        &[
            "/usr/bin/vxnet",
            "network",
            "create",
            "--subnet",
            "10.77.0.0/24",
            "pkg-net",
        ],
    );
    assert_eq!(id.trim().len(), 64, "network create printed {id:?}");
    let info = root.ok(&lab, host, &["/usr/bin/vxnet", "info"]);
    assert!(info.contains("Registered:      yes"), "{info}");
    assert!(info.contains(&format!("Advertise:       {addr}")), "{info}");
    assert!(info.contains("Networks:        1"), "{info}");

    // A container the installed CLI starts, then a clean stop as systemd does it (SIGTERM
    // to the main process): the container keeps running, with its address.
    root.ok(
        &lab,
        host,
        &[
            "/usr/bin/vxnet",
            "run",
            "-d",
            "--name",
            "pkg-c",
            "--net",
            "pkg-net",
            "--",
            "sleep",
            "infinity",
        ],
    );
    let ps: serde_json::Value =
        serde_json::from_str(&root.ok(&lab, host, &["/usr/bin/vxnet", "ps", "--format", "json"]))
            .unwrap();
    let c = ps
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "pkg-c"))
        .unwrap_or_else(|| panic!("pkg-c not in ps: {ps}"))
        .clone();
    let cpid = c["pid"].as_u64().expect("pkg-c has a pid") as u32;
    root.started.push(cpid);
    let ip = c["attachments"][0]["ip"].as_str().unwrap().to_string();
    // Not the daemon's child (nor grandchild): it is not in the unit's cgroup, which is
    // what lets KillMode=mixed stop the daemon without touching containers.
    let mut ancestor = Some(cpid);
    while let Some(p) = ancestor.filter(|&p| p > 1) {
        assert_ne!(p, daemon_pid, "the container descends from the daemon");
        ancestor = parent_of(p);
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        notify.wait_for("STOPPING=1", || true),
        "no STOPPING=1 after SIGTERM (notifications {:?}); its log:\n{}",
        notify.seen,
        daemon_log()
    );
    wait_until(|| matches!(daemon.try_wait(), Ok(Some(_))));
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "the daemon's clean stop exited {status}: {}",
        daemon_log()
    );
    assert!(alive(cpid), "the container died with the daemon");
    let addrs = Command::new("nsenter")
        .arg(format!("--net=/proc/{cpid}/ns/net"))
        .args(["ip", "-4", "-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        stdout(&addrs).contains(&format!("inet {ip}/24")),
        "the container lost eth0 {ip} when the daemon stopped: {}",
        stdout(&addrs)
    );

    eprintln!(
        "installed daemon: notifications {:?}; verify said {said:?}; info:\n{info}",
        notify.seen
    );
    drop(root);
    drop(lab);
}
