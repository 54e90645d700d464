//! Downloads of release artifacts, the TUF way: the signed release metadata declares the
//! artifact's length and SHA-256, and nothing the server says is trusted beyond that. A
//! fetch never writes more than the declared length, gives up when the server stalls or the
//! whole transfer runs past its deadline, resumes a partial file left by an earlier attempt,
//! and renames the file into place only once its length and hash match.

use std::future::Future;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;

/// Attempts for one fetch when the connection fails or breaks, counting the first.
pub const ATTEMPTS: u32 = 3;

/// Pause before the second attempt; doubled before each later one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Suffix of the file a download is written to until it has been verified.
pub const PART_SUFFIX: &str = ".part";

/// Buffer used to hash the prefix of a resumed download.
const HASH_BUFFER: usize = 64 * 1024;

/// Progress is reported about this many times over a whole download.
const PROGRESS_STEPS: u64 = 100;

/// One artifact to download, as declared by signed release metadata.
#[derive(Debug, Clone)]
pub struct Fetch<'a> {
    /// Where to get it: `https:`, or `http:` to this machine only.
    pub url: &'a str,
    /// Declared length in bytes; the download is cut off beyond it.
    pub length: u64,
    /// Declared SHA-256 of the whole artifact.
    pub sha256: [u8; 32],
    /// Final path of the verified file, inside a private staging directory the caller made.
    /// The download is written to this path plus [`PART_SUFFIX`] until it is verified.
    pub dest: &'a Path,
    /// Abort when no byte arrives for this long.
    pub stall: Duration,
    /// Abort when the whole fetch, retries included, takes longer than this.
    pub deadline: Duration,
}

/// Why a download failed. Messages are shown to operators in job results.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL is not `https:` (or `http:` to this machine), or does not parse.
    #[error(
        "refusing to download {url}: only https: URLs are allowed (http: only to this machine)"
    )]
    Scheme {
        /// The URL refused.
        url: String,
    },
    /// The connection failed or broke on every attempt. The partial file is kept so a
    /// later fetch resumes where this one stopped.
    #[error("download of {url} failed after {attempts} attempt(s): {detail}")]
    Connection {
        /// The artifact's URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error, with its causes.
        detail: String,
    },
    /// The server answered with a status that is not a success.
    #[error("server answered {status} for {url}")]
    Status {
        /// The artifact's URL.
        url: String,
        /// What the server answered.
        status: StatusCode,
    },
    /// Asked to resume from byte `asked`, the server sent a different range.
    #[error(
        "server sent the wrong range for {url} (asked from byte {asked}, got {content_range:?})"
    )]
    BadRange {
        /// The artifact's URL.
        url: String,
        /// Where the resumed download should have started.
        asked: u64,
        /// The server's `Content-Range` header.
        content_range: String,
    },
    /// The server sent (or announced) more bytes than declared; the download is discarded.
    #[error(
        "{url} is longer than the {limit} bytes its signed release declares; download discarded"
    )]
    TooLong {
        /// The artifact's URL.
        url: String,
        /// The declared length.
        limit: u64,
    },
    /// No byte arrived for the stall limit; the download is discarded.
    #[error("no data from {url} for {stall:?}; download abandoned")]
    Stalled {
        /// The artifact's URL.
        url: String,
        /// The stall limit.
        stall: Duration,
    },
    /// The whole fetch ran past its deadline; the download is discarded.
    #[error("download of {url} did not finish within {deadline:?}; download abandoned")]
    TimedOut {
        /// The artifact's URL.
        url: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The server ended the body before the declared length. The partial file is kept.
    #[error("download is {got} bytes but its signed release declares {expected}")]
    WrongLength {
        /// The declared length.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The bytes do not have the declared SHA-256 (hex); the download is discarded.
    #[error(
        "downloaded file has SHA-256 {got} but its signed release declares {expected}; file discarded"
    )]
    HashMismatch {
        /// The declared hash.
        expected: String,
        /// The hash of the bytes received.
        got: String,
    },
    /// A local file operation failed.
    #[error("{action} {path}: {source}")]
    File {
        /// What was attempted.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl DownloadError {
    /// Whether the partial file must go: its bytes are suspect or the fetch was abandoned.
    /// After a broken connection or a short body the bytes so far are worth resuming.
    fn discards_part(&self) -> bool {
        matches!(
            self,
            DownloadError::TooLong { .. }
                | DownloadError::Stalled { .. }
                | DownloadError::TimedOut { .. }
                | DownloadError::HashMismatch { .. }
        )
    }
}

