//! The one place that knows there are two databases: a connection is SQLite's (embedded,
//! the default) or PostgreSQL's (`[database] url`, docs/SCALE-OUT.md), behind the small
//! part of rusqlite's interface the store uses, so every query is written once.
//!
//! SQLite calls go straight to rusqlite. PostgreSQL calls translate the statement once
//! (`?N` placeholders to `$N`, the scalar `MAX(a, b)` to `GREATEST`, SQLite's
//! `group_concat` and `char` to theirs) and exchange values in SQLite's five storage
//! classes, so rows are read with rusqlite's own conversions (`FromSql`) on both, and
//! PostgreSQL's errors arrive as rusqlite's, a unique violation as a constraint failure.
//! Everything else the store writes is SQL both understand (`ON CONFLICT`, `RETURNING`,
//! `COALESCE`, window functions).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Deref;

pub(crate) use rusqlite::{params, OptionalExtension, TransactionBehavior};

use rusqlite::types::{FromSql, FromSqlError, ToSql, ToSqlOutput, Value, ValueRef};

/// A database connection: SQLite's or PostgreSQL's.
pub(crate) enum Connection {
    /// The embedded database.
    Sqlite(rusqlite::Connection),
    /// A PostgreSQL server.
    Postgres(Pg),
}

/// A PostgreSQL connection, with the statements it has prepared.
///
/// The client lives on a thread of its own, which runs each call: the synchronous
/// client blocks on a runtime of its own, which must never be inside (or be dropped
/// inside) one of tokio's, and the store is called from async code's blocking sections,
/// from the CLI's runtime and from tests alike.
pub(crate) struct Pg {
    calls: std::sync::mpsc::Sender<(Call, bool)>,
    /// Prepared statements, by the store's SQLite text, and the connection (by its
    /// count of reconnections) they were prepared on.
    prepared: RefCell<(u64, HashMap<String, postgres::Statement>)>,
    /// Reconnections so far: the thread connects again when it finds the connection
    /// closed outside a transaction (inside one, the transaction fails).
    reconnected: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// A transaction is open on this connection.
    in_transaction: std::cell::Cell<bool>,
    /// The last call found the connection closed.
    lost: std::cell::Cell<bool>,
    /// How long commits take (`/metrics`), as SQLite's commit hook measures them.
    commits: RefCell<Option<std::sync::Arc<crate::metrics::Histogram>>>,
}

type Call = Box<dyn FnOnce(&mut postgres::Client) + Send>;

impl Pg {
    /// Connects to `url` (`postgres://user@host:port/db`; no TLS: a database server is
    /// reached on a network the operator trusts, or through a local socket).
    pub(crate) fn connect(url: &str) -> rusqlite::Result<Pg> {
        Pg::open(url, true)
    }

    /// Connects to `url` for session state that must not outlive the session (advisory
    /// locks): a lost connection stays lost, and every later call fails.
    pub(crate) fn connect_once(url: &str) -> rusqlite::Result<Pg> {
        Pg::open(url, false)
    }

