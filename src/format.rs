//! Text output shared by the CLI and the lab demo (Docker's table layout).

use crate::model::{Network, SCOPE_GLOBAL};

/// `docker network ls`'s table: NETWORK ID, NAME, DRIVER, SCOPE.
pub fn network_table(nets: &[Network], no_trunc: bool) -> String {
    let rows: Vec<Vec<String>> = nets
        .iter()
        .map(|n| {
            vec![
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
    table(&["NETWORK ID", "NAME", "DRIVER", "SCOPE"], &rows)
}

/// Left-aligned columns three spaces apart, as Docker prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for r in std::iter::once(&head).chain(rows.iter()) {
        let line = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
