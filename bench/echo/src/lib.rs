//! The benchmarks' trivial handler: the payload in, the same payload out on `bench.out`.
//! The baseline subscriber in `wasmev-bench` does exactly the same work without Wasm.

use wasmev_guest::{Event, HandleError, Handler, export_handler, publish};

struct Echo;

impl Handler for Echo {
    fn handle(event: Event) -> Result<(), HandleError> {
        publish("bench.out", &event.payload)?;
        Ok(())
    }
}

export_handler!(Echo);
