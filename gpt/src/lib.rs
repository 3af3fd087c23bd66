//! # tapelora-gpt — GPT-2 on the tape
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`GptConfig`], presets (`nanogpt-cpu`, `gpt2`), Hugging Face `config.json` |
//! | [`model`] | [`Gpt`]: embeddings, pre-LN blocks, fused c_attn, causal attention, tied lm_head; [`KvCache`] |
//! | [`data`] | the 90/10 split, random batches, evaluation windows |
//! | [`train`] | the training loop (AdamW, warmup + cosine, clipping, evaluation) and `evaluate` |
//! | [`step`] | one step's loss and gradients; a small model's batch as groups of sequences side by side |
//! | [`generate`] | sampling (temperature, top-k, top-p) with the KV cache |
//! | [`greedy`] | greedy search's lm_head from an int8 copy of the table (per-row and per-column scales), with a proven bound, so the token is the full product's argmax |
//! | [`tokenizer`] | char-level and GPT-2 byte-level BPE (built in, or vocab.json + merges.txt) |
//! | [`hf`] | Hugging Face GPT-2 folders: load (with or without `transformer.`), save atomically |
//! | [`error`] | [`GptError`] |

pub mod config;
pub mod data;
pub mod error;
pub mod generate;
pub mod greedy;
pub mod hf;
pub mod model;
pub mod step;
pub mod tokenizer;
pub mod train;

pub use config::GptConfig;
pub use error::{GptError, Result};
pub use model::{Gpt, KvCache};
