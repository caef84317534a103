//! The `steer` binary: see the library's documentation and `steer --help`.

fn main() -> std::process::ExitCode {
    steer::cli_main()
}
