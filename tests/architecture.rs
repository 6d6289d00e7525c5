//! The architecture as the compiler sees it: which crate of the workspace may depend on what
//! (docs/architecture.md). A wrong dependency fails this test, not a review.
//!
//! The rules are checked on everything a crate links (its normal and build dependencies,
//! transitively), read from `cargo metadata`. Rules for crates the workspace does not have yet
//! are kept so that a crate split out later is held to them from its first commit.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Crates of the bridge proper (everything but the wire protocol and the reference gateway).
const BRIDGE: &[&str] = &[
    "matrix-interop-bridge",
    "mib-core",
    "mib-matrix",
    "mib-interop",
    "mib-store",
];

/// What talks HTTP, SQL, Matrix crypto or Signal.
const HTTP: &[&str] = &["axum", "hyper", "reqwest"];
const SQL: &[&str] = &["sqlx", "sqlx-core"];
const MATRIX: &[&str] = &["ruma", "matrix-sdk-crypto", "matrix-sdk-sqlite"];
/// Matrix crates but ruma, which the core links for its typed Matrix events: a crate that
/// depends on the core links ruma too, and may still not name it (see [`direct_rules`]).
const MATRIX_BUT_RUMA: &[&str] = &["matrix-sdk-crypto", "matrix-sdk-sqlite"];
const SIGNAL: &[&str] = &["libsignal-protocol-syft"];

/// (crate, what it must never link, why).
fn rules() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    let all = |parts: &[&[&'static str]]| parts.concat();
    vec![
        (
            "mib-wire",
            all(&[BRIDGE, &["mib-gateway"], HTTP, SQL, MATRIX, SIGNAL]),
            "the wire protocol is shared by both ends and holds no policy",
        ),
        (
            "mib-gateway",
            all(&[BRIDGE, HTTP, MATRIX]),
            "the reference gateway shares only the wire protocol with the bridge",
        ),
        (
            "mib-core",
            all(&[
                &[
                    "mib-matrix",
                    "mib-interop",
                    "mib-store",
                    "mib-gateway",
                    "mib-wire",
                ],
                HTTP,
                SQL,
                SIGNAL,
                &["prost", "matrix-sdk-crypto"],
            ]),
            "the core imports neither side, nor HTTP, SQL, Signal or protobuf",
        ),
        (
            "mib-vault",
            all(&[
                &[
                    "matrix-interop-bridge",
                    "mib-matrix",
                    "mib-interop",
                    "mib-store",
                    "mib-gateway",
                    "mib-wire",
                ],
                HTTP,
                SQL,
                MATRIX_BUT_RUMA,
                SIGNAL,
            ]),
            "encryption at rest is a library the store and both sides use: it knows none of them",
        ),
        (
            "mib-matrix",
            all(&[
                &["mib-interop", "mib-store", "mib-gateway", "mib-wire"],
                SQL,
                SIGNAL,
            ]),
            "the Matrix side never depends on the interop side or the store",
        ),
        (
            "mib-interop",
            all(&[
                &["mib-matrix", "mib-store", "mib-gateway"],
                HTTP,
                MATRIX_BUT_RUMA,
            ]),
            "the interop side never depends on the Matrix side or the store",
        ),
        (
            "mib-store",
            vec!["mib-matrix", "mib-interop", "mib-gateway", "axum"],
            "the store implements the core's traits and knows neither side",
        ),
        (
            "mib-alloc",
            all(&[
                BRIDGE,
                &["mib-vault", "mib-gateway", "mib-wire", "prost"],
                HTTP,
                SQL,
                MATRIX,
                SIGNAL,
            ]),
            "the allocator of both programs is process set-up: it knows nothing of either",
        ),
        (
            "matrix-interop-bridge",
            vec!["mib-gateway"],
            "the bridge never links the reference gateway (tests may, as a dev-dependency)",
        ),
    ]
}

/// (crate, what it must not depend on directly, why): what its code may never name, though it
/// links it through another crate.
fn direct_rules() -> Vec<(&'static str, Vec<&'static str>, &'static str)> {
    let matrix = "never names a Matrix type: it links ruma only because the core's Matrix-facing \
                  traits take ruma's events";
    vec![
        ("mib-interop", MATRIX.to_vec(), matrix),
        ("mib-vault", MATRIX.to_vec(), matrix),
    ]
}

/// For every workspace crate, the names of the packages it depends on directly (normal and
/// build dependencies).
fn direct(meta: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| members.contains(p["id"].as_str().unwrap_or("")))
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null() || d["kind"] == "build")
                .filter_map(|d| d["name"].as_str().map(str::to_owned))
                .collect();
            (p["name"].as_str().unwrap_or("").to_owned(), deps)
        })
        .collect()
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("metadata JSON")
}

