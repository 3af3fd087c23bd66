//! # tapelora
//!
//! Tape-based reverse-mode autodiff, a small GPT-2 and LoRA, in pure Rust — built so that a
//! student can watch LoRA work end to end and an auditor can verify every gradient step.
//!
//! This root crate re-exports the workspace's member crates and hosts the `tapelora` CLI.
//!
//! | item | what it holds |
//! |---|---|
//! | [`autograd`] (`tapelora-autograd`) | the tape, ops with side-by-side backward rules, gradcheck, DOT export |
//! | [`nn`] (`tapelora-nn`) | parameters, modules, layers, init, optimizers, schedules, safetensors state |
//! | [`gpt`] (`tapelora-gpt`) | GPT-2, Hugging Face folders, tokenizers, training, generation |
//! | [`lora`] (`tapelora-lora`) | LoRA adapters, merge/swap/combine, PEFT folders, §7 analyses |
//! | [`cli`] | the `tapelora` commands (train, eval, generate, finetune, merge, inspect, graph, report, bench, demo) |
//! | [`demo`] | the end-to-end demo and its generated arithmetic tasks |
//! | [`plot`] | SVG line charts and heatmaps (plotters) |

pub use tapelora_autograd as autograd;
pub use tapelora_gpt as gpt;
pub use tapelora_lora as lora;
pub use tapelora_nn as nn;

pub mod cli;
pub mod demo;
pub mod plot;
