//! `vxnet doctor`: asks the daemon to check this host's kernel state against the store
//! (`GET /v1/doctor`) and prints each difference with its fix, then a summary line.
//!
//! Exit codes are for scripts: 0 the kernel matches, 1 differences were found, 2 the check
//! could not run (no daemon, the daemon has not read the store yet, a bad `--format`): a
//! script must not take "could not look" for "healthy" or for "broken".

use std::process::ExitCode;

use crate::api::client::Client;
use crate::api::types::{Checked, DoctorReport, Finding};

const MATCHES: u8 = 0;
const DIFFERS: u8 = 1;
const CANNOT_CHECK: u8 = 2;

pub async fn run(host: &str, format: Option<&str>) -> ExitCode {
    let json = match format {
        None => false,
        Some("json") => true,
        Some(other) => {
            eprintln!("vxnet doctor: unknown --format {other:?}: use json");
            return ExitCode::from(CANNOT_CHECK);
        }
    };
    let report = match Client::new(host) {
        Ok(client) => client.doctor().await,
        Err(e) => Err(e),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vxnet doctor: the check could not run: {e}");
            return ExitCode::from(CANNOT_CHECK);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("vxnet doctor: cannot print the report: {e}");
                return ExitCode::from(CANNOT_CHECK);
            }
        }
    } else {
        print!("{}", render(&report));
    }
    ExitCode::from(if report.healthy() { MATCHES } else { DIFFERS })
}

/// The report as text: two lines per difference (what, then the fix), what was not
/// checked, and a summary line.
pub fn render(report: &DoctorReport) -> String {
    let mut out = String::new();
    for f in &report.findings {
        out.push_str(&finding_line(f));
        out.push('\n');
        out.push_str(&format!("    fix: {}\n", f.fix));
    }
    for s in &report.skipped {
        out.push_str(&format!("not checked: {s}\n"));
    }
    let n = report.findings.len();
    let verdict = match n {
        0 => "no differences".to_string(),
        1 => "1 difference".to_string(),
        n => format!("{n} differences"),
    };
    out.push_str(&format!(
        "{verdict}: checked {}\n",
        checked_text(&report.checked)
    ));
    out
}

fn finding_line(f: &Finding) -> String {
    let mut line = format!("[{}] ", f.area);
    if let Some(net) = &f.network {
        line.push_str(&format!("network {net}: "));
    }
    line.push_str(&format!("{} is {}", f.object, f.difference));
    match (&f.want, &f.have) {
        (Some(w), Some(h)) => line.push_str(&format!(" (want {w}; kernel has {h})")),
        (Some(w), None) => line.push_str(&format!(" (want {w})")),
        (None, Some(h)) => line.push_str(&format!(" (kernel has {h})")),
        (None, None) => {}
    }
    line
}

fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn checked_text(c: &Checked) -> String {
    let mut parts = vec![
        count(c.networks, "network", "networks"),
        count(c.sandboxes, "sandbox", "sandboxes"),
        count(c.interfaces, "container interface", "container interfaces"),
        count(c.fdb_entries, "FDB entry", "FDB entries"),
        count(c.neighbours, "neighbour", "neighbours"),
    ];
    if c.gateway_bridge {
        parts.push(format!(
            "the gateway bridge with {}",
            count(c.gateway_interfaces, "interface", "interfaces")
        ));
    }
    if c.container_routes > 0 {
        parts.push(count(
            c.container_routes,
            "container route",
            "container routes",
        ));
    }
    parts.push(format!(
        "{} with {}",
        count(c.firewall_chains, "firewall chain", "firewall chains"),
        count(c.firewall_set_elements, "set element", "set elements")
    ));
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{Area, Difference};

    #[test]
    fn each_difference_gets_its_fix_and_the_summary_counts_what_was_checked() {
        let report = DoctorReport {
            revision: 7,
            checked: Checked {
                networks: 1,
                sandboxes: 1,
                interfaces: 1,
                fdb_entries: 2,
                neighbours: 2,
                gateway_interfaces: 1,
                gateway_bridge: true,
                container_routes: 0,
                firewall_chains: 5,
                firewall_set_elements: 2,
            },
            findings: vec![Finding {
                area: Area::Fdb,
                network: Some("net-a (3f2a9c1b0d4e)".into()),
                object: "FDB entry 02:42:0a:00:04:03".into(),
                difference: Difference::Missing,
                want: Some("dst 192.0.2.7 (endpoint 10.0.4.3)".into()),
                have: None,
                fix: "run `vxnet reconcile`".into(),
            }],
            skipped: vec![],
        };
        assert_eq!(
            render(&report),
            "[fdb] network net-a (3f2a9c1b0d4e): FDB entry 02:42:0a:00:04:03 is missing \
             (want dst 192.0.2.7 (endpoint 10.0.4.3))\n    fix: run `vxnet reconcile`\n\
             1 difference: checked 1 network, 1 sandbox, 1 container interface, 2 FDB entries, \
             2 neighbours, the gateway bridge with 1 interface, 5 firewall chains with 2 set \
             elements\n"
        );
        let healthy = DoctorReport::default();
        assert!(render(&healthy).starts_with("no differences: checked 0 networks"));
    }
}
