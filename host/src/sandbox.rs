//! The per-event sandbox: the store's state, locked-down WASI, the memory limiter, and the
//! host side of the `wasmev:events` imports (publish, log, config).
//!
//! A guest that breaks a policy (publishes outside its grant, logs too much) gets an
//! error value or a truncated line, never a trap; only resource limits trap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::handler::HandlerCore;
use crate::limits;
use crate::metrics::PublishResult;
use crate::publish::{self, Delivery, Quota, Refusal};

/// Host bindings for the `wasmev:events/handler` world.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        // Only the publisher interface waits on the broker; log and config answer at once.
        imports: { "wasmev:events/publisher": async },
        exports: { default: async },
        // The event record is lowered straight from the host's own event (`&str`,
        // `&[u8]`): owned, it cost a copy and an allocation of each payload per event.
        ownership: Borrowing { duplicate_if_necessary: false },
    });
}

use bindings::wasmev::events::{config, log, publisher, types};

/// Store data for one event.
pub struct State {
    handler: Arc<HandlerCore>,
    subject: String,
    delivery: Delivery,
    deadline_at: Instant,
    /// Whether the guest answered the event's request itself.
    pub replied: bool,
    /// Built on the guest's first WASI call, not with the store: most handlers make none
    /// while handling an event, and building one (wasmtime-wasi seeds two random
    /// generators and boxes clocks and streams, twice, as its builder replaces itself)
    /// was ~0.37 µs of every fresh instance.
    wasi: Option<Wasi>,
    table: ResourceTable,
    quota: Quota,
    /// Set when the guest tried to grow memory past its limit, so a following trap is
    /// reported as a memory overrun rather than a generic trap.
    pub memory_denied: bool,
}

/// The guest's WASI context and the output it captures.
struct Wasi {
    ctx: WasiCtx,
    stdout: CappedOutput,
    stderr: CappedOutput,
}

impl Wasi {
    fn locked_down() -> Self {
        let stdout = CappedOutput::new(limits::GUEST_OUTPUT_CAP);
        let stderr = CappedOutput::new(limits::GUEST_OUTPUT_CAP);
        // Locked down: no preopened directories, no environment, no arguments, no
        // network (WasiCtx denies TCP, UDP and name lookup unless allowed), stdin closed.
        // Clocks and random stay: guests need them for ordinary code (hash maps, time).
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .build();
        Self {
            ctx,
            stdout,
            stderr,
        }
    }
}

impl State {
    pub fn new(
        handler: Arc<HandlerCore>,
        subject: &str,
        delivery: Delivery,
        deadline_at: Instant,
    ) -> Self {
        let quota = Quota::new(&handler.spec.guards);
        Self {
            handler,
            subject: subject.to_string(),
            delivery,
            deadline_at,
            replied: false,
            wasi: None,
            table: ResourceTable::new(),
            quota,
            memory_denied: false,
        }
    }
}

impl State {
    /// When the current event's deadline passes.
    pub fn deadline_at(&self) -> Instant {
        self.deadline_at
    }

    /// The guest's output streams by name; none if it has not used WASI in this store.
    pub fn output(&self) -> impl Iterator<Item = (&'static str, &CappedOutput)> {
        self.wasi
            .iter()
            .flat_map(|wasi| [("stdout", &wasi.stdout), ("stderr", &wasi.stderr)])
    }

    /// Make a warm instance's state ready for its next event: the per-event fields as
    /// `new` sets them; the WASI context and output buffers carry over (the buffers were
    /// emptied when the last event's output was logged).
    pub fn begin(&mut self, subject: &str, delivery: Delivery, deadline_at: Instant) {
        subject.clone_into(&mut self.subject);
        self.delivery = delivery;
        self.deadline_at = deadline_at;
        self.replied = false;
        self.quota = Quota::new(&self.handler.spec.guards);
        self.memory_denied = false;
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(Wasi::locked_down);
        WasiCtxView {
            ctx: &mut wasi.ctx,
            table: &mut self.table,
        }
    }
}

/// Tables may not grow past this many elements. Why 100 000: far above what compilers
/// emit for function tables, far below what would let a guest use tables as memory.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for State {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Deny (memory.grow returns -1) rather than trap: a guest may handle it. Most
        // allocators then abort, which is a trap we report as a memory overrun.
        if desired as u64 > self.handler.spec.memory {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl types::Host for State {}

impl State {
    /// Count a publish-path result and log refusals; pass the result through.
    fn account<T, E: std::fmt::Debug>(
        &self,
        what: &str,
        result: Result<T, (PublishResult, E)>,
    ) -> Result<T, E> {
        let metrics = &self.handler.metrics;
        match result {
            Ok(v) => {
                metrics.publish(PublishResult::ok).inc();
                Ok(v)
            }
            Err((label, error)) => {
                metrics.publish(label).inc();
                tracing::warn!(
                    handler = %self.handler.spec.name,
                    subject = %self.subject,
                    "guest {what} failed: {error:?}"
                );
                Err(error)
            }
        }
    }
}

impl publisher::Host for State {
    async fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), types::PublishError> {
        let h = self.handler.clone();
        let result: Result<(), Refusal> = publish::guest_publish(
            &h.broker,
            &h.grants,
            &self.delivery,
            &mut self.quota,
            subject,
            payload,
            headers,
        )
        .await;
        self.account("publish", result)
    }

    async fn reply(
        &mut self,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), types::PublishError> {
        let h = self.handler.clone();
        let result =
            publish::guest_reply(&h.broker, &self.delivery, &mut self.quota, payload, headers)
                .await;
        if result.is_ok() {
            self.replied = true;
        }
        self.account("reply", result)
    }

    async fn request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
        timeout_ms: u32,
    ) -> Result<types::Response, types::RequestError> {
        let h = self.handler.clone();
        let result = publish::guest_request(
            &h.broker,
            &h.grants,
            &self.delivery,
            &mut self.quota,
            self.deadline_at,
            subject,
            payload,
            headers,
            timeout_ms,
        )
        .await;
        self.account("request", result)
    }
}

