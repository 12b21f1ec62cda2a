//! The pool's HTTP transport: one request, its whole answer, or why not.
//!
//! Plain `http://` endpoints (vLLM replicas on a cluster's network, the case that sends
//! millions of requests) go through hyper-util's client directly; `https://` endpoints (hosted
//! APIs) through reqwest, for its TLS set-up and root certificates. Why not reqwest for both:
//! reqwest wraps the same hyper-util client and adds per-request layers (a timeout and
//! redirect service stack, a `Url` parsed back from every response) that cost 15–20 µs of CPU
//! per request on top of it (`benches/llm.rs` part f, 100k requests: 50–56 µs against 35 µs),
//! a fifth of the whole stage's CPU per request.
//!
//! Both paths give the same [`Reply`] and [`HttpError`], so the pool's retry rules
//! (`client.rs`) do not know which one carried a request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

type Plain = Client<HttpConnector, http_body_util::Full<Bytes>>;

/// Where a request goes, parsed once per endpoint and API (not per request).
#[derive(Debug, Clone)]
pub enum Target {
    Plain(Uri),
    Tls(reqwest::Url),
    /// A URL that does not parse: every request to it fails with this message.
    Bad(String),
}

impl Target {
    pub fn new(url: &str) -> Target {
        // Only the exact lowercase scheme takes the direct path: hyper-util's connector
        // compares the scheme byte for byte. Anything else is reqwest's to judge.
        if url.starts_with("http://") {
            match url.parse::<Uri>() {
                Ok(u) => Target::Plain(u),
                Err(e) => Target::Bad(format!("invalid URL `{url}`: {e}")),
            }
        } else {
            match reqwest::Url::parse(url) {
                Ok(u) => Target::Tls(u),
                Err(e) => Target::Bad(format!("invalid URL `{url}`: {e}")),
            }
        }
    }
}

/// The CA certificates of a PEM file (`ca_cert`), for https endpoints whose certificate no
/// platform root vouches for: a private CA, a self-signed vLLM. Read when the pipeline is
/// validated, so a wrong path is reported with its line, and again when a stage starts.
pub fn roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "{} is not a PEM certificate file: {}",
            path.display(),
            chain(&e)
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no `-----BEGIN CERTIFICATE-----` block",
            path.display()
        ));
    }
    Ok(certs)
}

/// A whole answer: status, headers and the body read to its end.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// No answer: why, and what kind of failure (for the retry rules and the circuit breaker).
#[derive(Debug)]
pub struct HttpError {
    pub message: String,
    /// The request's timeout passed first.
    pub timeout: bool,
    /// No connection could be made.
    pub connect: bool,
    /// The server's certificate was refused (a connect error too): not a server that is down.
    pub untrusted: bool,
}

impl HttpError {
    fn other(message: String) -> Self {
        HttpError {
            message,
            timeout: false,
            connect: false,
            untrusted: false,
        }
    }

    fn timed_out() -> Self {
        HttpError {
            message: "timed out".into(),
            timeout: true,
            connect: false,
            untrusted: false,
        }
    }

    fn unreachable() -> Self {
        HttpError {
            message: "connection refused or unreachable".into(),
            timeout: false,
            connect: true,
            untrusted: false,
        }
    }
}

/// An error with the chain of its sources, which is where hyper says what happened
/// ("connection closed before message completed").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

pub struct Transport {
    plain: Plain,
    tls: reqwest::Client,
}

