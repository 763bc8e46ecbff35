//! Write wasmev event handlers in Rust.
//!
//! A handler is a type that implements [`Handler`]; [`export_handler!`] turns it into the
//! component the host loads. The SDK hides `wit-bindgen`: events, errors and the host
//! imports (publish, log, config) are plain Rust.
//!
//! ```ignore
//! use wasmev_guest::{Event, HandleError, Handler, export_handler, info, publish_json};
//!
//! #[derive(serde::Deserialize)]
//! struct User { id: String, email: String }
//!
//! struct Greeter;
//!
//! impl Handler for Greeter {
//!     fn handle(event: Event) -> Result<(), HandleError> {
//!         let user: User = event.json()?; // bad JSON => reject with the parse error
//!         info!("greeting {}", user.email);
//!         publish_json("greeting.sent", &serde_json::json!({ "user_id": user.id }))?;
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Greeter);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`; the `.wasm` under
//! `target/wasm32-wasip2/release/` is the component to name in `runtime.toml`.
//!
//! # Without std
//!
//! With `default-features = false` the SDK is `no_std` (it needs `alloc` only) and supplies
//! what std would: the heap (wasi-libc's `malloc`), the canonical ABI's `cabi_realloc`, and
//! a panic handler that logs the message and location at error level (through the `log`
//! import, where std would print them to stderr) and traps (the host reports the trap).
//! A `#![no_std]` handler crate whose dependencies are all `no_std` then builds a component
//! that imports wasmev's interfaces and no WASI one, which makes every fresh instance
//! cheaper. A dependency that brings std back fails the build with "duplicate lang item
//! `panic_impl`".

#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;

#[cfg(not(feature = "std"))]
mod no_std;

/// `format!` for the logging macros, which expand in crates that may be `no_std`.
#[doc(hidden)]
pub use alloc::format as __format;

/// Generated bindings for the `wasmev:events/handler` world. Handler authors should not
/// need anything from here directly; it is public because [`export_handler!`] expands to it.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // wit-bindgen's generated glue
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "wasmev_guest::bindings",
    });
}

pub use bindings::Guest as Handler;
pub use bindings::wasmev::events::types::{
    Event, HandleError, Level, PublishError, RequestError, Response,
};

/// Export `$ty`, a type implementing [`Handler`], as this component's event handler.
///
/// Call it exactly once per handler crate, at the top level.
#[macro_export]
macro_rules! export_handler {
    ($ty:ident) => {
        $crate::bindings::__export_handler_world!($ty);
    };
}

/// Anything the SDK's helpers can fail with. Converts into [`HandleError`] with `?`, so a
/// handler can let the host decide: malformed input is rejected, a broker hiccup retried.
#[derive(Debug)]
pub enum Error {
    /// The event payload could not be decoded.
    Decode(String),
    /// A value could not be encoded for publishing.
    Encode(String),
    /// The host refused or could not complete a publish.
    Publish(PublishError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Decode(e) => write!(f, "invalid payload: {e}"),
            Error::Encode(e) => write!(f, "cannot encode payload: {e}"),
            Error::Publish(e) => write!(f, "publish failed: {}", describe_publish_error(e)),
        }
    }
}

impl core::error::Error for Error {}

fn describe_publish_error(e: &PublishError) -> String {
    match e {
        PublishError::AccessDenied(s) => format!("access denied to subject {s:?}"),
        PublishError::InvalidSubject(s) => format!("invalid subject {s:?}"),
        PublishError::InvalidHeader(h) => format!("invalid header {h:?}"),
        PublishError::PayloadTooLarge(max) => format!("payload larger than {max} bytes"),
        PublishError::QuotaExceeded => "publish quota for this event exceeded".to_string(),
        PublishError::Unavailable(why) => format!("broker unavailable: {why}"),
    }
}

impl From<PublishError> for Error {
    fn from(e: PublishError) -> Self {
        Error::Publish(e)
    }
}

impl From<Error> for HandleError {
    /// Only a broker outage is worth retrying; every other failure would fail again the
    /// same way, so it is rejected (dead-lettered) with the reason.
    fn from(e: Error) -> Self {
        match e {
            Error::Publish(PublishError::Unavailable(_)) => HandleError::Retry(None),
            other => HandleError::Reject(other.to_string()),
        }
    }
}

impl From<PublishError> for HandleError {
    fn from(e: PublishError) -> Self {
        Error::Publish(e).into()
    }
}

impl Event {
    /// Decode the payload as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| Error::Decode(e.to_string()))
    }

    /// The payload as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        core::str::from_utf8(&self.payload).map_err(|e| Error::Decode(e.to_string()))
    }

    /// The first value of header `name` (case-sensitive, as NATS headers are).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Publish raw bytes on `subject`. The subject must be within the handler's `publish` grant.
pub fn publish(subject: &str, payload: &[u8]) -> Result<(), PublishError> {
    bindings::wasmev::events::publisher::publish(subject, payload, &[])
}

/// Publish raw bytes with headers on `subject`.
pub fn publish_with_headers(
    subject: &str,
    payload: &[u8],
    headers: &[(String, String)],
) -> Result<(), PublishError> {
    bindings::wasmev::events::publisher::publish(subject, payload, headers)
}

/// Answer the current event's request (its `reply_to`). Fails with `AccessDenied` when the
/// event is not a request.
pub fn reply(payload: &[u8]) -> Result<(), PublishError> {
    bindings::wasmev::events::publisher::reply(payload, &[])
}

/// Answer the current event's request with `value` encoded as JSON.
pub fn reply_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<(), Error> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::Encode(e.to_string()))?;
    reply(&payload)?;
    Ok(())
}

/// Send a request on `subject` and wait up to `timeout` for the reply.
pub fn request(
    subject: &str,
    payload: &[u8],
    timeout: core::time::Duration,
) -> Result<Response, RequestError> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    bindings::wasmev::events::publisher::request(subject, payload, &[], ms)
}

/// Publish `value` encoded as JSON on `subject`.
pub fn publish_json<T: serde::Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), Error> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::Encode(e.to_string()))?;
    publish(subject, &payload)?;
    Ok(())
}

/// The handler's configuration value for `key` from its `config` table in `runtime.toml`.
pub fn config(key: &str) -> Option<String> {
    bindings::wasmev::events::config::get(key)
}

/// Write a log line at `level` into the host's log, tagged with this handler's name.
/// Prefer the [`info!`]-style macros.
pub fn log(level: Level, message: &str) {
    bindings::wasmev::events::log::log(level, message)
}

/// Log at trace level, `format!`-style.
#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log($crate::Level::Trace, &$crate::__format!($($arg)*)) }; }
/// Log at debug level, `format!`-style.
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log($crate::Level::Debug, &$crate::__format!($($arg)*)) }; }
/// Log at info level, `format!`-style.
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log($crate::Level::Info, &$crate::__format!($($arg)*)) }; }
/// Log at warn level, `format!`-style.
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log($crate::Level::Warn, &$crate::__format!($($arg)*)) }; }
/// Log at error level, `format!`-style.
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log($crate::Level::Error, &$crate::__format!($($arg)*)) }; }
