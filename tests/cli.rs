//! The command line as an admin uses it: generate-config, generate-registration, migrate,
//! config errors that name the key (also from environment overrides), and vault key rotation.

use std::process::Command;

#[path = "common/alloc.rs"]
mod alloc;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_matrix-interop-bridge"))
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn admin_workflow_and_config_errors() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("config.yaml");
    let reg = dir.path().join("registration.yaml");

    let (ok, out) = run(bin().arg("--version"));
    assert!(ok && out.contains(env!("CARGO_PKG_VERSION")), "{out}");

    let (ok, out) = run(bin().args(["generate-config", "-o"]).arg(&cfg));
    assert!(ok, "{out}");
    assert!(
        dir.path().join("vault.key").exists(),
        "a master key is created next to the config"
    );
    let (ok, out) = run(bin().args(["generate-config", "-o"]).arg(&cfg));
    assert!(!ok && out.contains("exists"), "never overwrites: {out}");

    // The example needs the gateway key before anything else works; the error says so.
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["generate-registration", "-o"])
        .arg(&reg));
    assert!(!ok && out.contains("interop.gateway_public_key"), "{out}");
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "gateway_public_key: \"\"",
        "gateway_public_key: \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
    );
    let text = text.replace(
        "uri: sqlite://matrix-interop-bridge.db",
        &format!("uri: sqlite://{}", dir.path().join("b.db").display()),
    );
    std::fs::write(&cfg, text).expect("write");

    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["generate-registration", "-o"])
        .arg(&reg));
    assert!(ok, "{out}");
    let reg_text = std::fs::read_to_string(&reg).expect("registration");
    let cfg_text = std::fs::read_to_string(&cfg).expect("config");
    let as_token = reg_text
        .lines()
        .find_map(|l| l.strip_prefix("as_token: "))
        .expect("as_token")
        .trim_matches('\'')
        .trim_matches('"');
    assert!(
        cfg_text.contains(as_token),
        "tokens are written back into the config"
    );
    assert!(
        cfg_text.contains("# matrix-interop-bridge configuration."),
        "comments survive"
    );

    let (ok, out) = run(bin().arg("-c").arg(&cfg).arg("migrate"));
    assert!(ok && out.contains("migrated"), "{out}");

    // Environment overrides are validated like the file, and the error names the key.
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .env("MIB__DATABASE__TYPE", "mysql"));
    assert!(!ok && out.contains("database.type"), "{out}");
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .env("MIB__HOMESERVER__ADDRESS", "ftp://x"));
    assert!(!ok && out.contains("homeserver.address"), "{out}");
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .env("MIB__APPSERVICE__PORT", "not-a-port"));
    assert!(!ok && out.contains("port"), "{out}");

    // Without a vault master key the bridge refuses to start, and says how to fix it.
    let no_key = std::fs::read_to_string(&cfg)
        .expect("config")
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("master_key_file:") {
                "    master_key_file: \"\""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg2 = dir.path().join("nokey.yaml");
    std::fs::write(&cfg2, no_key).expect("write");
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg2)
        .env_remove("MIB_VAULT_MASTER_KEY"));
    assert!(!ok && out.contains("no vault master key"), "{out}");

    // Rotating the master key re-wraps the data keys; the old key no longer opens the vault.
    let new_key = dir.path().join("vault2.key");
    let (ok, out) = run(bin()
        .arg("-c")
        .arg(&cfg)
        .args(["vault", "rotate-master-key", "--new-key-file"])
        .arg(&new_key));
    assert!(ok && out.contains("re-wrapped"), "{out}");
    assert!(new_key.exists());
}

/// The bridge runs with mimalloc committing memory as it is used and returning freed memory at
/// once (with its defaults an idle bridge held about twice the memory): started without those
/// settings, it starts itself again with them; an admin's own value is kept.
#[test]
fn the_allocator_returns_memory_at_once() {
    let (ok, out) = run(bin().arg("--version").env("MIMALLOC_VERBOSE", "1"));
    assert!(ok && out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    assert_eq!(
        alloc::settings(&out),
        (Some("0".into()), Some("0".into())),
        "{out}"
    );

    let (ok, out) = run(bin()
        .arg("--version")
        .env("MIMALLOC_VERBOSE", "1")
        .env("MIMALLOC_PURGE_DELAY", "50"));
    assert!(ok, "{out}");
    assert_eq!(
        alloc::settings(&out),
        (Some("0".into()), Some("50".into())),
        "{out}"
    );
}
