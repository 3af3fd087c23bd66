//! The demo's synthetic tasks: two-digit arithmetic written as text, one problem per line.
//!
//! * **base** — addition, answer zero-padded to three digits: `47+85=132`
//! * **task 1 (reverse)** — the same sums with the answer's digits reversed: `47+85=231`.
//!   The model must still add (carry and all), then write the result in a new order — new
//!   output behaviour on top of a skill the base model has.
//! * **task 2 (subtract)** — `85-47=038` (always a ≥ b): the same format and vocabulary, a
//!   different operation.
//!
//! All share one 13-character vocabulary (digits, `+`, `-`, `=`, newline). A small GPT learns the
//! base task well in a minute; the downstream tasks are learnable both by full fine-tuning and by
//! low-rank adapters. Held-out problems (pairs never seen in training) measure exact-match
//! accuracy: the model is prompted with `47+85=` and must produce the three answer digits
//! greedily.

use rand::seq::SliceRandom;
use rand::SeedableRng;

pub const VOCAB: &str = "\n+-=0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Add,
    Reverse,
    Subtract,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Add => "add",
            Task::Reverse => "reverse",
            Task::Subtract => "subtract",
        }
    }

    /// `(prompt, answer)` for a pair of two-digit numbers.
    pub fn problem(self, a: u32, b: u32) -> (String, String) {
        match self {
            Task::Add => (format!("{a:02}+{b:02}="), format!("{:03}", a + b)),
            Task::Reverse => (
                format!("{a:02}+{b:02}="),
                format!("{:03}", a + b).chars().rev().collect(),
            ),
            Task::Subtract => {
                let (hi, lo) = (a.max(b), a.min(b));
                (format!("{hi:02}-{lo:02}="), format!("{:03}", hi - lo))
            }
        }
    }
}

/// Two operands.
pub type Pair = (u32, u32);

/// All 100 × 100 pairs, shuffled with `seed` and split into training and held-out pairs.
pub fn split_pairs(seed: u64, held_out: usize) -> (Vec<Pair>, Vec<Pair>) {
    let mut pairs: Vec<(u32, u32)> = (0..100)
        .flat_map(|a| (0..100).map(move |b| (a, b)))
        .collect();
    pairs.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let test = pairs.split_off(pairs.len() - held_out);
    (pairs, test)
}

/// The text of `task` over `pairs`, one problem per line, in the given order repeated
/// `epochs` times (each time reshuffled).
pub fn text(task: Task, pairs: &[(u32, u32)], epochs: usize, seed: u64) -> String {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order = pairs.to_vec();
    let mut out = String::new();
    for _ in 0..epochs {
        order.shuffle(&mut rng);
        for &(a, b) in &order {
            let (p, ans) = task.problem(a, b);
            out += &p;
            out += &ans;
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_and_split() {
        assert_eq!(Task::Add.problem(47, 85), ("47+85=".into(), "132".into()));
        assert_eq!(
            Task::Reverse.problem(47, 85),
            ("47+85=".into(), "231".into())
        );
        assert_eq!(
            Task::Subtract.problem(47, 85),
            ("85-47=".into(), "038".into())
        );
        let (train, test) = split_pairs(1, 500);
        assert_eq!((train.len(), test.len()), (9500, 500));
        assert!(test.iter().all(|p| !train.contains(p)));
        let t = text(Task::Add, &train[..3], 2, 0);
        assert_eq!(t.lines().count(), 6);
        assert!(t.chars().all(|c| VOCAB.contains(c)));
    }
}
