//! Every SQL statement of the store, prepared on both databases: a misspelt table or column, a
//! statement one dialect does not accept, or a migration that drops what a query still reads
//! fails here, on SQLite and on PostgreSQL, naming the statement, whether or not a behavioural
//! test happens to run it.
//!
//! The statements are read from the store's own source: every string literal passed to
//! `sqlx::query`, `query_scalar` or `query_as`, or built with `format!`, that starts with
//! `SELECT`, `INSERT`, `UPDATE`, `DELETE` or `WITH`. A `{NAME}` in a `format!` is one of the
//! store's column lists; an unknown one fails the test, so that no statement is skipped.

use super::{
    portal::{MAP_COLS, PORTAL_COLS},
    testing,
};
use sqlx::Executor;

const SOURCES: &[(&str, &str)] = &[
    ("lib.rs", include_str!("lib.rs")),
    ("portal.rs", include_str!("portal.rs")),
    ("crypto.rs", include_str!("crypto.rs")),
    ("vault.rs", include_str!("vault.rs")),
    ("requests.rs", include_str!("requests.rs")),
    ("lease.rs", include_str!("lease.rs")),
];

/// Reads the string literal starting at `s[0] == '"'`: its value (escapes and line continuations
/// applied) and the rest after it.
fn literal(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars().skip(1).peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '\n' => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                'n' => out.push('\n'),
                't' => out.push('\t'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The statements in one source file, each with its line.
fn statements(src: &str) -> Vec<(usize, String)> {
    const MARKERS: &[&str] = &["sqlx::query", "format!("];
    const VERBS: &[&str] = &["SELECT", "INSERT", "UPDATE", "DELETE", "WITH"];
    let mut found = Vec::new();
    for marker in MARKERS {
        for (at, _) in src.match_indices(marker) {
            let rest = &src[at..];
            let Some(open) = rest.find('(') else { continue };
            let after = rest[open + 1..].trim_start();
            if !after.starts_with('"') {
                continue;
            }
            let Some(sql) = literal(after) else { continue };
            if VERBS.iter().any(|v| sql.trim_start().starts_with(v)) {
                let line = src[..at].matches('\n').count() + 1;
                found.push((line, sql));
            }
        }
    }
    found
}

/// Fills in the store's column lists; `Err` names a placeholder this check does not know.
fn expand(sql: &str, marks: super::Marks) -> Result<String, String> {
    let sql = sql
        .replace("{PORTAL_COLS}", PORTAL_COLS)
        .replace("{MAP_COLS}", MAP_COLS)
        .replace("{MARKS}", &marks.list(2))
        .replace("{RECORD_ROWS}", &marks.rows(2, 4))
        .replace("{KEY_ROWS}", &marks.rows(2, 3))
        .replace("{SEEN_ROWS}", &marks.rows(2, 2))
        .replace("{QUEUE_ROWS}", &marks.rows(2, 4))
        .replace("{MAP_ROWS}", &marks.rows(2, 7));
    match sql.find('{') {
        Some(i) => Err(format!("unknown placeholder in: {}", &sql[i..])),
        None => Ok(sql),
    }
}

fn all_statements() -> Vec<(String, String)> {
    let mut all = Vec::new();
    for (file, src) in SOURCES {
        for (line, sql) in statements(src) {
            all.push((format!("{file}:{line}"), sql));
        }
    }
    all
}

async fn prepare_all(db: &str, store: &super::SqlStore) -> Vec<String> {
    let mut broken = Vec::new();
    for (at, sql) in all_statements() {
        let sql = match expand(&sql, super::Marks::for_kind(store.kind)) {
            Ok(s) => s,
            Err(e) => {
                broken.push(format!("{at}: {e}"));
                continue;
            }
        };
        if let Err(e) = store
            .pool()
            .prepare(sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(
                sql.clone(),
            )))
            .await
        {
            broken.push(format!("{db} {at}: {e}\n    {sql}"));
        }
    }
    broken
}

#[test]
fn the_check_sees_the_stores_statements() {
    let all = all_statements();
    // Each file that talks SQL is seen, and the count is not vacuous.
    for file in ["lib.rs", "portal.rs", "crypto.rs", "vault.rs"] {
        assert!(
            all.iter().any(|(at, _)| at.starts_with(file)),
            "no statement found in {file}"
        );
    }
    assert!(all.len() >= 50, "only {} statements found", all.len());
    // A continued line joins without its indentation.
    assert_eq!(
        literal("\"SELECT a \\\n        FROM b\" rest").as_deref(),
        Some("SELECT a FROM b")
    );
}

/// The two placeholder styles of the statements built here.
#[test]
fn marks_are_numbered_or_anonymous() {
    use super::Marks;
    assert_eq!(Marks::Numbered.rows(2, 3), "($1, $2, $3), ($4, $5, $6)");
    assert_eq!(Marks::Anonymous.rows(2, 3), "(?, ?, ?), (?, ?, ?)");
    assert_eq!(Marks::Numbered.list(3), "$1, $2, $3");
    assert_eq!(Marks::Anonymous.list(2), "?, ?");
}

#[tokio::test]
async fn every_statement_prepares_on_sqlite() {
    let (store, _dir) = testing::sqlite().await;
    let conn = store.pool().acquire().await.expect("connection");
    assert_eq!(super::Marks::of(&conn), super::Marks::Anonymous);
    drop(conn);
    let broken = prepare_all("sqlite", &store).await;
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[tokio::test]
async fn every_statement_prepares_on_postgres() {
    let store = testing::postgres().await;
    let conn = store.pool().acquire().await.expect("connection");
    assert_eq!(super::Marks::of(&conn), super::Marks::Numbered);
    drop(conn);
    let broken = prepare_all("postgres", &store).await;
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
