//! The Pareto frontier of a method's sweep points in the plane (unwanted rate, `KL(p*‖p_new)`)
//! and the scalar scores read off it.
//!
//! Both coordinates are to be minimised. A point is on the frontier when no other point has a
//! rate and a KL that are both at most its own with one strictly smaller. Sorted by rate, the
//! frontier's KL decreases. Between two frontier points the frontier is linear: a model that
//! answers each prompt with one of the two models, chosen at random with weights `(1 − t, t)`,
//! has exactly the interpolated unwanted rate and, because KL is convex in its second argument,
//! a `KL(p*‖·)` at most the interpolated one. So every point of the interpolated frontier is
//! reachable (or beaten) from the measured points; no score credits a method with a point it
//! cannot reach.
//!
//! * [`kl_at_rate`]: the lowest `KL(p*‖p_new)` at an unwanted rate at most `r`: `None` when
//!   no point reaches `r` (the lowest rate is above it), the frontier's smallest KL when every
//!   frontier point is at or below `r`, otherwise the linear interpolation between the two
//!   frontier points around `r`.
//! * [`area`]: the area under the frontier in the plot's orientation (x = KL, y = unwanted rate)
//!   between KL 0 and a cap, divided by `cap · base_rate`. The frontier's rate at KL `k` is the
//!   lowest rate it reaches with a KL at most `k`, interpolated, and never above the base
//!   model's rate (doing nothing keeps that rate). So a method that never lowers the rate scores
//!   1, the ideal update (rate 0 at KL 0) scores 0, and lower is better.
//!
//! ```
//! use amend_eval::frontier::{area, kl_at_rate, pareto_front};
//! // (rate, KL) of four sweep points; (0.3, 0.9) is dominated by (0.2, 0.5).
//! let pts = [(0.2, 0.5), (0.1, 1.0), (0.3, 0.9), (0.0, 3.0)];
//! let front = pareto_front(&pts);
//! assert_eq!(front, vec![(0.0, 3.0), (0.1, 1.0), (0.2, 0.5)]);
//! assert_eq!(kl_at_rate(&front, 0.05), Some(2.0)); // halfway between 3.0 and 1.0
//! assert_eq!(kl_at_rate(&front, 0.5), Some(0.5));
//! assert_eq!(kl_at_rate(&front, -0.1), None);
//! let a = area(&front, 0.4, 1.0).unwrap();
//! assert!(a > 0.0 && a < 1.0);
//! ```

/// The Pareto frontier of `(rate, kl)` points (both minimised), sorted by rate ascending (so KL
/// descending). Points with a non-finite coordinate are left out; duplicates are kept once.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> =
        points.iter().copied().filter(|(r, k)| r.is_finite() && k.is_finite()).collect();
    // By rate, ties by KL: the first point of each rate is its best.
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in pts {
        // Kept only when it lowers the KL of every point of lower or equal rate before it.
        if front.last().is_none_or(|last| p.1 < last.1) {
            front.push(p);
        }
    }
    front
}

/// The lowest `KL(p*‖p_new)` at an unwanted rate at most `rate`, interpolated linearly along
/// `front` (from [`pareto_front`]); `None` when the frontier is empty or its lowest rate is
/// above `rate`.
pub fn kl_at_rate(front: &[(f64, f64)], rate: f64) -> Option<f64> {
    let first = front.first()?;
    if rate.is_nan() || rate < first.0 {
        return None;
    }
    for w in front.windows(2) {
        let ((r0, k0), (r1, k1)) = (w[0], w[1]);
        if rate < r1 {
            let t = (rate - r0) / (r1 - r0);
            return Some(k0 + t * (k1 - k0));
        }
    }
    front.last().map(|p| p.1)
}

/// The frontier's unwanted rate at KL `kl`: the lowest rate it reaches with a KL at most `kl`,
/// interpolated along `front`, capped at `base_rate`.
fn rate_at_kl(front: &[(f64, f64)], kl: f64, base_rate: f64) -> f64 {
    // front is by KL descending; the last point has the smallest KL.
    let Some(&(r_last, k_last)) = front.last() else { return base_rate };
    if kl < k_last {
        return base_rate;
    }
    let first = front[0];
    if kl >= first.1 {
        return first.0.min(base_rate);
    }
    for w in front.windows(2) {
        let ((r0, k0), (r1, k1)) = (w[0], w[1]);
        if kl >= k1 && kl <= k0 {
            let t = (k0 - kl) / (k0 - k1);
            return (r0 + t * (r1 - r0)).min(base_rate);
        }
    }
    r_last.min(base_rate)
}

