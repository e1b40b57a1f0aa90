//! Text output shared by the CLI and the lab demo (Docker's table layout).

use crate::model::{Network, SCOPE_GLOBAL};

/// `docker network ls`'s table: NETWORK ID, NAME, DRIVER, SCOPE.
pub fn network_table(nets: &[Network], no_trunc: bool) -> String {
    let rows: Vec<[String; 4]> = nets
        .iter()
        .map(|n| {
            [
                if no_trunc {
                    n.id.to_string()
                } else {
                    n.id.short().to_string()
                },
                n.name.clone(),
                n.driver.clone(),
                SCOPE_GLOBAL.to_string(),
            ]
        })
        .collect();
    let header = ["NETWORK ID", "NAME", "DRIVER", "SCOPE"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