    fn open(url: &str, reconnect: bool) -> rusqlite::Result<Pg> {
        let (calls, incoming) = std::sync::mpsc::channel::<(Call, bool)>();
        let (ready, connected) = std::sync::mpsc::channel();
        let url = url.to_string();
        let reconnected = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = reconnected.clone();
        std::thread::Builder::new()
            .name("postgres".into())
            .spawn(
                move || match postgres::Client::connect(&url, postgres::NoTls) {
                    Ok(mut client) => {
                        let _ = ready.send(Ok(()));
                        // Until the store drops its end.
                        for (call, may_reconnect) in incoming {
                            if reconnect && may_reconnect && client.is_closed() {
                                match postgres::Client::connect(&url, postgres::NoTls) {
                                    Ok(again) => {
                                        client = again;
                                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                        tracing::warn!("PostgreSQL: connected again");
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %pg_error(e), "PostgreSQL: cannot connect again");
                                    }
                                }
                            }
                            call(&mut client);
                        }
                    }
                    Err(e) => {
                        let _ = ready.send(Err(pg_error(e)));
                    }
                },
            )
            .map_err(|e| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("cannot start the database thread: {e}").into(),
                )
            })?;
        connected.recv().map_err(|_| gone())??;
        Ok(Pg {
            calls,
            prepared: RefCell::new((0, HashMap::new())),
            reconnected,
            in_transaction: std::cell::Cell::new(false),
            lost: std::cell::Cell::new(false),
            commits: RefCell::new(None),
        })
    }

    /// Runs `f` on the client's thread.
    fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> rusqlite::Result<R> + Send + 'static,
    ) -> rusqlite::Result<R> {
        let (answer, answered) = std::sync::mpsc::channel();
        let may_reconnect = !self.in_transaction.get();
        self.calls
            .send((
                Box::new(move |client| {
                    let result = f(client);
                    let _ = answer.send((result, client.is_closed()));
                }),
                may_reconnect,
            ))
            .map_err(|_| gone())?;
        let (result, closed) = answered.recv().map_err(|_| gone())?;
        self.lost.set(closed);
        result
    }

    /// Runs `once`, and again if PostgreSQL ended the session instead of running it,
    /// outside a transaction (the thread connects again first; statements are prepared
    /// anew). A connection lost any other way fails the statement, which may or may not
    /// have run; the next statement connects again.
    fn again_if_lost<R>(&self, once: impl Fn() -> rusqlite::Result<R>) -> rusqlite::Result<R> {
        let not_run = |e: &rusqlite::Error| matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_ABORT);
        match once() {
            Err(e) if not_run(&e) && self.lost.get() && !self.in_transaction.get() => {
                self.prepared.borrow_mut().1.clear();
                once()
            }
            done => done,
        }
    }

    fn statement(&self, sql: &str) -> rusqlite::Result<postgres::Statement> {
        let connection = self.reconnected.load(std::sync::atomic::Ordering::SeqCst);
        {
            let mut prepared = self.prepared.borrow_mut();
            if prepared.0 != connection {
                // Prepared on a connection that is gone.
                *prepared = (connection, HashMap::new());
            }
            if let Some(statement) = prepared.1.get(sql) {
                return Ok(statement.clone());
            }
        }
        let translated = translate(sql);
        let statement = self.call(move |client| {
            client
                .prepare(&translated)
                .map_err(|e| with_sql(pg_error(e), &translated))
        })?;
        let mut prepared = self.prepared.borrow_mut();
        if prepared.0 == self.reconnected.load(std::sync::atomic::Ordering::SeqCst) {
            prepared.1.insert(sql.to_string(), statement.clone());
        }
        Ok(statement)
    }

    fn query(&self, sql: &str, values: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
        self.again_if_lost(|| self.query_once(sql, values))
    }

    fn query_once(&self, sql: &str, values: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
        let statement = self.statement(sql)?;
        let values = values.to_vec();
        self.call(move |client| {
            let rows = with_params(&values, |refs| client.query(&statement, refs))?;
            rows.iter()
                .map(|row| {
                    (0..row.len())
                        .map(|i| row.try_get::<_, PgValue>(i).map(|v| v.0).map_err(pg_error))
                        .collect()
                })
                .collect()
        })
    }

    fn execute(&self, sql: &str, values: &[Value]) -> rusqlite::Result<usize> {
        self.again_if_lost(|| self.execute_once(sql, values))
    }

    fn execute_once(&self, sql: &str, values: &[Value]) -> rusqlite::Result<usize> {
        let statement = self.statement(sql)?;
        let values = values.to_vec();
        self.call(move |client| {
            let n = with_params(&values, |refs| client.execute(&statement, refs))?;
            Ok(n as usize)
        })
    }

    /// The one boolean `sql` (one integer parameter) gives.
    pub(crate) fn query_bool(&self, sql: &str, arg: i64) -> rusqlite::Result<bool> {
        let rows = self.query(sql, &[Value::Integer(arg)])?;
        Ok(matches!(
            rows.first().and_then(|r| r.first()),
            Some(Value::Integer(1))
        ))
    }

    fn batch(&self, sql: &str) -> rusqlite::Result<()> {
        self.again_if_lost(|| self.batch_once(sql))
    }

    fn batch_once(&self, sql: &str) -> rusqlite::Result<()> {
        let sql = sql.to_string();
        self.call(move |client| {
            client
                .batch_execute(&sql)
                .map_err(|e| with_sql(pg_error(e), &sql))
        })
    }
}

