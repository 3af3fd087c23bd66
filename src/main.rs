use clap::Parser;

fn main() {
    tapelora::keep_freed_memory();
    let cli = tapelora::cli::Cli::parse();
    if let Err(message) = tapelora::cli::run(cli) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
