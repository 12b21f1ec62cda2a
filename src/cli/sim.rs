//! `ifloom sim`: run the simulated OpenAI-compatible server (see [`crate::sim`]).

use std::io::Write;
use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::sim::{self, SimConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port on 127.0.0.1; 0 picks a free one (the first stdout line names it).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// A JSON config file (the keys are these flags with `_`); flags given override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The model name served [default: sim-model].
    #[arg(long)]
    pub model: Option<String>,
    /// Sequences decoded concurrently; more requests queue [default: 64].
    #[arg(long)]
    pub slots: Option<usize>,
    /// Fixed milliseconds per request [default: 20].
    #[arg(long)]
    pub base_ms: Option<u64>,
    /// Milliseconds per completion token [default: 1].
    #[arg(long)]
    pub per_token_ms: Option<u64>,
    /// A rules file: {"rules": [{"match": REGEX, "response": TEMPLATE | "json": {...}}]}.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Seed of the fault draws [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Rate of HTTP 500 answers [default: 0].
    #[arg(long)]
    pub fault_500: Option<f64>,
    /// Rate of HTTP 429 answers with Retry-After: 1 [default: 0].
    #[arg(long)]
    pub fault_429: Option<f64>,
    /// Rate of requests that hang for --hang-ms before answering [default: 0].
    #[arg(long)]
    pub fault_hang: Option<f64>,
    /// Rate of 200 answers with a truncated JSON body [default: 0].
    #[arg(long)]
    pub fault_malformed: Option<f64>,
    /// Rate of connections closed without any response [default: 0].
    #[arg(long)]
    pub fault_drop: Option<f64>,
    /// How long a hanging request sleeps [default: 600000].
    #[arg(long)]
    pub hang_ms: Option<u64>,
    /// Answer 429 (Retry-After: 1) instead of queueing when every slot is busy and this many
    /// requests wait [default: queue without bound].
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// The model's context length in tokens (words): longer requests get vLLM's 400
    /// [default: no limit].
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Serve https with this PEM certificate chain (with --tls-key) [default: plain http].
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Append each completion or classification request's JSON body to this file, one line
    /// per request.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> Result<SimConfig> {
        let mut c = match &self.config {
            Some(path) => SimConfig::from_file(path)?,
            None => SimConfig::default(),
        };
        fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
            if let Some(v) = flag {
                *field = v.clone();
            }
        }
        set(&mut c.model, &self.model);
        set(&mut c.slots, &self.slots);
        set(&mut c.base_ms, &self.base_ms);
        set(&mut c.per_token_ms, &self.per_token_ms);
        set(&mut c.seed, &self.seed);
        set(&mut c.fault_500, &self.fault_500);
        set(&mut c.fault_429, &self.fault_429);
        set(&mut c.fault_hang, &self.fault_hang);
        set(&mut c.fault_malformed, &self.fault_malformed);
        set(&mut c.fault_drop, &self.fault_drop);
        set(&mut c.hang_ms, &self.hang_ms);
        if self.max_queue.is_some() {
            c.max_queue = self.max_queue;
        }
        if self.max_model_len.is_some() {
            c.max_model_len = self.max_model_len;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert.clone();
            c.tls_key = self.tls_key.clone();
        }
        if self.record.is_some() {
            c.record = self.record.clone();
        }
        if let Some(path) = &self.rules {
            c.rules = sim::rules_from_file(path)?;
        }
        c.check()?;
        Ok(c)
    }
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let config = a.config()?;
    engine.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port))
            .await
            .map_err(|e| Error::usage(format!("cannot listen on 127.0.0.1:{}: {e}", a.port)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("listener has no address: {e}")))?;
        // Tests and scripts read the port from this first line, so it must leave at once.
        let mut out = std::io::stdout().lock();
        let scheme = if config.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let _ = writeln!(out, "listening on {scheme}://{addr}/v1");
        let _ = out.flush();
        drop(out);
        eprintln!(
            "ifloom sim: model {}, {} slots, {} ms + {} ms/token, {} rules",
            config.model,
            config.slots,
            config.base_ms,
            config.per_token_ms,
            config.rules.len()
        );
        sim::serve(config, listener).await
    })
}
