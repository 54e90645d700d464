//! The admin CLI's HTTPS client for the admin API. It verifies the server against the CA
//! from `admin.toml` (not the system roots) and sends the admin token.

use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::AdminConfig;
use crate::model::ApiErrorBody;
use crate::pki;

/// Errors talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA certificate could not be loaded.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The HTTP client could not be built.
    #[error("cannot set up HTTPS: {0}")]
    Setup(String),
    /// The server could not be reached.
    #[error("cannot reach the server at {url}: is `herald-server serve` running? ({reason})")]
    Unreachable {
        /// URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{0}")]
    Api(String),
    /// The answer was not what we expected.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

/// An authenticated admin API client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// Overall limit on one API request (long polls ask for less than this).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(330);

/// Idle pooled connections are dropped well before the server closes them (its header
/// read timeout, 10 s, also bounds keep-alive idleness), so a long-lived client never
/// sends a request down a connection the server is just closing.
const POOL_IDLE: Duration = Duration::from_secs(5);

impl Client {
    /// Builds a client from the admin configuration; `server` overrides its URL.
    pub fn new(admin: &AdminConfig, server: Option<&str>) -> Result<Client, ClientError> {
        let ca = pki::load_cert(&admin.ca_cert)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| ClientError::Setup(format!("CA certificate: {e}")))?;
        let tls = rustls::ClientConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(POOL_IDLE)
            .no_proxy()
            // The one-line install pins the certificate the server presents.
            .tls_info(true)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Client {
            http,
            base: server
                .unwrap_or(&admin.server_url)
                .trim_end_matches('/')
                .to_string(),
            token: admin.admin_token.clone(),
        })
    }

    /// GET a JSON resource.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path))).await
    }

    /// GET a text resource (`/metrics`).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let body = self.send_raw(self.http.get(self.url(path))).await?;
        String::from_utf8(body.as_ref().to_vec()).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// GET a text resource without a token, with the DER of the certificate the server
    /// presented for it (already verified against Herald's CA).
    pub async fn get_public_text(&self, path: &str) -> Result<(String, Vec<u8>), ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        };
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let certificate = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ClientError::Decode("the server presented no certificate".into()))?;
        let body = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(ClientError::Api(format!(
                "{path}: server answered {status}"
            )));
        }
        let text =
            String::from_utf8(body.to_vec()).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((text, certificate))
    }

    /// The server's base URL this client talks to.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// POST a JSON body.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// PUT a raw body (artifact uploads).
    pub async fn put_body<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        length: u64,
    ) -> Result<T, ClientError> {
        self.upload(
            reqwest::Method::PUT,
            path,
            body,
            length,
            "application/octet-stream",
        )
        .await
    }

    /// Sends a raw body of a known length with `method`.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: reqwest::Body,
        length: u64,
        content_type: &str,
    ) -> Result<T, ClientError> {
        self.send(
            self.http
                .request(method, self.url(path))
                .header(reqwest::header::CONTENT_LENGTH, length)
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body),
        )
        .await
    }

    /// Uses another bearer token (a vendor's) instead of the admin token.
    pub fn with_token(mut self, token: String) -> Client {
        self.token = token;
        self
    }

    /// DELETE a resource.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.delete(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let body = self.send_raw(request).await?;
        serde_json::from_slice(body.as_ref()).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn send_raw(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<impl AsRef<[u8]>, ClientError> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            ClientError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            }
        })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("server answered {status}"));
            return Err(ClientError::Api(message));
        }
        Ok(body)
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Shares a client between tasks.
pub type SharedClient = Arc<Client>;
