//! # tapelora-lora — LoRA adapters for GPT-2, like PEFT, in the open
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`LoraConfig`] (r, α, rsLoRA, dropout, targets, layers, bias, init) and the scale s |
//! | [`target`] | target names → GPT-2 modules (PEFT's suffix rule; c_attn q/k/v slices) |
//! | [`layer`] | [`LoraLinear`]: adapters on a frozen Linear, `y = W₀x + b + s·B(A(dropout(x)))` |
//! | [`model`] | [`LoraModel`]: add, set active, disable, delete, merge, unmerge, merge_and_unload |
//! | [`analysis`] | ΔW, singular values (nalgebra SVD), numerical rank, per-module reports |
//! | [`combine`] | weighted combination of adapters: linear, cat, svd |
//! | [`peft`] | PEFT adapter folders, both ways (q/v slices exported exactly as rank-k·r c_attn) |
//! | [`error`] | [`LoraError`] |

pub mod analysis;
pub mod combine;
pub mod config;
pub mod error;
pub mod layer;
pub mod model;
pub mod peft;
pub mod target;

pub use combine::Combination;
pub use config::{scaling, InitA, LoraBias, LoraConfig};
pub use error::{LoraError, Result};
pub use layer::{LayerKind, LoraAdapter, LoraLinear, LoraPart, OutSlice};
pub use model::{lora_layers_of, thousands, LoraModel};
pub use target::{ModuleKind, Qkv, Target};
