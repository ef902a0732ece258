//! Reading lbd's `/metrics` (Prometheus text): the sum of one metric's
//! samples whose labels match. Enough for counters and gauges; histograms
//! and help text are not needed here.

/// The sum of the samples of `name` that carry every `labels` pair (other
/// labels may be present); 0 when there is none.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (label_text, value) = match rest.strip_prefix('{') {
                Some(inner) => inner.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None, // another metric whose name starts alike
            };
            let pairs: Vec<&str> = label_text.split(',').map(str::trim).collect();
            let matches = labels
                .iter()
                .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
            matches.then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_samples_only() {
        let text = "# HELP weir_connections_rejected_total Refused.\n\
            weir_connections_rejected_total{listener=\"a\",reason=\"limit\"} 3\n\
            weir_connections_rejected_total{listener=\"b\",reason=\"limit\"} 4\n\
            weir_connections_rejected_total{listener=\"a\",reason=\"local_error\"} 5\n\
            weir_connections_rejected_totalx{listener=\"a\",reason=\"limit\"} 100\n\
            weir_config_generation 7\n";
        let rejected = "weir_connections_rejected_total";
        assert_eq!(sum(text, rejected, &[("reason", "limit")]), 7.0);
        assert_eq!(sum(text, rejected, &[("listener", "a")]), 8.0);
        assert_eq!(sum(text, rejected, &[]), 12.0);
        assert_eq!(sum(text, rejected, &[("reason", "no_backend")]), 0.0);
        assert_eq!(sum(text, "weir_config_generation", &[]), 7.0);
    }
}
