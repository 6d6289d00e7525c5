// Generates the Rust types of the interop wire schemas (needs `protoc`). The schemas live at the
// top of the repository, beside the protocol document they belong to (docs/interop-protocol.md).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=../../proto");
    prost_build::Config::new().compile_protos(
        &["../../proto/interop.proto", "../../proto/content.proto"],
        &["../../proto"],
    )
}