/// Listens on PostgreSQL's `channel` on a connection and thread of its own, handing
/// each notice's payload to `notices`. When the connection fails it connects again
/// (every second) and hands over [`RESYNC`], since notices sent meanwhile are lost.
/// Ends when `notices` is closed.
pub(crate) fn listen(
    url: &str,
    channel: &'static str,
    notices: tokio::sync::mpsc::UnboundedSender<String>,
) -> std::io::Result<()> {
    let url = url.to_string();
    std::thread::Builder::new()
        .name("postgres-listen".into())
        .spawn(move || {
            let mut first = true;
            while !notices.is_closed() {
                let mut client = match postgres::Client::connect(&url, postgres::NoTls) {
                    Ok(client) => client,
                    Err(e) => {
                        tracing::warn!(error = %pg_error(e), "cluster: cannot listen; retrying");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")) {
                    tracing::warn!(error = %pg_error(e), "cluster: LISTEN failed; retrying");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    continue;
                }
                if !first && notices.send(RESYNC.to_string()).is_err() {
                    return;
                }
                first = false;
                loop {
                    use postgres::fallible_iterator::FallibleIterator;
                    let mut incoming = client.notifications();
                    let next = incoming
                        .timeout_iter(std::time::Duration::from_secs(1))
                        .next();
                    match next {
                        Ok(Some(notice)) => {
                            if notices.send(notice.payload().to_string()).is_err() {
                                return;
                            }
                        }
                        // A quiet second: see whether anyone still wants notices.
                        Ok(None) if notices.is_closed() => return,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %pg_error(e), "cluster: lost the notice connection");
                            break;
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// What [`listen`] hands over after reconnecting: notices may have been missed.
pub(crate) const RESYNC: &str = "*";

/// Runs `run` with `values` bound as PostgreSQL parameters.
fn with_params<R>(
    values: &[Value],
    run: impl FnOnce(&[&(dyn postgres::types::ToSql + Sync)]) -> Result<R, postgres::Error>,
) -> rusqlite::Result<R> {
    let params: Vec<PgParam<'_>> = values.iter().map(PgParam).collect();
    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn postgres::types::ToSql + Sync))
        .collect();
    run(&refs).map_err(pg_error)
}

/// The database thread ended (its connection failed for good).
fn gone() -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some("PostgreSQL: the connection's thread ended".into()),
    )
}

impl Connection {
    /// Opens `url`'s PostgreSQL database.
    pub(crate) fn postgres(url: &str) -> rusqlite::Result<Connection> {
        Ok(Connection::Postgres(Pg::connect(url)?))
    }

    /// The SQLite connection, for what only SQLite has (online backup, pragmas, hooks).
    pub(crate) fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match self {
            Connection::Sqlite(c) => Some(c),
            Connection::Postgres(_) => None,
        }
    }

    /// Whether this is a PostgreSQL connection.
    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Connection::Postgres(_))
    }

    /// Runs `sql` (no parameters; several statements allowed).
    pub(crate) fn execute_batch(&self, sql: &str) -> rusqlite::Result<()> {
        match self {
            Connection::Sqlite(c) => c.execute_batch(sql),
            Connection::Postgres(pg) => pg.batch(sql),
        }
    }

    /// Runs one statement; the number of rows it changed.
    pub(crate) fn execute<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        match self {
            Connection::Sqlite(c) => c.execute(sql, params),
            Connection::Postgres(pg) => pg.execute(sql, &params.values()?),
        }
    }

    /// The first row of `sql`, through `f`; `QueryReturnedNoRows` without one.
    pub(crate) fn query_row<T, P: Params, F>(
        &self,
        sql: &str,
        params: P,
        f: F,
    ) -> rusqlite::Result<T>
    where
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        match self {
            Connection::Sqlite(c) => c.query_row(sql, params, |r| f(&Row::Sqlite(r))),
            Connection::Postgres(pg) => {
                let rows = pg.query(sql, &params.values()?)?;
                match rows.first() {
                    Some(row) => f(&Row::Pg(row)),
                    None => Err(rusqlite::Error::QueryReturnedNoRows),
                }
            }
        }
    }

    /// A statement to run (several times, perhaps).
    pub(crate) fn prepare(&self, sql: &str) -> rusqlite::Result<Statement<'_>> {
        match self {
            Connection::Sqlite(c) => Ok(Statement::Sqlite(SqliteStatement::Plain(c.prepare(sql)?))),
            Connection::Postgres(pg) => {
                pg.statement(sql)?;
                Ok(Statement::Pg(pg, sql.to_string()))
            }
        }
    }

    /// Like [`Connection::prepare`], kept for the next call (PostgreSQL keeps them all).
    pub(crate) fn prepare_cached(&self, sql: &str) -> rusqlite::Result<Statement<'_>> {
        match self {
            Connection::Sqlite(c) => Ok(Statement::Sqlite(SqliteStatement::Cached(
                c.prepare_cached(sql)?,
            ))),
            Connection::Postgres(_) => self.prepare(sql),
        }
    }

    /// The id the latest insert into a table with an integer key gave its row.
    pub(crate) fn last_insert_rowid(&self) -> i64 {
        match self {
            Connection::Sqlite(c) => c.last_insert_rowid(),
            // The identity column's sequence, the latest this session advanced.
            Connection::Postgres(pg) => pg
                .query("SELECT lastval()", &[])
                .ok()
                .and_then(|rows| match rows.first().and_then(|r| r.first()) {
                    Some(Value::Integer(id)) => Some(*id),
                    _ => None,
                })
                .unwrap_or(0),
        }
    }

    /// How long a statement waits for another connection's lock.
    pub(crate) fn busy_timeout(&self, wait: std::time::Duration) -> rusqlite::Result<()> {
        match self {
            Connection::Sqlite(c) => c.busy_timeout(wait),
            Connection::Postgres(pg) => {
                pg.batch(&format!("SET lock_timeout = {}", wait.as_millis()))
            }
        }
    }

    /// Records how long each commit takes in `commits`.
    pub(crate) fn time_commits(&self, commits: std::sync::Arc<crate::metrics::Histogram>) {
        match self {
            Connection::Sqlite(c) => super::metrics::time_commits(c, commits),
            Connection::Postgres(pg) => *pg.commits.borrow_mut() = Some(commits),
        }
    }

    /// Begins a transaction (deferred).
    pub(crate) fn transaction(&mut self) -> rusqlite::Result<Transaction<'_>> {
        self.transaction_with_behavior(TransactionBehavior::Deferred)
    }

    /// Begins a transaction; `Immediate` takes SQLite's write lock at once (PostgreSQL
    /// takes row locks as it writes).
    pub(crate) fn transaction_with_behavior(
        &mut self,
        behavior: TransactionBehavior,
    ) -> rusqlite::Result<Transaction<'_>> {
        let begin = match (&*self, behavior) {
            (Connection::Postgres(_), _) => "BEGIN",
            (_, TransactionBehavior::Immediate) => "BEGIN IMMEDIATE",
            (_, TransactionBehavior::Exclusive) => "BEGIN EXCLUSIVE",
            _ => "BEGIN DEFERRED",
        };
        self.execute_batch(begin)?;
        if let Connection::Postgres(pg) = &*self {
            pg.in_transaction.set(true);
        }
        Ok(Transaction {
            conn: self,
            savepoint: None,
            done: false,
        })
    }

    /// SQLite's pragma (PostgreSQL has none of the store's: a no-op there).
    pub(crate) fn pragma_update<V: ToSql>(
        &self,
        schema: Option<&str>,
        name: &str,
        value: V,
    ) -> rusqlite::Result<()> {
        match self {
            Connection::Sqlite(c) => c.pragma_update(schema, name, value),
            Connection::Postgres(_) => Ok(()),
        }
    }
}