/// Downloads `fetch.url` to `fetch.dest`, verified against the declared length and hash.
///
/// `progress` is called with the bytes held so far, about every 1% of the declared length.
/// On success `dest` holds exactly the declared bytes (mode 0600). On failure `dest` is
/// untouched; the partial file is kept only when resuming it later makes sense (see
/// [`DownloadError`]).
pub async fn fetch(
    client: &reqwest::Client,
    fetch: &Fetch<'_>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<(), DownloadError> {
    check_url(fetch.url)?;
    let transfer = Transfer {
        client,
        fetch,
        part: part_path(fetch.dest),
        deadline_at: Instant::now() + fetch.deadline,
    };
    let result = transfer.run(progress).await;
    if let Err(err) = &result {
        // An empty partial file is not worth keeping for a resume.
        let empty = tokio::fs::metadata(&transfer.part)
            .await
            .is_ok_and(|m| m.len() == 0);
        if err.discards_part() || empty {
            if let Err(e) = tokio::fs::remove_file(&transfer.part).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %transfer.part.display(), "cannot remove partial download: {e}");
                }
            }
        }
    }
    result
}

/// The path a download of `dest` is written to until it is verified.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(PART_SUFFIX);
    PathBuf::from(name)
}

/// Refuses anything but `https:`, and `http:` to a loopback host.
fn check_url(url: &str) -> Result<(), DownloadError> {
    let refused = || DownloadError::Scheme {
        url: url.to_string(),
    };
    // The URL parser normalises the host (percent-escapes, IPv4 forms) before the rule.
    let parsed = reqwest::Url::parse(url).map_err(|_| refused())?;
    herald_shared::url::check_download_url(parsed.as_str()).map_err(|_| refused())
}

/// The first byte of a `Content-Range: bytes first-last/total` header.
fn range_start(content_range: &str) -> Option<u64> {
    let range = content_range.trim().strip_prefix("bytes ")?;
    let (first, _) = range.split_once('-')?;
    first.trim().parse().ok()
}

/// A reqwest error with its causes, without the URL (our messages name it already).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// === impl Transfer ===

/// One fetch in progress.
struct Transfer<'a> {
    client: &'a reqwest::Client,
    fetch: &'a Fetch<'a>,
    part: PathBuf,
    deadline_at: Instant,
}

/// How one attempt ended, when it did not fail outright.
enum Attempt {
    /// The body ended: the file holds `written` bytes whose hash is in `hasher`.
    Ended { written: u64, hasher: Sha256 },
    /// The connection failed or broke; worth another attempt.
    Broken(String),
}

/// Throttles progress reports to about [`PROGRESS_STEPS`] per download.
struct Reporter<'p> {
    progress: &'p mut (dyn FnMut(u64) + Send),
    step: u64,
    next: u64,
}

impl Reporter<'_> {
    fn report(&mut self, held: u64, length: u64) {
        if held >= self.next || held == length {
            (self.progress)(held);
            self.next = held.saturating_add(self.step);
        }
    }
}