impl Transport {
    /// `idle`: connections kept open per host (the pool's in-flight limit, so a full window
    /// of requests reuses its connections); `tls`: some endpoint is `https://` (loading the
    /// platform's root certificates reads every file under /etc/ssl/certs, ~0.2 s, so it is
    /// skipped when none is); `roots`: CA certificates trusted besides the platform's
    /// (`ca_cert`).
    pub fn new(
        idle: usize,
        tls: bool,
        roots: Vec<reqwest::Certificate>,
    ) -> Result<Transport, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let plain = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(idle)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        let mut b = reqwest::Client::builder()
            .pool_max_idle_per_host(idle)
            .tcp_nodelay(true);
        b = if tls {
            b.tls_certs_merge(roots)
        } else {
            b.tls_certs_only([])
        };
        let tls = b
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Transport { plain, tls })
    }

    /// POST a JSON body; `timeout` covers the whole exchange, the body's last byte included.
    pub async fn post(
        &self,
        target: &Target,
        body: Bytes,
        request_id: &str,
        auth: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<Reply, HttpError> {
        self.send(Method::POST, target, body, Some(request_id), auth, timeout)
            .await
    }

    /// GET (the endpoint check's `/models`).
    pub async fn get(
        &self,
        target: &Target,
        auth: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<Reply, HttpError> {
        self.send(Method::GET, target, Bytes::new(), None, auth, timeout)
            .await
    }

    /// One request by either path. A request with an id carries a JSON body.
    async fn send(
        &self,
        method: Method,
        target: &Target,
        body: Bytes,
        request_id: Option<&str>,
        auth: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Result<Reply, HttpError> {
        match target {
            Target::Plain(uri) => {
                let mut req = hyper::Request::builder().method(method).uri(uri.clone());
                if let Some(id) = request_id {
                    req = req
                        .header("x-ifloom-request-id", id)
                        .header(CONTENT_TYPE, "application/json");
                }
                if let Some(a) = auth {
                    req = req.header(AUTHORIZATION, a.clone());
                }
                let req = req
                    .body(http_body_util::Full::new(body))
                    .map_err(|e| HttpError::other(format!("cannot build the request: {e}")))?;
                self.plain_exchange(req, timeout).await
            }
            Target::Tls(url) => {
                let mut req = self.tls.request(method, url.clone()).timeout(timeout);
                if let Some(id) = request_id {
                    req = req
                        .header("x-ifloom-request-id", id)
                        .header(CONTENT_TYPE, "application/json")
                        .body(body);
                }
                if let Some(a) = auth {
                    req = req.header(AUTHORIZATION, a.clone());
                }
                tls_exchange(req).await
            }
            Target::Bad(m) => Err(HttpError::other(m.clone())),
        }
    }

    async fn plain_exchange(
        &self,
        req: hyper::Request<http_body_util::Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Reply, HttpError> {
        let exchange = async {
            let resp = self.plain.request(req).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::unreachable()
                } else {
                    HttpError::other(chain(&e))
                }
            })?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| HttpError::other(format!("reading the response body: {}", chain(&e))))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::timed_out()),
        }
    }
}

async fn tls_exchange(req: reqwest::RequestBuilder) -> Result<Reply, HttpError> {
    let err = |e: reqwest::Error, reading: bool| {
        if e.is_timeout() {
            HttpError::timed_out()
        } else if e.is_connect() {
            let why = chain(&e);
            // A refused handshake is a connect error too, and would read as a server that is
            // down: say what is wrong and what to do.
            if why.contains("certificate") {
                HttpError {
                    message: format!(
                        "TLS: {why}; a server with a self-signed certificate or one from a private CA needs `ca_cert: <its CA's PEM file>` on its endpoint group"
                    ),
                    timeout: false,
                    connect: true,
                    untrusted: true,
                }
            } else {
                HttpError::unreachable()
            }
        } else if reading {
            HttpError::other(format!("reading the response body: {}", chain(&e)))
        } else {
            HttpError::other(chain(&e))
        }
    };
    let mut resp = req.send().await.map_err(|e| err(e, false))?;
    let status = resp.status();
    let headers = std::mem::take(resp.headers_mut());
    let body = resp.bytes().await.map_err(|e| err(e, true))?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The `Authorization` header for a key, marked sensitive (hyper leaves it out of its debug
/// output). `None` when the key is not a valid header value.
pub fn bearer(key: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_goes_direct_and_the_rest_through_reqwest() {
        assert!(matches!(
            Target::new("http://127.0.0.1:8000/v1/chat/completions"),
            Target::Plain(_)
        ));
        assert!(matches!(
            Target::new("https://api.example.com/v1/models"),
            Target::Tls(_)
        ));
        assert!(matches!(Target::new("HTTP://h:1/v1"), Target::Tls(_)));
        match Target::new("http://[::1/v1") {
            Target::Bad(m) => assert!(m.contains("invalid URL `http://[::1/v1`"), "{m}"),
            t => panic!("{t:?}"),
        }
    }

    #[test]
    fn keys_are_sensitive_header_values() {
        let v = bearer("sk-123").unwrap();
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Bearer sk-123");
        assert!(bearer("bad\nkey").is_none());
    }
}