/// An open transaction: rolled back when dropped without [`Transaction::commit`].
pub(crate) struct Transaction<'c> {
    conn: &'c Connection,
    /// A savepoint's name, inside an outer transaction.
    savepoint: Option<String>,
    done: bool,
}

impl Transaction<'_> {
    /// A nested transaction (a savepoint): its work is undone alone when it is dropped
    /// without [`Transaction::commit`].
    pub(crate) fn savepoint(&mut self) -> rusqlite::Result<Transaction<'_>> {
        let name = match &self.savepoint {
            Some(outer) => format!("{outer}_"),
            None => "sp".to_string(),
        };
        self.conn.execute_batch(&format!("SAVEPOINT {name}"))?;
        Ok(Transaction {
            conn: self.conn,
            savepoint: Some(name),
            done: false,
        })
    }

    /// Commits.
    pub(crate) fn commit(mut self) -> rusqlite::Result<()> {
        self.done = true;
        if let Some(name) = &self.savepoint {
            return self.conn.execute_batch(&format!("RELEASE {name}"));
        }
        let timing = match self.conn {
            Connection::Postgres(pg) => pg.commits.borrow().clone(),
            Connection::Sqlite(_) => None,
        };
        let started = std::time::Instant::now();
        let committed = self.conn.execute_batch("COMMIT");
        self.ended();
        committed?;
        if let Some(commits) = timing {
            commits.observe(started.elapsed());
        }
        Ok(())
    }

    /// The transaction is over (committed or rolled back, or its connection gone).
    fn ended(&self) {
        if let (None, Connection::Postgres(pg)) = (&self.savepoint, self.conn) {
            pg.in_transaction.set(false);
        }
    }

    fn undo(&self) -> String {
        match &self.savepoint {
            Some(name) => format!("ROLLBACK TO {name}; RELEASE {name}"),
            None => "ROLLBACK".to_string(),
        }
    }
}

impl Deref for Transaction<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.conn.execute_batch(&self.undo());
            self.ended();
        }
    }
}

/// SQLite's statement, fresh or from the connection's cache.
pub(crate) enum SqliteStatement<'c> {
    /// Prepared for this use.
    Plain(rusqlite::Statement<'c>),
    /// From the cache.
    Cached(rusqlite::CachedStatement<'c>),
}

impl<'c> SqliteStatement<'c> {
    fn get(&mut self) -> &mut rusqlite::Statement<'c> {
        match self {
            SqliteStatement::Plain(s) => s,
            SqliteStatement::Cached(s) => s,
        }
    }
}

