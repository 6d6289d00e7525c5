// Generates the Rust types of the interop wire schemas in proto/ (needs `protoc`).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .compile_protos(&["proto/interop.proto", "proto/content.proto"], &["proto"])
}
