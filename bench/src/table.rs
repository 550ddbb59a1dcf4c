//! The one table every benchmark reports into: sealvm's figure, the peer's from the same
//! run, and the ratio.

use std::time::Duration;

/// One measured figure, with the peer's figure from the same run when there is one.
pub struct Row {
    /// What was measured, with its unit.
    pub name: String,
    /// sealvm's figure.
    pub ours: f64,
    /// The peer's figure, and the peer's name.
    pub peer: Option<(String, f64)>,
    /// True when a smaller figure is better (latency), false when larger is (throughput).
    pub lower_is_better: bool,
}

/// The middle sample.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Milliseconds as a float.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints the rows as one table; the ratio is always "how many times better sealvm is".
pub fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(10).max(9);
    println!();
    println!(
        "{:<width$}  {:>12}  {:>24}  {:>8}",
        "benchmark", "sealvm", "peer", "ratio"
    );
    println!("{}", "-".repeat(width + 52));
    for row in rows {
        let (peer, ratio) = match &row.peer {
            Some((name, value)) => {
                let ratio = if row.lower_is_better {
                    value / row.ours
                } else {
                    row.ours / value
                };
                (format!("{value:.1} ({name})"), format!("{ratio:.2}x"))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<width$}  {:>12.1}  {:>24}  {:>8}",
            row.name, row.ours, peer, ratio
        );
    }
}
