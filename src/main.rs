use clap::Parser;

/// The system allocator, plus a cache of freed blocks of 32 MiB and more (see `alloc`).
#[global_allocator]
static ALLOCATOR: tapelora::alloc::HugeBlockCache = tapelora::alloc::HugeBlockCache::new();

fn main() {
    tapelora::keep_freed_memory();
    let cli = tapelora::cli::Cli::parse();
    // The whole command runs on a worker of the one rayon pool: parallel sections then split
    // work between this thread and the other workers, instead of parking an extra main thread
    // that would compete with them for the cores between sections.
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("tapelora-{i}"))
        .build();
    let result = match pool {
        Ok(pool) => pool.install(|| tapelora::cli::run(cli)),
        Err(_) => tapelora::cli::run(cli),
    };
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