/// The normalised area under the frontier (see the [module docs](self)):
/// `∫₀^cap rate_f(k) dk / (cap · base_rate)` with `rate_f` the frontier's rate at KL `k`
/// (interpolated, at most `base_rate`, `base_rate` below the frontier's smallest KL). Exact for
/// the piecewise-linear frontier. `None` unless `cap > 0` and `base_rate > 0`.
pub fn area(front: &[(f64, f64)], base_rate: f64, cap: f64) -> Option<f64> {
    if !(cap > 0.0 && cap.is_finite() && base_rate > 0.0 && base_rate.is_finite()) {
        return None;
    }
    // rate_f is piecewise linear between the frontier's KLs and the points where it crosses
    // base_rate; integrating it exactly needs those breakpoints (and 0 and cap).
    let mut xs: Vec<f64> = vec![0.0, cap];
    xs.extend(front.iter().map(|p| p.1).filter(|&k| k > 0.0 && k < cap));
    for w in front.windows(2) {
        let ((r0, k0), (r1, k1)) = (w[0], w[1]);
        // The KL at which the segment crosses base_rate, if it does (r0 < base_rate < r1).
        if (r0 - base_rate) * (r1 - base_rate) < 0.0 {
            let t = (base_rate - r0) / (r1 - r0);
            let k = k0 + t * (k1 - k0);
            if k > 0.0 && k < cap {
                xs.push(k);
            }
        }
    }
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    let mut total = 0.0;
    for w in xs.windows(2) {
        let (a, b) = (w[0], w[1]);
        // Linear on [a, b] except for the step at the smallest frontier KL, which is a
        // breakpoint: evaluate just inside the interval's ends.
        let eps = (b - a) * 1e-12;
        let fa = rate_at_kl(front, a + eps, base_rate);
        let fb = rate_at_kl(front, b - eps, base_rate);
        total += 0.5 * (fa + fb) * (b - a);
    }
    Some(total / (cap * base_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_keeps_only_undominated_points() {
        let pts = [(0.3, 0.1), (0.1, 0.5), (0.2, 0.2), (0.25, 0.3), (0.1, 0.6), (f64::NAN, 0.0)];
        assert_eq!(pareto_front(&pts), vec![(0.1, 0.5), (0.2, 0.2), (0.3, 0.1)]);
        // Equal rate: only the smaller KL. Equal KL at a higher rate: dominated.
        assert_eq!(pareto_front(&[(0.1, 0.2), (0.2, 0.2)]), vec![(0.1, 0.2)]);
        assert!(pareto_front(&[]).is_empty());
    }

    #[test]
    fn kl_at_rate_interpolates_between_neighbours() {
        let f = [(0.0, 1.0), (0.1, 0.4), (0.3, 0.2)];
        assert_eq!(kl_at_rate(&f, 0.0), Some(1.0));
        assert!((kl_at_rate(&f, 0.05).unwrap() - 0.7).abs() < 1e-12);
        assert!((kl_at_rate(&f, 0.2).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(kl_at_rate(&f, 0.3), Some(0.2));
        assert_eq!(kl_at_rate(&f, 0.9), Some(0.2));
        assert_eq!(kl_at_rate(&[(0.05, 0.3)], 0.04), None);
        assert_eq!(kl_at_rate(&[], 0.5), None);
        assert_eq!(kl_at_rate(&f, f64::NAN), None);
    }

    #[test]
    fn area_of_hand_computed_frontiers() {
        // Nothing reached: rate_f = base everywhere.
        assert_eq!(area(&[], 0.2, 1.0), Some(1.0));
        // The ideal point alone: rate 0 from KL 0.
        assert_eq!(area(&[(0.0, 0.0)], 0.2, 1.0), Some(0.0));
        // One point (0.1, 0.5), base 0.2, cap 1: 0.2 on [0, 0.5), 0.1 on [0.5, 1].
        let a = area(&[(0.1, 0.5)], 0.2, 1.0).unwrap();
        assert!((a - (0.2 * 0.5 + 0.1 * 0.5) / 0.2).abs() < 1e-9, "{a}");
        // Two points (0.0, 0.8) and (0.1, 0.4), base 0.2, cap 1:
        // [0, 0.4): 0.2; [0.4, 0.8]: linear 0.1 → 0; (0.8, 1]: 0.
        let a = area(&[(0.0, 0.8), (0.1, 0.4)], 0.2, 1.0).unwrap();
        let want = (0.2 * 0.4 + 0.5 * 0.1 * 0.4) / 0.2;
        assert!((a - want).abs() < 1e-9, "{a} vs {want}");
        // A point above the base rate is capped at it, and a segment crossing the base rate
        // is integrated exactly: (0.0, 1.0), (0.4, 0.5), base 0.2, cap 2.
        // [0, 0.5): 0.2; [0.5, 0.75]: min(0.2, 0.4 − 0.8(k − 0.5)) = 0.2 (crosses at k = 0.75);
        // [0.75, 1]: 0.2 − 0.8(k − 0.75), from 0.2 to 0; (1, 2]: 0.
        let a = area(&[(0.0, 1.0), (0.4, 0.5)], 0.2, 2.0).unwrap();
        let want = (0.2 * 0.75 + 0.5 * 0.2 * 0.25) / (2.0 * 0.2);
        assert!((a - want).abs() < 1e-9, "{a} vs {want}");
        // The cap cuts a frontier that goes on beyond it.
        let a = area(&[(0.0, 2.0), (0.2, 0.0)], 0.2, 1.0).unwrap();
        // rate_f(k) = 0.2 − 0.1k on [0, 1] → mean 0.15.
        assert!((a - 0.75).abs() < 1e-9, "{a}");
        assert_eq!(area(&[(0.1, 0.5)], 0.0, 1.0), None);
        assert_eq!(area(&[(0.1, 0.5)], 0.2, 0.0), None);
    }

    #[test]
    fn area_is_monotone_in_the_points() {
        // Adding a point never increases the area; moving a point down-left never increases it.
        let base = [(0.05, 0.6), (0.12, 0.3)];
        let a0 = area(&pareto_front(&base), 0.2, 1.0).unwrap();
        let mut more = base.to_vec();
        more.push((0.02, 0.4));
        let a1 = area(&pareto_front(&more), 0.2, 1.0).unwrap();
        assert!(a1 <= a0 + 1e-12, "{a1} > {a0}");
        let moved = [(0.04, 0.5), (0.12, 0.3)];
        let a2 = area(&pareto_front(&moved), 0.2, 1.0).unwrap();
        assert!(a2 <= a0 + 1e-12);
    }
}
