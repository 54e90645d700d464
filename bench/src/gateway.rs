//! A stand-in SMS gateway on loopback, in the benchmark process: plain HTTP/1.1 (the
//! server's `[sms]` template points at it, with `[forwarding] allow_http`). It answers
//! every request `200 {"id": "bench-N"}` at once, as a gateway that queued the SMS
//! would, and records when each request came and which number it was for.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use herald_server::config::{SmsBodyFormat, SmsConfig};

/// One request the gateway took.
#[derive(Debug, Clone)]
pub struct SmsRequest {
    /// When it arrived (its body read).
    pub at: Instant,
    /// The `to` field, as sent (form-encoded).
    pub to: String,
}

type Record = Arc<Mutex<Vec<SmsRequest>>>;

/// The running gateway.
pub struct Gateway {
    addr: SocketAddr,
    record: Record,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Gateway> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the SMS gateway stand-in")?;
        let addr = listener.local_addr()?;
        let record = Record::default();
        let app = Router::new()
            .route("/sms", post(take))
            .with_state(record.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("herald-bench: SMS gateway stand-in stopped: {e}");
            }
        });
        Ok(Gateway { addr, record, task })
    }

    /// The server's `[sms]` section for this gateway: a form POST, the id read from
    /// the answer's `/id`.
    pub fn sms_config(&self) -> SmsConfig {
        SmsConfig {
            url: format!("http://{}/sms", self.addr),
            method: "POST".into(),
            headers: Default::default(),
            body: Some("to={to}&text={text}".into()),
            body_format: SmsBodyFormat::Form,
            id_pointer: Some("/id".into()),
            report_secret: None,
        }
    }

    /// Requests taken so far (an index into the record).
    pub fn count(&self) -> usize {
        self.record.lock().expect("gateway lock").len()
    }

    /// The requests taken after the first `from`.
    pub fn since(&self, from: usize) -> Vec<SmsRequest> {
        self.record.lock().expect("gateway lock")[from..].to_vec()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn take(State(record): State<Record>, body: String) -> Json<serde_json::Value> {
    let at = Instant::now();
    let to = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("to="))
        .unwrap_or_default()
        .to_string();
    let n = {
        let mut record = record.lock().expect("gateway lock");
        record.push(SmsRequest { at, to });
        record.len()
    };
    Json(serde_json::json!({ "id": format!("bench-{n}") }))
}
