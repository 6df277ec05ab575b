//! Log rate limiting for guest-triggered warnings: a hostile guest must not flood the log.

/// Allows the first few occurrences, then every power of ten, so a flood stays visible but
/// costs a handful of lines.
#[derive(Debug, Default)]
pub struct RateLimited {
    count: u64,
}

/// Occurrences logged before thinning out.
const FIRST: u64 = 10;

impl RateLimited {
    /// A fresh counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one occurrence; true if this one should be logged.
    pub fn hit(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= FIRST || is_power_of_ten(self.count)
    }

    /// Occurrences so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_ten_then_powers_of_ten() {
        let mut r = RateLimited::new();
        let mut logged = Vec::new();
        for n in 1..=10_000u64 {
            if r.hit() {
                logged.push(n);
            }
        }
        let mut expected: Vec<u64> = (1..=10).collect();
        expected.extend([100, 1000, 10_000]);
        assert_eq!(logged, expected);
    }
}
