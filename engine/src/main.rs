use clap::Parser;

fn main() -> std::process::ExitCode {
    ferry_engine::cli::main(ferry_engine::cli::Cli::parse())
}
