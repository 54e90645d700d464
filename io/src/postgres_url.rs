//! PostgreSQL connection URLs, as the test harness and the benchmark make them: one
//! database per test server or benchmark run on one PostgreSQL server.

/// `url` (a `postgres://` or `postgresql://` URL) with its database replaced by `name`,
/// keeping user, host, port and query parameters.
pub fn with_database(url: &str, name: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("'{url}' is not a postgres:// URL"))?;
    let scheme = &url[..url.len() - rest.len()];
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(authority, _)| authority);
    if authority.is_empty() {
        return Err(format!("'{url}' names no host"));
    }
    let mut out = format!("{scheme}{authority}/{name}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/t",
            ),
            ("postgres://u:p@h:1", "postgres://u:p@h:1/t"),
            (
                "postgresql://h/db?sslmode=disable",
                "postgresql://h/t?sslmode=disable",
            ),
            (
                "postgres://h?connect_timeout=5",
                "postgres://h/t?connect_timeout=5",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "t").as_deref(), Ok(expected), "{url}");
        }
    }

    #[test]
    fn other_urls_are_refused_clearly() {
        let err = with_database("host=127.0.0.1 user=postgres", "t").unwrap_err();
        assert!(err.contains("is not a postgres:// URL"), "{err}");
        let err = with_database("postgres:///db", "t").unwrap_err();
        assert!(err.contains("names no host"), "{err}");
    }
}
