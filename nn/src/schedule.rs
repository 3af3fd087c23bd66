//! Learning-rate schedule: linear warmup, then cosine decay to a minimum (nanoGPT's `get_lr`).

/// `lr(step)` for step = 0, 1, …:
/// * `step < warmup`: `max_lr · (step + 1) / (warmup + 1)`;
/// * `step > decay_steps`: `min_lr`;
/// * otherwise `min_lr + ½(1 + cos(π·r))·(max_lr − min_lr)`, r = (step − warmup)/(decay_steps − warmup).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub decay_steps: usize,
}

impl CosineSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.max_lr * (step + 1) as f64 / (self.warmup + 1) as f64;
        }
        if step > self.decay_steps || self.decay_steps <= self.warmup {
            return self.min_lr;
        }
        let ratio = (step - self.warmup) as f64 / (self.decay_steps - self.warmup) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_peak_and_floor() {
        let s = CosineSchedule {
            max_lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            decay_steps: 2000,
        };
        assert!((s.lr(0) - 1e-3 / 101.0).abs() < 1e-15);
        assert!((s.lr(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-15);
        assert!((s.lr(100) - 1e-3).abs() < 1e-15);
        assert!((s.lr(1050) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(2000) - 1e-4).abs() < 1e-15);
        assert_eq!(s.lr(5000), 1e-4);
        assert!((1..2000).all(|t| t <= 100 || s.lr(t) <= s.lr(t - 1)));
    }
}
