fn main() -> std::process::ExitCode {
    vxnet::cli::main()
}
