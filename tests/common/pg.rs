//! The test PostgreSQL server (`MIB_TEST_PG_URL`): a fresh schema per test, and a bridge config
//! pointed at it.

use std::path::Path;

pub fn pg_url() -> String {
    std::env::var("MIB_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Creates a new schema on the test PostgreSQL server (as the store suite does) and points the
/// bridge config at it; returns the schema's name.
pub async fn use_fresh_pg_schema(config: &Path) -> String {
    let base = pg_url();
    let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} (MIB_TEST_PG_URL) is needed: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .expect("create schema");
    pool.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    point_config_at_postgres(
        config,
        &format!("{base}{sep}options=-c%20search_path%3D{schema}"),
    );
    schema
}

/// Switches the bridge config from its SQLite file to the PostgreSQL database at `uri`.
pub fn point_config_at_postgres(config: &Path, uri: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    let text: String = text
        .lines()
        .map(|l| {
            if l == "    type: sqlite" {
                "    type: postgres".to_owned()
            } else if l.starts_with("    uri: sqlite://") {
                format!("    uri: \"{uri}\"")
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();
    assert!(text.contains("type: postgres"), "{text}");
    std::fs::write(config, text).expect("write config");
}

/// Drops a schema made by [`use_fresh_pg_schema`].
pub async fn drop_pg_schema(schema: &str) {
    let pool = sqlx::PgPool::connect(&pg_url()).await.expect("postgres");
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&pool)
        .await;
    pool.close().await;
}
