fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so building needs nothing installed beyond the Rust toolchain.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/ferry/v1/ferry.proto");
    tonic_prost_build::configure().compile_protos(&["proto/ferry/v1/ferry.proto"], &["proto"])?;
    Ok(())
}
