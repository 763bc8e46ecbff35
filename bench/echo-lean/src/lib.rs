//! The benchmarks' echo handler (`bench/echo`) built without Rust's standard library.
//!
//! A Rust component built with std imports a dozen WASI interfaces whether or not the
//! handler uses them (std's stderr for panic messages, wasi-libc's stdio set-up and
//! environment, `exit`), and a fresh instance pays for wiring every one of them. With the
//! SDK's `std` feature off this build imports wasmev's interfaces and nothing else, so the
//! benchmarks can price those imports; the tests run it as the SDK's `no_std` example.

#![no_std]

use wasmev_guest::{Event, HandleError, Handler, export_handler, publish};

/// Answered without publishing, as `bench/echo` does.
const QUIET: &str = "bench.quiet";

struct Echo;

impl Handler for Echo {
    fn handle(event: Event) -> Result<(), HandleError> {
        if event.subject != QUIET {
            publish("bench.out", &event.payload)?;
        }
        Ok(())
    }
}

export_handler!(Echo);