impl log::Host for State {
    fn log(&mut self, level: types::Level, message: String) {
        let line = sanitize(message.as_bytes(), limits::MAX_LOG_LINE);
        let handler = &self.handler.spec.name;
        let subject = &self.subject;
        match level {
            types::Level::Trace => tracing::trace!(target: "guest", %handler, %subject, "{line}"),
            types::Level::Debug => tracing::debug!(target: "guest", %handler, %subject, "{line}"),
            types::Level::Info => tracing::info!(target: "guest", %handler, %subject, "{line}"),
            types::Level::Warn => tracing::warn!(target: "guest", %handler, %subject, "{line}"),
            types::Level::Error => tracing::error!(target: "guest", %handler, %subject, "{line}"),
        }
    }
}

impl config::Host for State {
    fn get(&mut self, key: String) -> Option<String> {
        self.handler.spec.config.get(&key).cloned()
    }
}

/// Make guest text safe for the host's log: valid UTF-8, no control characters (so no
/// terminal escapes or forged log lines), at most `max` bytes.
pub fn sanitize(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // Drop ANSI CSI sequences whole (ESC [ params final-byte), not just the ESC.
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A guest stdout/stderr that keeps the first `cap` bytes and counts the rest.
///
/// wasmtime-wasi's `MemoryOutputPipe` traps the guest once full; a chatty guest should
/// lose output, not its event, so this one accepts every write.
#[derive(Clone)]
pub struct CappedOutput {
    inner: Arc<Captured>,
}

struct Captured {
    /// Set by every write, cleared by `take`: most guests print nothing, and dispatch
    /// looks at both streams after every event, so that look is one atomic operation
    /// instead of two mutex round trips per event.
    written: AtomicBool,
    buf: Mutex<CappedBuf>,
}

struct CappedBuf {
    buf: BytesMut,
    cap: usize,
    dropped: u64,
}

impl CappedOutput {
    fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Captured {
                written: AtomicBool::new(false),
                buf: Mutex::new(CappedBuf {
                    buf: BytesMut::new(),
                    cap,
                    dropped: 0,
                }),
            }),
        }
    }

    /// Take what was captured and how many bytes were dropped.
    pub fn take(&self) -> (BytesMut, u64) {
        // A write racing this one sets the flag again after its bytes are in, so they
        // are taken next time, never lost.
        if !self.inner.written.swap(false, Ordering::Acquire) {
            return (BytesMut::new(), 0);
        }
        let mut inner = self.inner.buf.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut inner.dropped);
        (std::mem::take(&mut inner.buf), dropped)
    }

    fn write(&self, bytes: &[u8]) {
        {
            let mut inner = self.inner.buf.lock().unwrap_or_else(|e| e.into_inner());
            let room = inner.cap.saturating_sub(inner.buf.len());
            let keep = bytes.len().min(room);
            inner.buf.extend_from_slice(&bytes[..keep]);
            inner.dropped += (bytes.len() - keep) as u64;
        }
        self.inner.written.store(true, Ordering::Release);
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        CappedOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: excess is dropped, never blocks or fails the guest.
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        CappedOutput::write(&self, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_strips_escapes_and_controls_and_caps() {
        assert_eq!(sanitize(b"\x1b[31mred\x1b[0m text", 100), "red text");
        assert_eq!(sanitize(b"a\rb\x07c\td", 100), "abc d");
        assert_eq!(sanitize(b"abcdef", 3), "abc");
        assert_eq!(sanitize(&[0xff, b'a'], 10), "\u{fffd}a");
    }

    #[test]
    fn capped_output_keeps_prefix_and_counts_the_rest() {
        let out = CappedOutput::new(4);
        out.write(b"abc");
        out.write(b"defg");
        let (buf, dropped) = out.take();
        assert_eq!(&buf[..], b"abcd");
        assert_eq!(dropped, 3);
        // Taken: nothing is left, and the next write is kept again.
        let (buf, dropped) = out.take();
        assert!(buf.is_empty());
        assert_eq!(dropped, 0);
        out.write(b"xy");
        let (buf, dropped) = out.take();
        assert_eq!(&buf[..], b"xy");
        assert_eq!(dropped, 0);
    }
}
