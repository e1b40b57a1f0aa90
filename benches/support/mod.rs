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

/// Iterations: `VXNET_BENCH_RUNS` or the default.
pub fn runs(default: usize) -> usize {
    std::env::var("VXNET_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
