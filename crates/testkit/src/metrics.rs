//! Reading userseg's Prometheus metrics in tests: a running server's `/metrics`, or the text of
//! an in-process `PrometheusHandle::render()`. The one parser of that text for every test.

use std::time::Duration;

/// The sum of the samples of `name` in a Prometheus text exposition whose labels include every
/// one of `labels` (all of its samples when `labels` is empty); 0 when there is none.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (label_text, v) = if let Some(r) = rest.strip_prefix('{') {
                let end = r.rfind('}')?;
                (&r[..end], r[end + 1..].trim())
            } else if rest.starts_with(' ') {
                ("", rest.trim())
            } else {
                return None;
            };
            let all = labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            all.then(|| v.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The text of `BASE/metrics`; None when the server does not answer (not up yet, killed).
pub async fn scrape(base: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let r = client.get(format!("{base}/metrics")).send().await.ok()?;
    r.error_for_status().ok()?.text().await.ok()
}

/// `name` from `BASE/metrics`, summed over its label sets (0 when the server exports no sample
/// of it); None when the server does not answer.
pub async fn metric(base: &str, name: &str) -> Option<f64> {
    Some(value(&scrape(base).await?, name, &[]))
}

#[cfg(test)]
mod tests {
    use super::value;

    const TEXT: &str = "# TYPE a_total counter\n\
        a_total{reason=\"x\",role=\"es\"} 2\n\
        a_total{reason=\"y\"} 3\n\
        a_total_count 100\n\
        b 1.5\n";

    #[test]
    fn sums_the_samples_of_one_name_with_the_labels_asked() {
        assert_eq!(value(TEXT, "a_total", &[]), 5.0);
        assert_eq!(value(TEXT, "a_total", &[("reason", "x")]), 2.0);
        assert_eq!(value(TEXT, "a_total", &[("reason", "z")]), 0.0);
        assert_eq!(value(TEXT, "a_total_count", &[]), 100.0);
        assert_eq!(value(TEXT, "b", &[]), 1.5);
        assert_eq!(value(TEXT, "c", &[]), 0.0);
    }
}