/// A prepared statement.
pub(crate) enum Statement<'c> {
    /// SQLite's.
    Sqlite(SqliteStatement<'c>),
    /// PostgreSQL's, by the store's text (the connection keeps it prepared).
    Pg(&'c Pg, String),
}

/// Mapped rows, as [`Statement::query_map`] gives them.
pub(crate) type MappedRows<'s, T> = Box<dyn Iterator<Item = rusqlite::Result<T>> + 's>;

impl<'c> Statement<'c> {
    /// Runs it; the number of rows changed.
    pub(crate) fn execute<P: Params>(&mut self, params: P) -> rusqlite::Result<usize> {
        match self {
            Statement::Sqlite(s) => s.get().execute(params),
            Statement::Pg(pg, sql) => pg.execute(sql, &params.values()?),
        }
    }

    /// Runs an insert; the new row's id.
    pub(crate) fn insert<P: Params>(&mut self, params: P) -> rusqlite::Result<i64> {
        match self {
            Statement::Sqlite(s) => s.get().insert(params),
            Statement::Pg(pg, sql) => {
                pg.execute(sql, &params.values()?)?;
                let rows = pg.query("SELECT lastval()", &[])?;
                match rows.first().and_then(|r| r.first()) {
                    Some(Value::Integer(id)) => Ok(*id),
                    _ => Err(rusqlite::Error::QueryReturnedNoRows),
                }
            }
        }
    }

    /// The first row, through `f`.
    pub(crate) fn query_row<T, P: Params, F>(&mut self, params: P, f: F) -> rusqlite::Result<T>
    where
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        match self {
            Statement::Sqlite(s) => s.get().query_row(params, |r| f(&Row::Sqlite(r))),
            Statement::Pg(pg, sql) => {
                let rows = pg.query(sql, &params.values()?)?;
                match rows.first() {
                    Some(row) => f(&Row::Pg(row)),
                    None => Err(rusqlite::Error::QueryReturnedNoRows),
                }
            }
        }
    }

    /// Every row, through `f`.
    pub(crate) fn query_map<'s, T, P: Params, F>(
        &'s mut self,
        params: P,
        mut f: F,
    ) -> rusqlite::Result<MappedRows<'s, T>>
    where
        F: FnMut(&Row<'_>) -> rusqlite::Result<T> + 's,
        T: 's,
    {
        match self {
            Statement::Sqlite(s) => Ok(Box::new(
                s.get().query_map(params, move |r| f(&Row::Sqlite(r)))?,
            )),
            Statement::Pg(pg, sql) => {
                let rows = pg.query(sql, &params.values()?)?;
                Ok(Box::new(rows.into_iter().map(move |row| f(&Row::Pg(&row)))))
            }
        }
    }

    /// The rows, one at a time.
    pub(crate) fn query<P: Params>(&mut self, params: P) -> rusqlite::Result<Rows<'_>> {
        match self {
            Statement::Sqlite(s) => Ok(Rows::Sqlite(s.get().query(params)?)),
            Statement::Pg(pg, sql) => Ok(Rows::Pg(
                pg.query(sql, &params.values()?)?.into_iter(),
                None,
            )),
        }
    }
}

/// Rows being read, as [`Statement::query`] gives them.
pub(crate) enum Rows<'s> {
    /// SQLite's cursor.
    Sqlite(rusqlite::Rows<'s>),
    /// PostgreSQL's rows, all read, and the current one.
    Pg(std::vec::IntoIter<Vec<Value>>, Option<Vec<Value>>),
}

impl Rows<'_> {
    /// The next row, if any.
    #[allow(clippy::should_implement_trait)]
    pub(crate) fn next(&mut self) -> rusqlite::Result<Option<Row<'_>>> {
        match self {
            Rows::Sqlite(rows) => Ok(rows.next()?.map(Row::Sqlite)),
            Rows::Pg(rows, current) => {
                *current = rows.next();
                Ok(current.as_deref().map(Row::Pg))
            }
        }
    }
}

/// One row of a result.
#[derive(Clone, Copy)]
pub(crate) enum Row<'r> {
    /// SQLite's.
    Sqlite(&'r rusqlite::Row<'r>),
    /// PostgreSQL's, in SQLite's storage classes.
    Pg(&'r [Value]),
}

/// A column, by position (as the store names every column it reads).
pub(crate) trait ColumnIndex: Copy {
    /// The position.
    fn position(self) -> usize;
}

impl ColumnIndex for usize {
    fn position(self) -> usize {
        self
    }
}

