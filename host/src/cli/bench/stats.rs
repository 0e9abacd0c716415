//! Statistics of benchmark rounds: medians, spreads, percentiles and the ratio rows every
//! benchmark prints.

/// The `p`th percentile of `sorted` (ascending, not empty).
pub(super) fn percentile(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// A table row: the median throughput of each side, their spread, and baseline / measured.
pub(super) fn ratio_row(name: &str, bytes: u64, base: &[f64], measured: &[f64]) {
    println!(
        "| {name} | {} | {} | {:.2}x |",
        spread(bytes, base),
        spread(bytes, measured),
        median(base) / median(measured)
    );
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

pub(super) fn mbps(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e6
}

/// "median MB/s (slowest–fastest)" of the rounds.
pub(super) fn spread(bytes: u64, seconds: &[f64]) -> String {
    let median = mbps(bytes, median(seconds));
    if seconds.len() == 1 {
        return format!("{median:.0} MB/s");
    }
    let slowest = mbps(bytes, seconds.iter().copied().fold(f64::MIN, f64::max));
    let fastest = mbps(bytes, seconds.iter().copied().fold(f64::MAX, f64::min));
    format!("{median:.0} MB/s ({slowest:.0}–{fastest:.0})")
}
