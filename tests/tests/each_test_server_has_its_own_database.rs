//! The harness gives every test server a database of its own: on PostgreSQL
//! (`HERALD_TEST_DATABASE_URL` set, as in scripts/test.sh's second run) a fresh database
//! that `init` fills with the schema and that is dropped with the server; otherwise the
//! SQLite file in the server's data directory, as always.

use herald_tests::{on_postgres, TestServer, DATABASE_URL_VAR};

/// Whether database `name` exists on the server of `HERALD_TEST_DATABASE_URL`.
fn exists(name: &str) -> bool {
    let admin = std::env::var(DATABASE_URL_VAR).expect("on PostgreSQL");
    let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("connect");
    let row = client
        .query_one(
            "SELECT COUNT(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .expect("query pg_database");
    row.get::<_, i64>(0) == 1
}

/// The tables in the public schema of the database at `url`.
fn tables(url: &str) -> Vec<String> {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    client
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .expect("list tables")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn each_test_server_has_its_own_database() {
    let one = TestServer::start("own-db-1");
    let two = TestServer::start("own-db-2");
    if !on_postgres() {
        assert_eq!(one.database_url(), None);
        assert!(one.db_path().is_file(), "SQLite stays the default");
        assert_ne!(one.db_path(), two.db_path());
        return;
    }
    let (url_one, url_two) = (
        one.database_url().expect("a database").to_string(),
        two.database_url().expect("a database").to_string(),
    );
    assert_ne!(url_one, url_two);
    let name = url_one.rsplit('/').next().expect("a path").to_string();
    assert!(exists(&name), "{name}");
    // init made the schema in the server's own database.
    let schema = tables(&url_one);
    for table in ["agents", "jobs", "orders"] {
        assert!(schema.iter().any(|t| t == table), "{table} in {schema:?}");
    }
    // The servers share nothing: a token made on one is listed by it alone.
    one.token(&[]);
    assert_eq!(
        one.json(&["token", "list"]).as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(
        two.json(&["token", "list"]).as_array().map(Vec::len),
        Some(0)
    );

    drop(one);
    assert!(!exists(&name), "{name} dropped with its server");
    assert!(
        !tables(&url_two).is_empty(),
        "the other server's database is kept"
    );
}