impl Transfer<'_> {
    async fn run(&self, progress: &mut (dyn FnMut(u64) + Send)) -> Result<(), DownloadError> {
        let mut file = self.open_part().await?;
        let mut reporter = Reporter {
            progress,
            step: (self.fetch.length / PROGRESS_STEPS).max(1),
            next: 0,
        };
        let mut attempt = 1;
        let (written, hasher) = loop {
            match self.attempt(&mut file, &mut reporter).await? {
                Attempt::Ended { written, hasher } => break (written, hasher),
                Attempt::Broken(detail) if attempt >= ATTEMPTS => {
                    return Err(DownloadError::Connection {
                        url: self.fetch.url.to_string(),
                        attempts: attempt,
                        detail,
                    });
                }
                Attempt::Broken(detail) => {
                    tracing::debug!(
                        url = self.fetch.url,
                        attempt,
                        "download broken, retrying: {detail}"
                    );
                    self.pause(FIRST_BACKOFF * 2u32.pow(attempt - 1)).await?;
                    attempt += 1;
                }
            }
        };
        if written != self.fetch.length {
            return Err(DownloadError::WrongLength {
                expected: self.fetch.length,
                got: written,
            });
        }
        let got: [u8; 32] = hasher.finalize().into();
        if got != self.fetch.sha256 {
            return Err(DownloadError::HashMismatch {
                expected: hex::encode(self.fetch.sha256),
                got: hex::encode(got),
            });
        }
        file.sync_all()
            .await
            .map_err(self.file_error("cannot flush"))?;
        drop(file);
        tokio::fs::rename(&self.part, self.fetch.dest)
            .await
            .map_err(|e| DownloadError::File {
                action: "cannot move verified download to",
                path: self.fetch.dest.to_path_buf(),
                source: e,
            })?;
        if let Some(dir) = self.fetch.dest.parent() {
            // Make the rename durable; failing that only risks a re-download after a crash.
            if let Ok(dir) = File::open(dir).await {
                let _ = dir.sync_all().await;
            }
        }
        Ok(())
    }

    /// Opens (or creates, mode 0600) the partial file without truncating it.
    async fn open_part(&self) -> Result<File, DownloadError> {
        tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.part)
            .await
            .map_err(self.file_error("cannot open"))
    }

    /// One request: resumes from what the file holds, appends the body, hashes everything.
    async fn attempt(
        &self,
        file: &mut File,
        reporter: &mut Reporter<'_>,
    ) -> Result<Attempt, DownloadError> {
        let length = self.fetch.length;
        // Settle writes left in flight by a broken attempt before measuring the file.
        file.flush()
            .await
            .map_err(self.file_error("cannot write"))?;
        let mut held = file
            .metadata()
            .await
            .map_err(self.file_error("cannot read"))?
            .len();
        if held >= length {
            // Complete or overlong yet never verified: nothing in it can be trusted.
            self.restart(file).await?;
            held = 0;
        }
        let mut hasher = Sha256::new();
        held = self.hash_prefix(file, held, &mut hasher).await?;

        let mut request = self.client.get(self.fetch.url);
        if held > 0 {
            request = request.header(RANGE, format!("bytes={held}-"));
        }
        let mut response = match self.limit(request.send()).await? {
            Ok(response) => response,
            Err(e) => return Ok(Attempt::Broken(describe(e))),
        };
        // A redirect must not lead anywhere the original URL could not go.
        if check_url(response.url().as_str()).is_err() {
            return Err(DownloadError::Scheme {
                url: response.url().to_string(),
            });
        }
        match response.status() {
            StatusCode::OK if held > 0 => {
                // The server ignored the range: take the whole body from the start.
                self.restart(file).await?;
                hasher = Sha256::new();
                held = 0;
            }
            StatusCode::OK => {}
            StatusCode::PARTIAL_CONTENT if held > 0 => {
                let content_range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                if range_start(&content_range) != Some(held) {
                    return Err(DownloadError::BadRange {
                        url: self.fetch.url.to_string(),
                        asked: held,
                        content_range,
                    });
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if held > 0 => {
                // The server's file is not the one we hold a prefix of; start over.
                self.restart(file).await?;
                return Ok(Attempt::Broken(format!(
                    "server could not resume from byte {held}; starting over"
                )));
            }
            status => {
                return Err(DownloadError::Status {
                    url: self.fetch.url.to_string(),
                    status,
                });
            }
        }
        let room = length - held;
        if response
            .content_length()
            .is_some_and(|announced| announced > room)
        {
            return Err(self.too_long());
        }

        // Report where this attempt starts, even if a restart went back to zero.
        reporter.next = 0;
        reporter.report(held, length);
        loop {
            let chunk = match self.limit(response.chunk()).await? {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    file.flush()
                        .await
                        .map_err(self.file_error("cannot write"))?;
                    return Ok(Attempt::Broken(describe(e)));
                }
            };
            if chunk.len() as u64 > length - held {
                return Err(self.too_long());
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(self.file_error("cannot write"))?;
            held += chunk.len() as u64;
            reporter.report(held, length);
        }
        file.flush()
            .await
            .map_err(self.file_error("cannot write"))?;
        Ok(Attempt::Ended {
            written: held,
            hasher,
        })
    }

    /// Feeds the first `held` bytes of the file to `hasher` and leaves the file positioned
    /// after them. Returns how many bytes it actually found.
    async fn hash_prefix(
        &self,
        file: &mut File,
        held: u64,
        hasher: &mut Sha256,
    ) -> Result<u64, DownloadError> {
        file.seek(SeekFrom::Start(0))
            .await
            .map_err(self.file_error("cannot read"))?;
        let mut buffer = vec![0u8; HASH_BUFFER];
        let mut hashed = 0u64;
        while hashed < held {
            let want = (held - hashed).min(HASH_BUFFER as u64) as usize;
            let n = file
                .read(&mut buffer[..want])
                .await
                .map_err(self.file_error("cannot read"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            hashed += n as u64;
        }
        if hashed < held {
            // Shorter than it said a moment ago: continue from what is really there.
            file.set_len(hashed)
                .await
                .map_err(self.file_error("cannot truncate"))?;
            file.seek(SeekFrom::Start(hashed))
                .await
                .map_err(self.file_error("cannot read"))?;
        }
        Ok(hashed)
    }

    /// Empties the partial file.
    async fn restart(&self, file: &mut File) -> Result<(), DownloadError> {
        file.flush()
            .await
            .map_err(self.file_error("cannot write"))?;
        file.set_len(0)
            .await
            .map_err(self.file_error("cannot truncate"))?;
        file.seek(SeekFrom::Start(0))
            .await
            .map_err(self.file_error("cannot truncate"))?;
        Ok(())
    }

    /// Waits for a network step, bounded by the stall limit and the overall deadline.
    /// Only network waits are bounded, so a file operation is never cut off halfway.
    async fn limit<F: Future>(&self, step: F) -> Result<F::Output, DownloadError> {
        let stall_at = Instant::now() + self.fetch.stall;
        if self.deadline_at <= stall_at {
            tokio::time::timeout_at(self.deadline_at, step)
                .await
                .map_err(|_| self.timed_out())
        } else {
            tokio::time::timeout_at(stall_at, step)
                .await
                .map_err(|_| DownloadError::Stalled {
                    url: self.fetch.url.to_string(),
                    stall: self.fetch.stall,
                })
        }
    }

    /// Backs off before another attempt, unless that would pass the deadline.
    async fn pause(&self, pause: Duration) -> Result<(), DownloadError> {
        let until = Instant::now() + pause;
        if until >= self.deadline_at {
            tokio::time::sleep_until(self.deadline_at).await;
            return Err(self.timed_out());
        }
        tokio::time::sleep_until(until).await;
        Ok(())
    }

    fn timed_out(&self) -> DownloadError {
        DownloadError::TimedOut {
            url: self.fetch.url.to_string(),
            deadline: self.fetch.deadline,
        }
    }

    fn too_long(&self) -> DownloadError {
        DownloadError::TooLong {
            url: self.fetch.url.to_string(),
            limit: self.fetch.length,
        }
    }

    fn file_error(
        &self,
        action: &'static str,
    ) -> impl FnOnce(std::io::Error) -> DownloadError + '_ {
        move |source| DownloadError::File {
            action,
            path: self.part.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const LENGTH: usize = 10_000;
    const HALF: usize = LENGTH / 2;
    const STALL: Duration = Duration::from_millis(300);
    const DEADLINE: Duration = Duration::from_secs(20);

    fn client_for_tests() -> reqwest::Client {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .build()
            .expect("test client")
    }

    fn artifact() -> Vec<u8> {
        (0..LENGTH).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// A directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "herald-download-{}-{test}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            herald_io::files::create_private_dir(&dir).unwrap();
            Scratch(dir)
        }

        fn dest(&self) -> PathBuf {
            self.0.join("artifact")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// How the test server sends a body after the head.
    enum Send {
        /// All of it, then close.
        All,
        /// The first n bytes, then close (a broken connection if a length was announced).
        Cut(usize),
        /// The first n bytes, then hold the connection open, silent.
        Hang(usize),
        /// One byte per interval.
        Trickle(Duration),
    }

    struct Reply {
        status: &'static str,
        headers: Vec<String>,
        body: Vec<u8>,
        send: Send,
    }

    impl Reply {
        /// 200 with Content-Length.
        fn ok(body: &[u8]) -> Reply {
            Reply {
                status: "200 OK",
                headers: vec![format!("Content-Length: {}", body.len())],
                body: body.to_vec(),
                send: Send::All,
            }
        }

        /// What an honest server answers, honouring `Range: bytes=from-`.
        fn honest(body: &[u8], from: Option<u64>) -> Reply {
            match from {
                Some(from) => {
                    let from = from as usize;
                    Reply {
                        status: "206 Partial Content",
                        headers: vec![
                            format!("Content-Length: {}", body.len() - from),
                            format!(
                                "Content-Range: bytes {from}-{}/{}",
                                body.len() - 1,
                                body.len()
                            ),
                        ],
                        body: body[from..].to_vec(),
                        send: Send::All,
                    }
                }
                None => Reply::ok(body),
            }
        }

        fn sending(mut self, send: Send) -> Reply {
            self.send = send;
            self
        }
    }

    type Handler = dyn Fn(usize, Option<u64>) -> Reply + std::marker::Send + Sync;

    /// A one-request-per-connection HTTP/1.1 server that misbehaves as told. It records
    /// the `Range` header of every request it receives.
    struct Server {
        url: String,
        ranges: Arc<Mutex<Vec<Option<String>>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        /// `handler(connection index, requested range start)` decides each reply.
        async fn start(
            handler: impl Fn(usize, Option<u64>) -> Reply + std::marker::Send + Sync + 'static,
        ) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/artifact", listener.local_addr().unwrap());
            let ranges = Arc::new(Mutex::new(Vec::new()));
            let handler: Arc<Handler> = Arc::new(handler);
            let seen = ranges.clone();
            let task = tokio::spawn(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for index in 0.. {
                    let Ok((socket, _)) = listener.accept().await else {
                        return;
                    };
                    let handler = handler.clone();
                    let seen = seen.clone();
                    // Dropping the set (when this task is aborted) ends every connection.
                    tasks.spawn(async move {
                        let _ = serve(socket, index, &*handler, &seen).await;
                    });
                }
            });
            Server { url, ranges, task }
        }

        fn ranges(&self) -> Vec<Option<String>> {
            self.ranges.lock().unwrap().clone()
        }
    }

    async fn serve(
        mut socket: tokio::net::TcpStream,
        index: usize,
        handler: &Handler,
        seen: &Mutex<Vec<Option<String>>>,
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buffer).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buffer[..n]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let range = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("range")
                .then(|| value.trim().to_string())
        });
        let from = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|r| r.parse().ok());
        seen.lock().unwrap().push(range);
        let reply = handler(index, from);
        let mut out = format!("HTTP/1.1 {}\r\nConnection: close\r\n", reply.status);
        for header in &reply.headers {
            out.push_str(header);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        socket.write_all(out.as_bytes()).await?;
        match reply.send {
            Send::All => socket.write_all(&reply.body).await?,
            Send::Cut(n) => socket.write_all(&reply.body[..n]).await?,
            Send::Hang(n) => {
                socket.write_all(&reply.body[..n]).await?;
                std::future::pending::<()>().await;
            }
            Send::Trickle(every) => {
                for byte in &reply.body {
                    socket.write_all(std::slice::from_ref(byte)).await?;
                    tokio::time::sleep(every).await;
                }
            }
        }
        socket.shutdown().await
    }

    fn order<'a>(url: &'a str, dest: &'a Path, body: &[u8]) -> Fetch<'a> {
        Fetch {
            url,
            length: LENGTH as u64,
            sha256: sha256(body),
            dest,
            stall: STALL,
            deadline: DEADLINE,
        }
    }

    /// Runs a fetch, returning its result and every progress report.
    async fn run(fetch: &Fetch<'_>) -> (Result<(), DownloadError>, Vec<u64>) {
        let client = client_for_tests();
        let mut reports = Vec::new();
        let mut progress = |n| reports.push(n);
        let result = super::fetch(&client, fetch, &mut progress).await;
        (result, reports)
    }

    fn assert_nothing_left(dest: &Path) {
        assert!(!dest.exists(), "{} must not exist", dest.display());
        assert!(
            !part_path(dest).exists(),
            "{} must not exist",
            part_path(dest).display()
        );
    }

    fn assert_send<T: std::marker::Send>(_: &T) {}

    #[tokio::test]
    async fn honest_server_download_verifies_with_progress() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |_, from| Reply::honest(&served, from)).await;
        let scratch = Scratch::new("honest");
        let dest = scratch.dest();
        let fetch = order(&server.url, &dest, &body);

        let client = client_for_tests();
        let mut reports = Vec::new();
        let mut progress = |n| reports.push(n);
        let future = super::fetch(&client, &fetch, &mut progress);
        assert_send(&future);
        future.await.unwrap();

        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert!(!part_path(&dest).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(reports.last(), Some(&(LENGTH as u64)));
        assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
        assert!(reports.len() <= PROGRESS_STEPS as usize + 2, "{reports:?}");
        assert_eq!(server.ranges(), vec![None]);
    }

    #[tokio::test]
    async fn resume_asks_for_the_rest_and_verifies() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |_, from| Reply::honest(&served, from)).await;
        let scratch = Scratch::new("resume");
        let dest = scratch.dest();
        std::fs::write(part_path(&dest), &body[..HALF]).unwrap();

        let (result, reports) = run(&order(&server.url, &dest, &body)).await;
        result.unwrap();
        assert_eq!(server.ranges(), vec![Some(format!("bytes={HALF}-"))]);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(reports.first(), Some(&(HALF as u64)));
        assert!(!part_path(&dest).exists());
    }

    #[tokio::test]
    async fn server_ignoring_range_restarts_from_zero() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |_, _| Reply::ok(&served)).await;
        let scratch = Scratch::new("ignore-range");
        let dest = scratch.dest();
        // A prefix that is wrong: kept, it would spoil the hash.
        std::fs::write(part_path(&dest), vec![0xAA; HALF]).unwrap();

        let (result, reports) = run(&order(&server.url, &dest, &body)).await;
        result.unwrap();
        assert_eq!(server.ranges(), vec![Some(format!("bytes={HALF}-"))]);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(reports.first(), Some(&0), "progress starts over");
    }

    #[tokio::test]
    async fn partial_file_as_long_as_declared_is_discarded() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |_, from| Reply::honest(&served, from)).await;
        let scratch = Scratch::new("overlong-part");
        let dest = scratch.dest();
        std::fs::write(part_path(&dest), vec![0x55; LENGTH + 7]).unwrap();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        result.unwrap();
        assert_eq!(server.ranges(), vec![None]);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    }

    #[tokio::test]
    async fn tampered_bytes_fail_the_hash_and_leave_nothing() {
        let body = artifact();
        let mut tampered = body.clone();
        tampered[1234] ^= 1;
        let server = Server::start(move |_, from| Reply::honest(&tampered, from)).await;
        let scratch = Scratch::new("tampered");
        let dest = scratch.dest();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        match result {
            Err(DownloadError::HashMismatch { expected, got }) => {
                assert_eq!(expected, hex::encode(sha256(&body)));
                assert_ne!(got, expected);
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn short_body_is_the_wrong_length() {
        let body = artifact();
        let served = body[..6000].to_vec();
        let server = Server::start(move |_, _| Reply::ok(&served)).await;
        let scratch = Scratch::new("short");
        let dest = scratch.dest();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        match result {
            Err(DownloadError::WrongLength { expected, got }) => {
                assert_eq!((expected, got), (LENGTH as u64, 6000));
            }
            other => panic!("expected WrongLength, got {other:?}"),
        }
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn body_longer_than_declared_is_cut_off() {
        let body = artifact();
        let mut longer = body.clone();
        longer.extend_from_slice(&[7u8; 5000]);
        // No Content-Length: the body runs until the server closes.
        let server = Server::start(move |_, _| Reply {
            status: "200 OK",
            headers: Vec::new(),
            body: longer.clone(),
            send: Send::All,
        })
        .await;
        let scratch = Scratch::new("too-long");
        let dest = scratch.dest();

        let (result, reports) = run(&order(&server.url, &dest, &body)).await;
        assert!(
            matches!(result, Err(DownloadError::TooLong { limit, .. }) if limit == LENGTH as u64),
            "{result:?}"
        );
        assert!(reports.iter().all(|&n| n <= LENGTH as u64), "{reports:?}");
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn announced_length_over_declared_is_refused_before_the_body() {
        let body = artifact();
        let longer = vec![1u8; LENGTH + 1];
        // The body never comes: reading it would stall instead of failing at once.
        let server = Server::start(move |_, _| Reply::ok(&longer).sending(Send::Hang(0))).await;
        let scratch = Scratch::new("announced-too-long");
        let dest = scratch.dest();
        let mut fetch = order(&server.url, &dest, &body);
        fetch.stall = Duration::from_secs(30);

        let (result, reports) = run(&fetch).await;
        assert!(
            matches!(result, Err(DownloadError::TooLong { .. })),
            "{result:?}"
        );
        assert!(reports.is_empty());
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn trickling_server_stalls_and_leaves_nothing() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |_, _| Reply::ok(&served).sending(Send::Hang(1))).await;
        let scratch = Scratch::new("stall");
        let dest = scratch.dest();

        let started = std::time::Instant::now();
        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(DownloadError::Stalled { .. })),
            "{result:?}"
        );
        assert!(took >= STALL, "gave up after {took:?}");
        assert!(took < STALL * 5, "took {took:?}");
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn slow_server_runs_into_the_deadline() {
        let body = artifact();
        let served = body.clone();
        // A byte every 20 ms never stalls, but 10 000 of them take far too long.
        let server = Server::start(move |_, _| {
            Reply::ok(&served).sending(Send::Trickle(Duration::from_millis(20)))
        })
        .await;
        let scratch = Scratch::new("deadline");
        let dest = scratch.dest();
        let mut fetch = order(&server.url, &dest, &body);
        fetch.deadline = Duration::from_millis(700);

        let started = std::time::Instant::now();
        let (result, _) = run(&fetch).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(DownloadError::TimedOut { .. })),
            "{result:?}"
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn broken_connection_is_resumed() {
        let body = artifact();
        let served = body.clone();
        let server = Server::start(move |index, from| match index {
            0 => Reply::ok(&served).sending(Send::Cut(HALF)),
            _ => Reply::honest(&served, from),
        })
        .await;
        let scratch = Scratch::new("broken");
        let dest = scratch.dest();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        result.unwrap();
        assert_eq!(server.ranges(), vec![None, Some(format!("bytes={HALF}-"))]);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    }

    #[tokio::test]
    async fn gives_up_after_three_broken_attempts_and_keeps_the_part() {
        let body = artifact();
        let served = body.clone();
        let server =
            Server::start(move |_, from| Reply::honest(&served, from).sending(Send::Cut(1000)))
                .await;
        let scratch = Scratch::new("give-up");
        let dest = scratch.dest();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        match result {
            Err(DownloadError::Connection { attempts, .. }) => assert_eq!(attempts, ATTEMPTS),
            other => panic!("expected Connection, got {other:?}"),
        }
        assert_eq!(
            server.ranges(),
            vec![
                None,
                Some("bytes=1000-".to_string()),
                Some("bytes=2000-".to_string())
            ]
        );
        assert_eq!(std::fs::read(part_path(&dest)).unwrap(), body[..3000]);
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn wrong_resume_range_is_refused() {
        let body = artifact();
        let served = body.clone();
        // Claims a partial answer but starts from the beginning.
        let server = Server::start(move |_, _| Reply::honest(&served, Some(0))).await;
        let scratch = Scratch::new("bad-range");
        let dest = scratch.dest();
        std::fs::write(part_path(&dest), &body[..HALF]).unwrap();

        let (result, _) = run(&order(&server.url, &dest, &body)).await;
        assert!(
            matches!(result, Err(DownloadError::BadRange { asked, .. }) if asked == HALF as u64),
            "{result:?}"
        );
        assert!(!dest.exists());
    }

    #[tokio::test]
    async fn error_status_is_named() {
        let server = Server::start(|_, _| Reply {
            status: "404 Not Found",
            headers: vec!["Content-Length: 0".to_string()],
            body: Vec::new(),
            send: Send::All,
        })
        .await;
        let scratch = Scratch::new("status");
        let dest = scratch.dest();

        let (result, _) = run(&order(&server.url, &dest, &artifact())).await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, DownloadError::Status { status, .. } if status == StatusCode::NOT_FOUND)
        );
        assert!(err.to_string().contains("404"), "{err}");
        assert_nothing_left(&dest);
    }

    #[tokio::test]
    async fn plain_http_elsewhere_and_other_schemes_are_refused_without_connecting() {
        let server = Server::start(|_, _| Reply::ok(b"never")).await;
        let scratch = Scratch::new("scheme");
        let dest = scratch.dest();
        let port = server
            .url
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let urls = [
            "http://198.18.0.1/artifact".to_string(),
            format!("ftp://127.0.0.1:{port}/artifact"),
            "file:///etc/passwd".to_string(),
            "not a url".to_string(),
        ];
        for url in &urls {
            let (result, _) = run(&order(url, &dest, &artifact())).await;
            assert!(
                matches!(&result, Err(DownloadError::Scheme { url: refused }) if refused == url),
                "{url}: {result:?}"
            );
        }
        assert!(server.ranges().is_empty());
        assert_nothing_left(&dest);
    }

    #[test]
    fn only_https_or_loopback_http_is_allowed() {
        for ok in [
            "https://example.com/a.tar.gz",
            "https://198.18.0.1/a",
            "http://127.0.0.1:8080/a",
            "http://127.9.9.9/a",
            "http://[::1]:80/a",
            "http://localhost/a",
            "http://LOCALHOST:1/a",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://198.18.0.1/a",
            "http://localhost.example.com/a",
            "http://[::ffff:198.18.0.1]/a",
            "http://128.0.0.1/a",
            "ftp://127.0.0.1/a",
            "file:///etc/passwd",
            "https//missing-colon",
            "",
        ] {
            assert!(check_url(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn content_range_start_is_parsed() {
        assert_eq!(range_start("bytes 500-999/1000"), Some(500));
        assert_eq!(range_start("bytes 0-0/*"), Some(0));
        assert_eq!(range_start("bytes */1000"), None);
        assert_eq!(range_start("items 5-6/7"), None);
        assert_eq!(range_start(""), None);
    }
}
