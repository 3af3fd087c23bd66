//! # tapelora-nn — modules, optimizers and state for models on the tape
//!
//! | module | what it holds |
//! |---|---|
//! | [`parameter`] | [`Parameter`]: a named tensor, trainable or frozen, that enters a tape as a leaf |
//! | [`module`] | the [`Module`] trait (visit parameters in order, by hierarchical name) and [`LinearAdapter`] / [`EmbeddingAdapter`], the hooks LoRA attaches through |
//! | [`ctx`] | [`Ctx`]: the tape being recorded, train/eval mode, the dropout RNG |
//! | [`layers`] | [`Linear`] (Conv1D `[in, out]` or nn.Linear `[out, in]` layout; its adapter gets the uncomputed [`BaseLinear`]), [`Embedding`], [`LayerNorm`], [`Dropout`], [`Gelu`] |
//! | [`init`] | normal, uniform, kaiming-uniform, zeros, ones |
//! | [`optim`] | [`AdamW`], [`Sgd`], [`clip_grad_norm`]; state only for trainable parameters |
//! | [`schedule`] | [`CosineSchedule`]: linear warmup + cosine decay (nanoGPT) |
//! | [`state`] | safetensors reading (F32/F64/F16/BF16/I64) and atomic writing, state dicts |
//! | [`error`] | [`NnError`] |

pub mod ctx;
pub mod error;
pub mod init;
pub mod layers;
pub mod module;
pub mod optim;
pub mod parameter;
pub mod schedule;
pub mod state;

pub use ctx::Ctx;
pub use error::{NnError, Result};
pub use layers::{BaseLinear, Dropout, Embedding, Gelu, LayerNorm, Linear, WeightLayout};
pub use module::{EmbeddingAdapter, LinearAdapter, Module};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig, DecayFilter, Optimizer, Sgd, SgdConfig};
pub use parameter::Parameter;
pub use schedule::CosineSchedule;
pub use state::{
    load_state_dict, save_safetensors, state_dict, stored_to_safetensors_bytes, write_atomic,
    Stored, TensorFile,
};