impl Row<'_> {
    /// Column `idx` as a `T`, by rusqlite's conversions.
    pub(crate) fn get<I: ColumnIndex, T: FromSql>(&self, idx: I) -> rusqlite::Result<T> {
        let idx = idx.position();
        match self {
            Row::Sqlite(r) => r.get(idx),
            Row::Pg(values) => {
                let value = values
                    .get(idx)
                    .ok_or(rusqlite::Error::InvalidColumnIndex(idx))?;
                let value = ValueRef::from(value);
                T::column_result(value).map_err(|e| match e {
                    FromSqlError::InvalidType => rusqlite::Error::InvalidColumnType(
                        idx,
                        format!("column {idx}"),
                        value.data_type(),
                    ),
                    FromSqlError::OutOfRange(i) => rusqlite::Error::IntegralValueOutOfRange(idx, i),
                    FromSqlError::Other(err) => {
                        rusqlite::Error::FromSqlConversionFailure(idx, value.data_type(), err)
                    }
                    other => rusqlite::Error::FromSqlConversionFailure(
                        idx,
                        value.data_type(),
                        Box::new(other),
                    ),
                })
            }
        }
    }
}

/// Parameters of a statement: rusqlite's, which PostgreSQL takes as values.
pub(crate) trait Params: rusqlite::Params {
    /// The values, in order.
    fn values(&self) -> rusqlite::Result<Vec<Value>>;
}

fn owned(p: &dyn ToSql) -> rusqlite::Result<Value> {
    Ok(match p.to_sql()? {
        ToSqlOutput::Borrowed(v) => v.into(),
        ToSqlOutput::Owned(v) => v,
        other => {
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!("a parameter PostgreSQL cannot take: {other:?}").into(),
            ))
        }
    })
}

impl Params for &[&dyn ToSql] {
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        self.iter().map(|p| owned(*p)).collect()
    }
}

impl Params for () {
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        Ok(Vec::new())
    }
}

impl<T: ToSql, const N: usize> Params for [T; N]
where
    [T; N]: rusqlite::Params,
{
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        self.iter().map(|p| owned(p)).collect()
    }
}

impl<I> Params for rusqlite::ParamsFromIter<I>
where
    I: IntoIterator + Clone,
    I::Item: ToSql,
{
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        Err(rusqlite::Error::ToSqlConversionFailure(
            "params_from_iter is not supported on PostgreSQL".into(),
        ))
    }
}

use pg_values::{PgParam, PgValue};

/// Values crossing to and from PostgreSQL (a module of its own: both crates name a trait
/// `ToSql`).
mod pg_values {
    use postgres::types::{FromSql, IsNull, ToSql, Type as PgType};
    use rusqlite::types::Value;
    use std::error::Error as StdError;

