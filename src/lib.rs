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

/// Keeps freed memory in the process for reuse instead of handing it back to the kernel.
///
/// A training step allocates and frees the same activation buffers every step. glibc serves
/// blocks above its mmap threshold with fresh `mmap`s and returns them on free, so each step
/// would page-fault (and have the kernel zero) every large buffer again — measured here at about
/// 2 000 faults and 10 ms of kernel time per nanogpt-cpu step. Raising the mmap and trim
/// thresholds makes freed blocks reusable, as PyTorch's caching CPU allocator does. Peak memory
/// is unchanged (the process reuses what it had at its peak). A no-op off glibc.
///
/// One arena for all threads: allocations made on a rayon worker go to a per-thread arena
/// whose heaps are at most 64 MiB, so a larger block (GPT-2's [4, 256, 50257] logits are
/// 206 MB) is a fresh `mmap` there whatever the threshold says, unmapped again on free —
/// 143 000 faults (560 MB zeroed by the kernel) per GPT-2 step before this, none after.
/// Our allocations are few and large, so sharing one arena's lock costs nothing measurable.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
