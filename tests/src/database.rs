//! The suite's second backend: with `HERALD_TEST_DATABASE_URL` set (to a PostgreSQL
//! server the tests may create databases on, e.g. what `scripts/pg-cluster.sh` prints),
//! each [`TestServer`](crate::TestServer) keeps its data in a PostgreSQL database of its
//! own, created here and dropped when the server is. Unset, every server uses SQLite in
//! its data directory, as always.
//!
//! Tests that edit the SQLite file behind the server's back cannot run as they are on
//! PostgreSQL: they start with `if herald_tests::sqlite_only("why") { return; }`.

/// The variable naming the PostgreSQL server (a `postgres://` URL with a user that may
/// create databases).
pub const DATABASE_URL_VAR: &str = "HERALD_TEST_DATABASE_URL";

/// A file to which [`sqlite_only`] appends one line per test it skips, so that
/// scripts/test.sh can count them as skipped (libtest only knows they passed).
pub const SKIP_LOG_VAR: &str = "HERALD_TEST_SKIP_LOG";

/// Prefix of the databases the harness makes (one per test server).
const NAME_PREFIX: &str = "herald_t_";

/// Whether this run keeps the servers' data in PostgreSQL.
pub fn on_postgres() -> bool {
    admin_url().is_some()
}

/// For a test that only works on SQLite (it opens the server's database file): on
/// PostgreSQL prints "skipped on PostgreSQL: `why`" (and records it in
/// `HERALD_TEST_SKIP_LOG` when set) and returns true, and the test returns at once.
pub fn sqlite_only(why: &str) -> bool {
    let skip = on_postgres();
    if skip {
        record_skip(&format!("on PostgreSQL: {why}"));
    }
    skip
}

/// Prints "skipped WHY" and appends it to `HERALD_TEST_SKIP_LOG` when that is set.
fn record_skip(why: &str) {
    println!("skipped {why}");
    {
        if let Some(path) = std::env::var_os(SKIP_LOG_VAR) {
            // libtest names each test's thread after the test.
            let test = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            let line = format!("{test}: {why}\n");
            // One short append per line, so parallel tests do not interleave.
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, line.as_bytes()));
            if let Err(e) = written {
                panic!("{SKIP_LOG_VAR}={}: {e}", path.to_string_lossy());
            }
        }
    }
}

/// For a test that needs PostgreSQL (several nodes): elsewhere prints "skipped: needs
/// PostgreSQL" (recorded like [`sqlite_only`]'s) and returns true.
pub fn postgres_only(why: &str) -> bool {
    let skip = !on_postgres();
    if skip {
        record_skip(&format!(
            "needs PostgreSQL ({why}; set {DATABASE_URL_VAR}, e.g. to what scripts/pg-cluster.sh prints)"
        ));
    }
    skip
}

fn admin_url() -> Option<String> {
    std::env::var(DATABASE_URL_VAR)
        .ok()
        .filter(|url| !url.trim().is_empty())
}

/// One test server's PostgreSQL database, dropped with this value (tests that run
/// `init` themselves pass [`TestDatabase::url`] to `--database-url`).
#[derive(Debug)]
pub struct TestDatabase {
    /// Where to create and drop databases (the variable's URL).
    admin: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// A new empty database when `HERALD_TEST_DATABASE_URL` is set, `None` otherwise.
    pub fn create() -> Option<TestDatabase> {
        let admin = admin_url()?;
        let name = format!("{NAME_PREFIX}{}", hex::encode(crate::random_bytes::<8>()));
        let url = herald_io::postgres_url::with_database(&admin, &name)
            .unwrap_or_else(|e| panic!("{DATABASE_URL_VAR}: {e}"));
        let mut client = connect(&admin);
        // The name is ours (prefix and hex digits), so it needs no quoting.
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name} on {DATABASE_URL_VAR}: {e}"));
        Some(TestDatabase { admin, name, url })
    }

    /// The URL of this database, for `herald-server init --database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    /// Best effort, after the server process was killed: `WITH (FORCE)` ends any
    /// connection still open (a CLI command a test left behind). Kept when the test
    /// failed, like the test directory, for inspection.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test database kept: {}", self.url);
            return;
        }
        let dropped = postgres::Client::connect(&self.admin, postgres::NoTls).and_then(|mut c| {
            c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
        });
        if let Err(e) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn connect(admin: &str) -> postgres::Client {
    postgres::Client::connect(admin, postgres::NoTls).unwrap_or_else(|e| {
        panic!(
            "{DATABASE_URL_VAR}={admin}: cannot connect: {e} \
             (start a cluster with scripts/pg-cluster.sh, or unset the variable for SQLite)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::{connect, on_postgres, TestDatabase};

    /// The databases of this name on the server (0 or 1).
    fn count(admin: &str, name: &str) -> i64 {
        connect(admin)
            .query_one(
                "SELECT COUNT(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .expect("query pg_database")
            .get(0)
    }

    #[test]
    fn a_database_of_its_own_is_made_and_dropped() {
        if !on_postgres() {
            println!("skipped: {} is not set", super::DATABASE_URL_VAR);
            return;
        }
        let first = TestDatabase::create().expect("a database");
        let second = TestDatabase::create().expect("a database");
        assert_ne!(first.name, second.name);
        assert!(first.name.starts_with("herald_t_"), "{}", first.name);
        assert_eq!(count(&first.admin, &first.name), 1);
        // Its URL reaches it, and it is empty (init makes the schema).
        let mut client = connect(first.url());
        let row = client
            .query_one(
                "SELECT current_database(), \
                 (SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public')",
                &[],
            )
            .expect("query the new database");
        assert_eq!(row.get::<_, String>(0), first.name);
        assert_eq!(row.get::<_, i64>(1), 0);
        // Dropped even with a connection still open (a server killed mid-transaction
        // may leave one behind for a moment).
        let (admin, name) = (first.admin.clone(), first.name.clone());
        drop(first);
        assert_eq!(count(&admin, &name), 0, "dropped with a connection open");
        assert!(client.is_closed() || client.simple_query("SELECT 1").is_err());
        assert_eq!(count(&admin, &second.name), 1, "the other is untouched");
    }
}
