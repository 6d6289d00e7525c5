// Generates the Rust types of the interop wire schemas in proto/ (needs `protoc`).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    // sqlx::migrate! embeds the migrations; a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
    prost_build::Config::new()
        .compile_protos(&["proto/interop.proto", "proto/content.proto"], &["proto"])
}