    /// A value bound to a PostgreSQL parameter, converted to the type PostgreSQL inferred
    /// for it (as SQLite's column affinity would take it).
    #[derive(Debug)]
    pub(super) struct PgParam<'v>(pub(super) &'v Value);

    type BoxError = Box<dyn StdError + Sync + Send>;

    impl ToSql for PgParam<'_> {
        fn to_sql(&self, ty: &PgType, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
            let text_like = matches!(
                *ty,
                PgType::TEXT | PgType::VARCHAR | PgType::BPCHAR | PgType::NAME | PgType::UNKNOWN
            );
            match self.0 {
                Value::Null => Ok(IsNull::Yes),
                Value::Integer(i) => match *ty {
                    PgType::INT8 => i.to_sql(ty, out),
                    PgType::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                    PgType::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                    PgType::BOOL => (*i != 0).to_sql(ty, out),
                    PgType::FLOAT8 => (*i as f64).to_sql(ty, out),
                    PgType::FLOAT4 => (*i as f32).to_sql(ty, out),
                    _ if text_like => i.to_string().to_sql(&PgType::TEXT, out),
                    _ => Err(format!("an integer for a {ty} parameter").into()),
                },
                Value::Real(f) => match *ty {
                    PgType::FLOAT8 => f.to_sql(ty, out),
                    PgType::FLOAT4 => (*f as f32).to_sql(ty, out),
                    PgType::INT8 if f.fract() == 0.0 => (*f as i64).to_sql(ty, out),
                    _ if text_like => f.to_string().to_sql(&PgType::TEXT, out),
                    _ => Err(format!("a real for a {ty} parameter").into()),
                },
                Value::Text(s) => match *ty {
                    PgType::INT8 => s.trim().parse::<i64>()?.to_sql(ty, out),
                    PgType::INT4 => s.trim().parse::<i32>()?.to_sql(ty, out),
                    PgType::FLOAT8 => s.trim().parse::<f64>()?.to_sql(ty, out),
                    PgType::BYTEA => s.as_bytes().to_sql(ty, out),
                    _ if text_like => s.as_str().to_sql(&PgType::TEXT, out),
                    _ => Err(format!("text for a {ty} parameter").into()),
                },
                Value::Blob(b) => match *ty {
                    PgType::BYTEA => b.as_slice().to_sql(ty, out),
                    _ if text_like => std::str::from_utf8(b)?.to_sql(&PgType::TEXT, out),
                    _ => Err(format!("a blob for a {ty} parameter").into()),
                },
            }
        }

        fn accepts(_: &PgType) -> bool {
            true
        }

        postgres::types::to_sql_checked!();
    }

    /// A PostgreSQL column value in SQLite's storage classes.
    pub(super) struct PgValue(pub(super) Value);

    impl<'a> FromSql<'a> for PgValue {
        fn from_sql(ty: &PgType, raw: &'a [u8]) -> Result<PgValue, BoxError> {
            Ok(PgValue(match *ty {
                PgType::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
                PgType::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
                PgType::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
                PgType::OID => Value::Integer(u32::from_sql(ty, raw)?.into()),
                PgType::BOOL => Value::Integer(bool::from_sql(ty, raw)?.into()),
                PgType::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
                PgType::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
                PgType::BYTEA => Value::Blob(raw.to_vec()),
                PgType::NUMERIC => numeric(raw)?,
                _ => Value::Text(String::from_utf8(raw.to_vec())?),
            }))
        }

        fn from_sql_null(_: &PgType) -> Result<PgValue, BoxError> {
            Ok(PgValue(Value::Null))
        }

        fn accepts(_: &PgType) -> bool {
            true
        }
    }

    /// A NUMERIC (what PostgreSQL's `SUM` of integers gives) as an integer when it is one,
    /// else a real. Binary form: digit count, weight, sign, scale, then base-10000 digits.
    pub(super) fn numeric(raw: &[u8]) -> Result<Value, BoxError> {
        let word = |i: usize| -> Result<i16, BoxError> {
            let b = raw.get(i * 2..i * 2 + 2).ok_or("a short NUMERIC")?;
            Ok(i16::from_be_bytes([b[0], b[1]]))
        };
        let (ndigits, weight, sign, scale) = (word(0)?, word(1)?, word(2)? as u16, word(3)?);
        if sign == 0xC000 {
            return Ok(Value::Real(f64::NAN));
        }
        let mut value = 0f64;
        let mut integer: Option<i128> = Some(0);
        for d in 0..ndigits.max(0) as usize {
            let digit = word(4 + d)? as i128;
            let power = weight as i32 - d as i32;
            value += digit as f64 * 10000f64.powi(power);
            if power >= 0 {
                integer = integer.and_then(|n| {
                    let place = 10000i128.checked_pow(power as u32)?;
                    n.checked_add(digit.checked_mul(place)?)
                });
            } else if digit != 0 {
                integer = None;
            }
        }
        let negative = sign == 0x4000;
        match integer.and_then(|n| i64::try_from(if negative { -n } else { n }).ok()) {
            Some(n) if scale >= 0 => Ok(Value::Integer(n)),
            _ => Ok(Value::Real(if negative { -value } else { value })),
        }
    }
}

/// PostgreSQL's error as rusqlite's, so the store's handling (a constraint failure is a
/// conflict; everything else a database error with its message) holds for both.
fn pg_error(e: postgres::Error) -> rusqlite::Error {
    use postgres::error::SqlState;
    let code = match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE,
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY
        }
        Some(c) if *c == SqlState::NOT_NULL_VIOLATION => rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL,
        Some(c) if *c == SqlState::CHECK_VIOLATION => rusqlite::ffi::SQLITE_CONSTRAINT_CHECK,
        // Text PostgreSQL cannot store (a NUL character): the request's, not the server's.
        Some(c)
            if *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE
                || *c == SqlState::UNTRANSLATABLE_CHARACTER =>
        {
            rusqlite::ffi::SQLITE_MISMATCH
        }
        // The server ended the session (shut down, or an administrator's
        // pg_terminate_backend) instead of running the statement.
        Some(c)
            if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW =>
        {
            rusqlite::ffi::SQLITE_ABORT
        }
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            rusqlite::ffi::SQLITE_BUSY
        }
        Some(_) => rusqlite::ffi::SQLITE_ERROR,
        None if e.is_closed() => rusqlite::ffi::SQLITE_IOERR,
        None => rusqlite::ffi::SQLITE_ERROR,
    };
    let message = match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {}", db.message()),
        None => format!("PostgreSQL: {e}"),
    };
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(message))
}

fn with_sql(e: rusqlite::Error, sql: &str) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, Some(message)) => rusqlite::Error::SqliteFailure(
            code,
            Some(format!(
                "{message} (in: {})",
                sql.split_whitespace().collect::<Vec<_>>().join(" ")
            )),
        ),
        other => other,
    }
}

