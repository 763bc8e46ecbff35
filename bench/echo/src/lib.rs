//! The benchmarks' trivial handler: the payload in, the same payload out on `bench.out`.
//! The baseline subscriber in `wasmev-bench` does exactly the same work without Wasm.

use wasmev_guest::{Event, HandleError, Handler, export_handler, publish};

/// Events on this subject are answered without publishing: the benchmarks' floor times
/// the call with and without the publish import this way.
const QUIET: &str = "bench.quiet";

/// Events on this subject first fill a 256 KiB heap buffer, as a handler that parses a
/// document or builds a reply would. That is more than the default initial memory leaves
/// free, so a fresh instance grows its memory; the floor times what that costs.
const SCRATCH: &str = "bench.scratch";
const SCRATCH_BYTES: usize = 256 << 10;

struct Echo;

impl Handler for Echo {
    fn handle(event: Event) -> Result<(), HandleError> {
        if event.subject == SCRATCH {
            std::hint::black_box(vec![1u8; SCRATCH_BYTES]);
        }
        if event.subject != QUIET {
            publish("bench.out", &event.payload)?;
        }
        Ok(())
    }
}

export_handler!(Echo);
