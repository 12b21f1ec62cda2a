//! The client library behind the `llm` stage kind ([`crate::stages::llm`]): canonical
//! requests and their ids, the endpoint pool (retries, concurrency, health) and its HTTP
//! transport, OpenAI response decoding, the SQLite response cache, and parsing of messy
//! model output. Nothing here knows about stages, tables or pipelines, so other kinds (a
//! benchmark judge, a verifier writer) and the `batch` and `sim` verbs can use it as is.

pub mod cache;
pub mod http;
pub mod parse;
pub mod pool;
pub mod request;
pub mod response;
