//! Token streams for training and evaluation: the 90/10 split, random batches (nanoGPT's
//! `get_batch`), and consecutive non-overlapping evaluation windows.

use ndarray::{ArrayD, IxDyn};
use rand::Rng;

use crate::{GptError, Result};

/// A tokenised text split into a training and a validation part.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl Dataset {
    /// The first `⌊n·(1 − val_fraction)⌋` tokens train, the rest validate (nanoGPT's split).
    pub fn split(tokens: Vec<u32>, val_fraction: f64) -> Self {
        let n_train = ((tokens.len() as f64) * (1.0 - val_fraction)) as usize;
        let mut train = tokens;
        let val = train.split_off(n_train.min(train.len()));
        Dataset { train, val }
    }
}

/// `batch` random windows of `block` tokens: inputs `[batch, block]` and next-token targets.
pub fn random_batch(
    tokens: &[u32],
    batch: usize,
    block: usize,
    rng: &mut impl Rng,
) -> Result<(ArrayD<usize>, Vec<i64>)> {
    if tokens.len() <= block {
        return Err(GptError::Input(format!(
            "{} tokens are too few for one window of {block} tokens plus its next-token target",
            tokens.len()
        )));
    }
    let mut ids = Vec::with_capacity(batch * block);
    let mut targets = Vec::with_capacity(batch * block);
    for _ in 0..batch {
        let start = rng.random_range(0..tokens.len() - block);
        ids.extend(tokens[start..start + block].iter().map(|&t| t as usize));
        targets.extend(
            tokens[start + 1..start + block + 1]
                .iter()
                .map(|&t| t as i64),
        );
    }
    Ok((
        ArrayD::from_shape_vec(IxDyn(&[batch, block]), ids).expect("batch·block ids"),
        targets,
    ))
}

/// Number of evaluation windows of `block` tokens: ⌊(len − 1)/block⌋.
pub fn num_windows(len: usize, block: usize) -> usize {
    len.saturating_sub(1) / block.max(1)
}

/// Windows `first .. first + count` (inputs `tokens[i·N .. (i+1)·N]`, targets shifted by one)
/// as one batch.
pub fn window_batch(
    tokens: &[u32],
    block: usize,
    first: usize,
    count: usize,
) -> (ArrayD<usize>, Vec<i64>) {
    let mut ids = Vec::with_capacity(count * block);
    let mut targets = Vec::with_capacity(count * block);
    for w in first..first + count {
        let start = w * block;
        ids.extend(tokens[start..start + block].iter().map(|&t| t as usize));
        targets.extend(
            tokens[start + 1..start + block + 1]
                .iter()
                .map(|&t| t as i64),
        );
    }
    (
        ArrayD::from_shape_vec(IxDyn(&[count, block]), ids).expect("count·block ids"),
        targets,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn split_batches_and_windows() {
        let d = Dataset::split((0..100).collect(), 0.1);
        assert_eq!((d.train.len(), d.val.len()), (90, 10));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (ids, targets) = random_batch(&d.train, 4, 8, &mut rng).unwrap();
        assert_eq!(ids.shape(), &[4, 8]);
        for (i, t) in ids.iter().zip(&targets) {
            assert_eq!(*i as i64 + 1, *t, "targets are the next tokens");
        }
        assert!(random_batch(&d.val, 1, 10, &mut rng).is_err());
        assert_eq!(num_windows(10, 3), 3);
        assert_eq!(num_windows(9, 3), 2);
        let (ids, targets) = window_batch(&d.val, 3, 1, 2);
        assert_eq!(
            ids.iter().copied().collect::<Vec<_>>(),
            [93, 94, 95, 96, 97, 98]
        );
        assert_eq!(targets, [94, 95, 96, 97, 98, 99]);
    }
}
