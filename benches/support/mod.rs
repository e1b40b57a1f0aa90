//! What every vxnet benchmark shares: latency summaries and the result file.
#![allow(dead_code)]

use std::time::Duration;

use serde::Serialize;

/// p50/p99/min/max of one measured series, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub case: String,
    pub runs: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
}

impl Summary {
    pub fn of(case: &str, samples: &[Duration]) -> Summary {
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            if us.is_empty() {
                return f64::NAN;
            }
            let i = ((us.len() as f64 - 1.0) * q).round() as usize;
            us[i.min(us.len() - 1)]
        };
        Summary {
            case: case.to_string(),
            runs: us.len(),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            min_us: us.first().copied().unwrap_or(f64::NAN),
            max_us: us.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// A ratio of two cases' p50s, as measured in the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub case: String,
    pub baseline: String,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

impl Ratio {
    pub fn of(case: &Summary, baseline: &Summary) -> Ratio {
        Ratio {
            case: case.case.clone(),
            baseline: baseline.case.clone(),
            p50_ratio: case.p50_us / baseline.p50_us,
            p99_ratio: case.p99_us / baseline.p99_us,
        }
    }
}

/// One figure that is not a latency distribution (a count, a size, one duration).
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub case: String,
    pub value: f64,
    pub unit: String,
}

/// Prints figures as a markdown table (whole numbers without decimals).
pub fn print_figures(figures: &[Figure]) {
    println!("\n| figure | value |\n|---|---:|");
    for f in figures {
        match f.value.fract() == 0.0 {
            true => println!("| {} | {:.0} {} |", f.case, f.value, f.unit),
            false => println!("| {} | {:.2} {} |", f.case, f.value, f.unit),
        }
    }
}

/// The machine a result was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    pub fn here() -> Machine {
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date: vxnet::model::now_rfc3339(),
        }
    }
}

pub fn print_table(title: &str, summaries: &[Summary], ratios: &[Ratio]) {
    println!("\n{title}");
    println!("| case | runs | p50 µs | p99 µs | min µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in summaries {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            s.case, s.runs, s.p50_us, s.p99_us, s.min_us, s.max_us
        );
    }
    if !ratios.is_empty() {
        println!("\n| case | against | p50 ratio | p99 ratio |");
        println!("|---|---|---:|---:|");
        for r in ratios {
            println!(
                "| {} | {} | {:.2} | {:.2} |",
                r.case, r.baseline, r.p50_ratio, r.p99_ratio
            );
        }
    }
}

/// Writes the result as JSON under target/bench/ and says where.
pub fn write_result(name: &str, value: &impl Serialize) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let path = dir.join(format!("{name}.json"));
    let written = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap_or_default()));
    match written {
        Ok(()) => println!("\nresult written to {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

/// One benchmark's result file: the machine and every figure of the run.
#[derive(Serialize)]
struct Report {
    machine: Machine,
    summaries: Vec<Summary>,
    ratios: Vec<Ratio>,
}

/// Prints the tables and writes `target/bench/<name>.json`.
pub fn report(name: &str, title: &str, summaries: Vec<Summary>, ratios: Vec<Ratio>) {
    print_table(title, &summaries, &ratios);
    write_result(
        name,
        &Report {
            machine: Machine::here(),
            summaries,
            ratios,
        },
    );
}

/// Runs a benchmark's async body on a multi-threaded runtime.
pub fn block_on(body: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(body);
}

/// Iterations: `VXNET_BENCH_RUNS` or the default.
pub fn runs(default: usize) -> usize {
    std::env::var("VXNET_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A minimal ICMP echo client on a raw socket, for "first reply" measurements. The socket is
/// opened by the caller on a thread inside the namespace to ping from.
pub struct Pinger {
    fd: std::os::fd::OwnedFd,
    id: u16,
    seq: u16,
}

impl Pinger {
    /// Opens a raw ICMP socket in the calling thread's network namespace; each receive waits
    /// at most `wait`.
    pub fn open(wait: Duration) -> std::io::Result<Pinger> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned from here on.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let tv = libc::timeval {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_usec: wait.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Pinger {
            fd,
            id: (std::process::id() & 0xffff) as u16,
            seq: 0,
        })
    }

    /// Sends one echo request to `dst` and waits (up to the socket's timeout) for its reply.
    pub fn ping_once(&mut self, dst: std::net::Ipv4Addr) -> bool {
        use std::os::fd::AsRawFd;
        self.seq = self.seq.wrapping_add(1);
        let mut pkt = [0u8; 16];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&self.id.to_be_bytes());
        pkt[6..8].copy_from_slice(&self.seq.to_be_bytes());
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a valid buffer and sockaddr_in.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return false;
        }
        let mut buf = [0u8; 1500];
        loop {
            // SAFETY: recv into a local buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                return false; // timed out
            }
            let n = n as usize;
            let ihl = ((buf[0] & 0x0f) as usize) * 4;
            if n < ihl + 8 {
                continue;
            }
            let icmp = &buf[ihl..n];
            let src = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
            if icmp[0] == 0
                && src == dst
                && icmp[4..6] == self.id.to_be_bytes()
                && icmp[6..8] == self.seq.to_be_bytes()
            {
                return true;
            }
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A lab of `hosts` hosts (vm1 etcd, vm2… daemons serving the plugin in global scope) with a
/// Docker 20.10 engine on every daemon host, started with `--cluster-store` on the lab's
/// etcd (the seed's set-up), and the test image imported. Gone when dropped.
pub async fn docker_lab(prefix: &str, hosts: usize) -> vxnet::lab::LabGuard {
    use vxnet::lab::{DockerOptions, Lab, LabGuard, LabOptions};
    let name = format!("{prefix}-{}", std::process::id());
    let mut opts = LabOptions::new(&name, std::path::PathBuf::from(env!("CARGO_BIN_EXE_vxnet")));
    opts.hosts = hosts;
    opts.docker_scope = vxnet::docker::Scope::Global;
    // Many hosts on two cores start slowly.
    let ready = Duration::from_secs(30 + 5 * hosts as u64);
    opts.ready_timeout = ready;
    let lab = LabGuard::new(
        Lab::up(opts)
            .await
            .unwrap_or_else(|e| panic!("cannot start the bench lab: {e}")),
    );
    let docker_opts = DockerOptions {
        cluster_store: true,
        ready_timeout: Some(ready),
        ..Default::default()
    };
    let names: Vec<String> = (2..=hosts).map(|k| format!("vm{k}")).collect();
    let started =
        futures::future::join_all(names.iter().map(|h| lab.start_docker(h, &docker_opts))).await;
    for (h, r) in names.iter().zip(started) {
        r.unwrap_or_else(|e| panic!("dockerd on {h}: {e}"));
        lab.import_test_image(h)
            .unwrap_or_else(|e| panic!("test image on {h}: {e}"));
    }
    lab
}

/// `docker ARGS` on a lab host against its own engine; panics on failure, returns stdout.
pub fn docker(lab: &vxnet::lab::Lab, host: &str, args: &[&str]) -> String {
    let out = lab
        .host(host)
        .expect("host")
        .docker()
        .expect("docker client")
        .args(args)
        .output()
        .expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?} on {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