/// The store's SQLite text as PostgreSQL's: `?N` and `?` placeholders become `$N`; the
/// scalar `MAX`/`MIN` of several arguments `GREATEST`/`LEAST`; `group_concat` and
/// `char` their PostgreSQL names. Quoted text is left alone.
pub(crate) fn translate(sql: &str) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next_param = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' => {
                let end = quoted_end(&chars, i);
                out.extend(&chars[i..end]);
                i = end;
            }
            '?' => {
                let digits: String = chars[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let n = if digits.is_empty() {
                    next_param + 1
                } else {
                    digits.parse().unwrap_or(0)
                };
                next_param = next_param.max(n);
                out.push('$');
                out.push_str(&n.to_string());
                i += 1 + digits.len();
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let called = chars.get(i) == Some(&'(');
                let preceded_by_dot = start > 0 && chars[start - 1] == '.';
                let renamed = match word.to_ascii_lowercase().as_str() {
                    "max" if called && top_level_commas(&chars, i) > 0 => "GREATEST",
                    "min" if called && top_level_commas(&chars, i) > 0 => "LEAST",
                    "group_concat" if called => "string_agg",
                    "char" if called && !preceded_by_dot => "chr",
                    _ => "",
                };
                if renamed.is_empty() {
                    out.push_str(&word);
                } else {
                    out.push_str(renamed);
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Where the quoted text starting at `start` ends (after its closing quote; a doubled
/// quote is part of the text).
fn quoted_end(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    chars.len()
}

/// Commas at the top level of the parenthesised list opening at `open`.
fn top_level_commas(chars: &[char], open: usize) -> usize {
    let mut depth = 0;
    let mut commas = 0;
    let mut i = open;
    while i < chars.len() {
        match chars[i] {
            '\'' | '"' => {
                i = quoted_end(chars, i);
                continue;
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return commas;
                }
            }
            ',' if depth == 1 => commas += 1,
            _ => {}
        }
        i += 1;
    }
    commas
}

/// The schema's SQLite text as PostgreSQL's: integer keys become identity columns, the
/// storage classes PostgreSQL's types; `message_receipts`, which SQLite counts by rowid,
/// gets a column of that name.
pub(crate) fn translate_schema(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    for line in sql.lines() {
        let mut line = line
            .replace(
                "INTEGER PRIMARY KEY AUTOINCREMENT",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            )
            .replace(
                "INTEGER PRIMARY KEY",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            )
            .replace(" INTEGER", " BIGINT")
            .replace(" BLOB", " BYTEA")
            .replace(" REAL", " DOUBLE PRECISION");
        if line.trim() == "CREATE TABLE message_receipts (" {
            line.push_str("\n    rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pg_values::numeric;
    use super::*;

    #[test]
    fn placeholders_and_scalar_functions_are_translated_outside_quotes() {
        assert_eq!(
            translate("SELECT MAX(a, ?2), MAX(b), group_concat(x, char(10)) FROM t WHERE s = '?1 MAX(a, b)' AND c = ? AND d = ?"),
            "SELECT GREATEST(a, $2), MAX(b), string_agg(x, chr(10)) FROM t WHERE s = '?1 MAX(a, b)' AND c = $3 AND d = $4"
        );
        assert_eq!(
            translate("SELECT MIN(COALESCE(x, 0), (SELECT MAX(y) FROM u)) FROM v"),
            "SELECT LEAST(COALESCE(x, 0), (SELECT MAX(y) FROM u)) FROM v"
        );
        assert_eq!(translate("SELECT 'it''s ?1', ?1"), "SELECT 'it''s ?1', $1");
    }

    #[test]
    fn numerics_decode_to_integers_when_whole() {
        // 123456789: weight 2, digits 1, 2345, 6789.
        let raw: Vec<u8> = [3i16, 2, 0, 0, 1, 2345, 6789]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Integer(123_456_789));
        // -20000: weight 1, digit 2 (trailing zero digits dropped).
        let raw: Vec<u8> = [1i16, 1, 0x4000u16 as i16, 0, 2]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Integer(-20_000));
        // 1.5: weight 0, digits 1, 5000, scale 1.
        let raw: Vec<u8> = [2i16, 0, 0, 1, 1, 5000]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Real(1.5));
        // Zero: no digits.
        let raw: Vec<u8> = [0i16, 0, 0, 0]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        assert_eq!(numeric(&raw).unwrap(), Value::Integer(0));
    }

    #[test]
    fn schema_types_become_postgresql_types() {
        let pg = translate_schema(
            "CREATE TABLE t (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    n INTEGER NOT NULL,\n    b BLOB,\n    r REAL\n);\nCREATE TABLE message_receipts (\n    x TEXT\n);",
        );
        assert!(pg.contains("id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"));
        assert!(pg.contains("n BIGINT NOT NULL"));
        assert!(pg.contains("b BYTEA"));
        assert!(pg.contains("r DOUBLE PRECISION"));
        assert!(pg.contains("rowid BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,"));
    }
}