/// For every workspace crate, the names of every package it links (normal and build
/// dependencies, transitively).
fn linked(meta: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve") {
        let id = node["id"].as_str().unwrap_or("");
        let deps = node["deps"].as_array().expect("deps").iter().filter(|d| {
            d["dep_kinds"].as_array().is_some_and(|ks| {
                ks.iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
        });
        edges.insert(id, deps.map(|d| d["pkg"].as_str().unwrap_or("")).collect());
    }
    let mut out = BTreeMap::new();
    for member in meta["workspace_members"].as_array().expect("members") {
        let start = member.as_str().unwrap_or("");
        let mut seen = BTreeSet::new();
        let mut todo = edges.get(start).cloned().unwrap_or_default();
        while let Some(id) = todo.pop() {
            if seen.insert(id) {
                todo.extend(edges.get(id).cloned().unwrap_or_default());
            }
        }
        out.insert(
            name_of[start].to_owned(),
            seen.iter().map(|id| name_of[id].to_owned()).collect(),
        );
    }
    out
}

#[test]
fn every_crate_links_only_what_the_architecture_allows() {
    let meta = metadata();
    let linked = linked(&meta);
    for required in [
        "matrix-interop-bridge",
        "mib-core",
        "mib-matrix",
        "mib-interop",
        "mib-store",
        "mib-vault",
        "mib-wire",
        "mib-gateway",
        "mib-alloc",
    ] {
        assert!(
            linked.contains_key(required),
            "{required} is not in the workspace"
        );
    }
    let mut broken = Vec::new();
    for (krate, forbidden, why) in rules() {
        let Some(deps) = linked.get(krate) else {
            continue;
        };
        for f in forbidden {
            if deps.contains(f) {
                broken.push(format!("{krate} links {f}: {why}"));
            }
        }
    }
    let direct = direct(&meta);
    for (krate, forbidden, why) in direct_rules() {
        for f in forbidden {
            if direct.get(krate).is_some_and(|d| d.contains(f)) {
                broken.push(format!("{krate} depends on {f}: {why}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The rules above are not vacuous: the gateway and the bridge do link what they are made of.
#[test]
fn the_rules_see_real_dependencies() {
    let linked = linked(&metadata());
    assert!(linked["mib-gateway"].contains("mib-wire"));
    assert!(linked["mib-gateway"].contains("sqlx"));
    assert!(linked["mib-gateway"].contains("mimalloc"));
    assert!(linked["matrix-interop-bridge"].contains("mimalloc"));
    assert!(linked["matrix-interop-bridge"].contains("mib-wire"));
    assert!(linked["matrix-interop-bridge"].contains("ruma"));
    assert!(linked["matrix-interop-bridge"].contains("mib-core"));
    assert!(linked["mib-core"].contains("serde_json"));
    assert!(linked["mib-core"].contains("ruma"));
    let direct = direct(&metadata());
    assert!(direct["mib-interop"].contains("mib-core"));
    assert!(direct["mib-matrix"].contains("ruma"));
    assert!(linked["mib-vault"].contains("chacha20poly1305"));
    assert!(linked["mib-store"].contains("sqlx"));
    assert!(linked["mib-store"].contains("mib-core"));
    assert!(linked["mib-matrix"].contains("axum"));
    assert!(linked["mib-matrix"].contains("matrix-sdk-crypto"));
    assert!(linked["mib-matrix"].contains("mib-core"));
    assert!(linked["mib-interop"].contains("libsignal-protocol-syft"));
    assert!(linked["mib-interop"].contains("mib-wire"));
    assert!(linked["mib-interop"].contains("mib-vault"));
}
