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
//! | [`alloc`] | the CLI's global allocator: the system one plus a cache of freed blocks too large for a thread's arena |

pub use tapelora_autograd as autograd;
pub use tapelora_gpt as gpt;
pub use tapelora_lora as lora;
pub use tapelora_nn as nn;

pub mod alloc;
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
/// Each thread keeps glibc's arena of its own: nanogpt-cpu's step records two groups of
/// sequences side by side, and with one arena for both threads every allocation and free took
/// the one lock (≈ 13 more futex waits per step) and a buffer freed on one core could be handed
/// to the other: steps 3–5 % slower (alternated runs; a per-thread cache of the mid-size
/// buffers alone won back 0–2 %, so the lock was most of it). A thread's arena grows in heaps of at most 64 MiB, and glibc deletes a heap as soon
/// as all of it is free, whatever the trim threshold — GPT-2's step emptied one each step and
/// page-faulted 64 MB back in (≈ 14 000 faults) — unless the top pad is that large: a heap is
/// then kept, and growing one reserves 64 MiB more address space without touching it. Blocks
/// larger than a heap are [`alloc::HugeBlockCache`]'s: a program that calls this should also
/// make that its `#[global_allocator]`, as the `tapelora` binary does, or every block over
/// 64 MiB allocated on a rayon worker is a fresh `mmap`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
