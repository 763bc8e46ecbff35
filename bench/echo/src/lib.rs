//! The benchmarks' trivial handler: the payload in, the same payload out on `bench.out`.
//! The baseline subscriber in `wasmev-bench` does exactly the same work without Wasm.

use wasmev_guest::{Event, HandleError, Handler, export_handler, publish};

/// Events on this subject are answered without publishing: the benchmarks' floor times
/// the call with and without the publish import this way.
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
