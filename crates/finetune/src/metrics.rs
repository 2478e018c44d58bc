//! Evaluation metrics: Pearson and Spearman correlation for similarity scores; accuracy, F1 and
//! average precision (sentence-transformers' `CEBinaryClassificationEvaluator`) for binary labels.

use std::collections::BTreeMap;

/// Pearson correlation (0 when either side is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Ranks from 1, ties sharing their average rank (as scipy's `rankdata`).
fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = average;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman rank correlation (Pearson of average ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Binary-classification metrics at the best thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinaryMetrics {
    /// Best accuracy over thresholds.
    pub accuracy: f64,
    /// Best F1 over thresholds.
    pub f1: f64,
    /// Average precision (area under the precision-recall steps).
    pub average_precision: f64,
}

/// Accuracy and F1 at their best thresholds, and average precision, of `scores` against 0/1
/// `labels` (ties in score move together).
pub fn binary_metrics(scores: &[f64], labels: &[bool]) -> BinaryMetrics {
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let total = labels.len() as f64;
    let mut by_score: BTreeMap<std::cmp::Reverse<ordered::F64>, (f64, f64)> = BTreeMap::new();
    for (s, &l) in scores.iter().zip(labels) {
        let entry = by_score
            .entry(std::cmp::Reverse(ordered::F64(*s)))
            .or_default();
        if l {
            entry.0 += 1.0
        } else {
            entry.1 += 1.0
        }
    }
    // Sweep thresholds from high to low: everything at or above is predicted positive.
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut best_accuracy = (total - positives) / total.max(1.0); // threshold above every score
    let (mut best_f1, mut ap, mut last_recall) = (0.0f64, 0.0, 0.0);
    for (pos, neg) in by_score.values() {
        tp += pos;
        fp += neg;
        let tn = total - positives - fp;
        best_accuracy = best_accuracy.max((tp + tn) / total);
        let precision = tp / (tp + fp);
        let recall = if positives > 0.0 { tp / positives } else { 0.0 };
        if precision + recall > 0.0 {
            best_f1 = best_f1.max(2.0 * precision * recall / (precision + recall));
        }
        ap += (recall - last_recall) * precision;
        last_recall = recall;
    }
    BinaryMetrics {
        accuracy: best_accuracy,
        f1: best_f1,
        average_precision: ap,
    }
}

mod ordered {
    /// An f64 ordered by `total_cmp`, for map keys.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct F64(pub f64);
    impl Eq for F64 {}
    impl PartialOrd for F64 {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for F64 {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&other.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations_match_known_values() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.0, 5.0, 4.0, 5.0];
        // scipy.stats.pearsonr -> 0.7745966692414834; spearmanr -> 0.7378647873726218
        assert!((pearson(&x, &y) - 0.7745966692414834).abs() < 1e-12);
        assert!((spearman(&x, &y) - 0.7378647873726218).abs() < 1e-12);
        assert_eq!(pearson(&x, &[1.0; 5]), 0.0);
    }

    #[test]
    fn binary_metrics_match_sklearn() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [false, false, true, true];
        let m = binary_metrics(&scores, &labels);
        // sklearn.metrics.average_precision_score -> 0.8333333333333333
        assert!((m.average_precision - 0.8333333333333333).abs() < 1e-12);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.f1 - 0.8).abs() < 1e-12);
    }
}
