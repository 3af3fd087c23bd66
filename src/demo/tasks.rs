//! The demo's synthetic tasks: two-digit arithmetic written as text, one problem per line.
//!
//! * **base** — addition, answer zero-padded to three digits: `47+85=132`
//! * **task 1 (subtract)** — `85-47=038` (always a ≥ b): the same format and vocabulary, a
//!   different operation (borrows instead of carries). Hard enough that rank and placement
//!   matter: in 1,500 steps (seeds 1–5 and 1337) full fine-tuning reaches 99.2–100 %, LoRA
//!   r = 8 on every linear layer 86–100 %, r = 1 there 8–73 %, and r = 8 on W_q, W_v only 7–99 %
//!   (median 18 %) — a new operation needs the MLPs, not only attention. In 500 steps the results
//!   swing with the seed and with the last bits of the numerics (full fine-tuning 9–61 % at lr
//!   1e-3 or 3e-3, seeds 1, 2, 1337), so the demo does not use that budget.
//! * **task 2 (add-one)** — `47+85=133`: the sum plus one — the base skill with a changed rule
//!   (a carry can now ripple from the units), learnt in 500 steps by an r = 8 adapter on W_q, W_v.
//!
//! All share one 14-character vocabulary (digits, `+`, `-`, `=`, newline). A small GPT learns the
//! base task well in a minute. (An earlier build also tried writing the sum's digits in reverse
//! order: full fine-tuning reached 50 % in 500 steps but LoRA on q, v stayed at the base's 8 %.) Held-out
//! problems (pairs never seen in training) measure exact-match accuracy: the model is prompted
//! with `47+85=` and must produce the three answer digits greedily.

use rand::seq::SliceRandom;
use rand::SeedableRng;

pub const VOCAB: &str = "\n+-=0123456789";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    Add,
    Subtract,
    AddOne,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Add => "add",
            Task::Subtract => "subtract",
            Task::AddOne => "add-one",
        }
    }

    /// `(prompt, answer)` for a pair of two-digit numbers.
    pub fn problem(self, a: u32, b: u32) -> (String, String) {
        match self {
            Task::Add => (format!("{a:02}+{b:02}="), format!("{:03}", a + b)),
            Task::Subtract => {
                let (hi, lo) = (a.max(b), a.min(b));
                (format!("{hi:02}-{lo:02}="), format!("{:03}", hi - lo))
            }
            Task::AddOne => (format!("{a:02}+{b:02}="), format!("{:03}", a + b + 1)),
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
            Task::AddOne.problem(47, 85),
            ("47+85=".into(), "133".into())
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
