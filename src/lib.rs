//! # tapelora
//!
//! Tape-based reverse-mode autodiff, a small GPT-2 and LoRA, in pure Rust — built so that a
//! student can watch LoRA work end to end and an auditor can verify every gradient step.
//!
//! This root crate re-exports the workspace's member crates and hosts the `tapelora` CLI.
//!
//! | crate | re-exported as | what it holds |
//! |---|---|---|
//! | `tapelora-autograd` | [`autograd`] | the tape, ops with side-by-side backward rules, gradcheck, DOT export |

pub use tapelora_autograd as autograd;

pub mod cli;
pub mod demo;
pub mod plot;
