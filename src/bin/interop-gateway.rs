fn main() { eprintln!("interop-gateway: not built yet"); std::process::exit(2); }
