//! # tapelora-gpt — GPT-2 on the tape
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`GptConfig`], presets (`nanogpt-cpu`, `gpt2`), Hugging Face `config.json` |
//! | [`model`] | [`Gpt`]: embeddings, pre-LN blocks, fused c_attn, causal attention, tied lm_head; [`KvCache`] |
//! | [`hf`] | Hugging Face GPT-2 folders: load (with or without `transformer.`), save atomically |
//! | [`error`] | [`GptError`] |

pub mod config;
pub mod error;
pub mod hf;
pub mod model;

pub use config::GptConfig;
pub use error::{GptError, Result};
pub use model::{Gpt, KvCache};
