//! The floor under the event figures: what one event costs on one thread with no broker
//! I/O, in wasmtime alone and through wasmev's dispatch, in both instance modes.
//!
//! The handler is compiled as the host compiles it (same engine settings, linker and
//! store state), and its publish goes to an embedded broker nobody subscribes to: the
//! import, the grant check and the hop header are paid, delivery is not. So "wasmtime
//! alone" is the echo handler's call as wasmev makes it, minus dispatch's bookkeeping
//! (limits, metrics, logs, the warm pool), and what the NATS rows add on top of dispatch
//! is intake, the client and the scheduler.
//!
//! It also prices the guest's memory for a fresh instance: an event that needs more heap
//! than the echo handler's initial memory has free, on the default build (the memory
//! grows) and on one linked with room for it, and what each costs the plain events that
//! run in the same pool after it.
//!
//! And it measures a reference beside the echo: `bench/bare`, the least a component can
//! be (`handle(list<u8>)`, no imports), on an engine with the host's settings. What the
//! echo costs past it is wasmev's interface (the event record, the publish import); the
//! reference itself is what any component call costs on this machine.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use wasmev::broker::memory::MemoryBroker;
use wasmev::broker::{Broker, Message};
use wasmev::dispatch::{Event, Outcome, dispatch, event_for};
use wasmev::handler::{Compiler, Handler};
use wasmev::manifest::HandlerSpec;
use wasmev::metrics::PublishResult;
use wasmev::publish::Delivery;
use wasmev::sandbox::State;

use super::load::echo_manifest;
use super::reference::{Bare, Call};
use super::{PAYLOAD, median, us_per_event};
use crate::alloc::allocations;

/// Rounds, each measuring every figure once; each figure is its median round.
const ROUNDS: usize = 5;
/// Events per round with a fresh instance each (~10 µs each; ~35 µs growing memory).
const FRESH_EVENTS: u32 = 20_000;
/// Events per round on a warm instance (~2 µs each).
const WARM_EVENTS: u32 = 100_000;

/// wasmtime alone, a fresh instance, in mean microseconds per event: a store with wasmev's
/// state, instantiation, the call, and dropping the store (which resets the instance's
/// memory for its next use).
#[derive(Debug, Clone, Copy)]
pub struct Fresh {
    pub store: f64,
    pub instantiate: f64,
    pub call: f64,
    pub drop: f64,
    /// Heap allocations per event, all four phases (wasmtime's, and wasmev's state and
    /// limiter in the store).
    pub allocations: f64,
}

impl Fresh {
    /// The phases together.
    pub fn total(&self) -> f64 {
        self.store + self.instantiate + self.call + self.drop
    }

    /// The total and the phases, for the table and `one --mode floor`.
    pub fn phases(&self) -> String {
        format!(
            "{:.2} µs ({:.2} + {:.2} + {:.2} + {:.2})",
            self.total(),
            self.store,
            self.instantiate,
            self.call,
            self.drop
        )
    }

    /// The median of each phase over `rounds`.
    fn middle(rounds: impl Iterator<Item = Fresh> + Clone) -> Fresh {
        let phase = |pick: fn(&Fresh) -> f64| median(rounds.clone().map(|f| pick(&f)).collect());
        Fresh {
            store: phase(|f| f.store),
            instantiate: phase(|f| f.instantiate),
            call: phase(|f| f.call),
            drop: phase(|f| f.drop),
            allocations: phase(|f| f.allocations),
        }
    }
}

/// Mean microseconds per event.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// wasmtime alone, a fresh instance.
    pub fresh: Fresh,
    /// The same for an event that fills 256 KiB of heap first (`bench.scratch`): more than
    /// the echo handler's initial memory has free, so each fresh instance grows it.
    pub fresh_growing: Fresh,
    /// That event again, on the echo handler linked with a 2 MiB initial memory: the room
    /// is there from the start, so nothing grows.
    pub fresh_sized_scratch: Fresh,
    /// The plain event on that 2 MiB build: what the larger memory costs an event that
    /// does not need it.
    pub fresh_sized: Fresh,
    /// The plain event again on each build, in the pool the scratch events ran in: what
    /// the others' heap costs an event that needs none. A slot keeps the pages an event
    /// wrote resident and resets them after every later event, within the memory the
    /// next instance starts with; pages the guest grew are hidden from it instead.
    pub fresh_after_growing: Fresh,
    pub fresh_sized_after_scratch: Fresh,
    /// The plain event on the echo built without std (`bench/echo-lean`), whose component
    /// imports no WASI interface: what the std build's imports cost a fresh instance.
    pub fresh_lean: Fresh,
    /// wasmtime alone: the call on an instance kept from the last event.
    pub warm_call: f64,
    /// The same call for an event the echo handler answers without publishing: the rest
    /// of `warm_call` is the publish import (the guest's call out, wasmtime's lifting and
    /// lowering, wasmev's checks and the embedded broker).
    pub warm_quiet: f64,
    /// `warm_quiet` made synchronously, on the thread itself rather than on a fiber: the
    /// same component, engine and store state, instantiated through a linker whose
    /// imports are all synchronous (wasmtime 48 allows `call` only then). The difference
    /// is what the async call itself costs; see [`sync`].
    pub warm_quiet_sync: f64,
    /// wasmev's dispatch of the same event, per-event and reuse.
    pub dispatch_fresh: f64,
    pub dispatch_warm: f64,
    /// The reference component (`bench/bare`), called as the premise has it.
    pub reference: Reference,
    /// Heap allocations per event on this thread: the warm call (wasmtime alone), and
    /// each dispatch. A count does not vary with the machine's speed, so what dispatch
    /// adds to wasmtime's own is exact, where its time is within the noise.
    pub warm_call_allocations: f64,
    pub dispatch_fresh_allocations: f64,
    pub dispatch_warm_allocations: f64,
}

impl Floor {
    /// The warm call and its two parts, for the table and `one --mode floor`.
    pub fn warm_phases(&self) -> String {
        format!(
            "{:.2} µs ({:.2} the call + {:.2} its publish; the call without a fiber {:.2})",
            self.warm_call,
            self.warm_quiet,
            self.warm_call - self.warm_quiet,
            self.warm_quiet_sync
        )
    }
}

/// The reference component's figures, in mean microseconds per event: its call on a warm
/// instance and a fresh instance (store + instantiate + call + drop), each made async (on
/// a fiber, as wasmev calls handlers) and synchronously.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    pub warm: f64,
    pub warm_sync: f64,
    pub fresh: f64,
    pub fresh_sync: f64,
}

impl Reference {
    fn middle(rounds: &[Floor]) -> Reference {
        let figure = |pick: fn(&Reference) -> f64| {
            median(rounds.iter().map(|f| pick(&f.reference)).collect())
        };
        Reference {
            warm: figure(|r| r.warm),
            warm_sync: figure(|r| r.warm_sync),
            fresh: figure(|r| r.fresh),
            fresh_sync: figure(|r| r.fresh_sync),
        }
    }
}

/// The modules the floor measures.
pub struct Modules {
    /// As built by default.
    pub echo: &'static str,
    /// Linked with a 2 MiB initial memory.
    pub sized: &'static str,
    /// Built without std: no WASI imports.
    pub lean: &'static str,
    /// The reference component (`bench/bare`).
    pub bare: &'static str,
}

/// Measure the echo handler on a blocking thread with a single-threaded runtime of its
/// own, so no other task shares it (and none of the caller's workers waits).
pub async fn measure(dir: &Path, modules: Modules) -> anyhow::Result<Floor> {
    let per_event = echo_manifest(dir, modules.echo, "per-event", None, "")?;
    let reuse = echo_manifest(dir, modules.echo, "reuse", None, "")?;
    let sized = echo_manifest(dir, modules.sized, "per-event", None, "")?;
    let lean = echo_manifest(dir, modules.lean, "per-event", None, "")?;
    let bare = Path::new(modules.bare);
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let handlers = Handlers {
                fresh: handler(spec(&per_event)?)?,
                warm: handler(spec(&reuse)?)?,
                growing: handler(spec(&per_event)?)?,
                sized_scratch: handler(spec(&sized)?)?,
                sized: handler(spec(&sized)?)?,
                lean: handler(spec(&lean)?)?,
            };
            check_growth(&handlers.growing, true).await?;
            check_growth(&handlers.sized_scratch, false).await?;
            check_no_wasi(&handlers.fresh, &handlers.lean)?;
            let warm_sync = sync::pre(&handlers.warm)?;
            let bare = Bare::load(bare)?;
            let mut rounds = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                rounds.push(round(&handlers, &warm_sync, &bare).await?);
            }
            let middle = |figure: fn(&Floor) -> f64| median(rounds.iter().map(figure).collect());
            let fresh = |figure: fn(&Floor) -> Fresh| Fresh::middle(rounds.iter().map(figure));
            Ok(Floor {
                fresh: fresh(|f| f.fresh),
                fresh_growing: fresh(|f| f.fresh_growing),
                fresh_sized_scratch: fresh(|f| f.fresh_sized_scratch),
                fresh_sized: fresh(|f| f.fresh_sized),
                fresh_after_growing: fresh(|f| f.fresh_after_growing),
                fresh_sized_after_scratch: fresh(|f| f.fresh_sized_after_scratch),
                fresh_lean: fresh(|f| f.fresh_lean),
                warm_call: middle(|f| f.warm_call),
                warm_quiet: middle(|f| f.warm_quiet),
                warm_quiet_sync: middle(|f| f.warm_quiet_sync),
                dispatch_fresh: middle(|f| f.dispatch_fresh),
                dispatch_warm: middle(|f| f.dispatch_warm),
                reference: Reference::middle(&rounds),
                warm_call_allocations: middle(|f| f.warm_call_allocations),
                dispatch_fresh_allocations: middle(|f| f.dispatch_fresh_allocations),
                dispatch_warm_allocations: middle(|f| f.dispatch_warm_allocations),
            })
        })
    })
    .await?
}

/// The handler `manifest` has.
fn spec(manifest: &wasmev::Manifest) -> anyhow::Result<&HandlerSpec> {
    manifest.handlers.first().context("no handler")
}

/// The handler, compiled (no artifact cache: compiling is not measured), on an embedded
/// broker of its own.
fn handler(spec: &HandlerSpec) -> anyhow::Result<Arc<Handler>> {
    let compiled = Compiler::new(wasmev::engine::Engines::new(), None).compile(spec)?;
    let metrics = wasmev::metrics::Metrics::new();
    Ok(Handler::new(
        compiled,
        Broker::Memory(MemoryBroker::new()),
        metrics.handler(&spec.name),
    ))
}

/// The echo handler loaded five times, each on an engine (and instance pool) of its own:
/// a pool slot keeps the pages an event wrote resident (up to 1 MiB) and resets them after
/// every later event in it, so a pool's figures depend on the events it ran before. The
/// plain event runs after the scratch event in the scratch pools on purpose.
struct Handlers {
    /// `per-event`, for the plain event.
    fresh: Arc<Handler>,
    /// `reuse`, for the plain and the quiet event.
    warm: Arc<Handler>,
    /// `per-event`, for the scratch event and then the plain one.
    growing: Arc<Handler>,
    /// `per-event` from the build with a 2 MiB initial memory, for the scratch event and
    /// then the plain one.
    sized_scratch: Arc<Handler>,
    /// The same build, for the plain event.
    sized: Arc<Handler>,
    /// `per-event` from the build without std, for the plain event.
    lean: Arc<Handler>,
}

/// The scratch event must grow the default build's memory and not the 2 MiB build's, or
/// the rows that compare them measure something else (an echo built before
/// `bench.scratch`, or a toolchain whose default initial memory already has the room).
/// Checked by running it once on `loaded`'s module with `memory` limited to the module's
/// initial memory: only an event that grows it is refused.
async fn check_growth(loaded: &Handler, grows: bool) -> anyhow::Result<()> {
    let pages = loaded
        .pre
        .instance_pre()
        .component()
        .resources_required()
        .and_then(|r| r.max_initial_memory_size)
        .context("the echo handler has no linear memory")?;
    let limited = handler(&HandlerSpec {
        memory: pages * WASM_PAGE,
        ..loaded.spec.clone()
    })?;
    let mut store = store(&limited);
    let instance = limited.pre.instantiate_async(&mut store).await?;
    let event = event(SCRATCH);
    let answer = instance
        .call_handle(&mut store, event.record(&mut Vec::new()))
        .await;
    // The limiter refused the growth (the guest then traps): what the host reports as a
    // memory overrun.
    let grew = store.data().memory_denied;
    if grew != grows {
        anyhow::bail!(growth_mismatch(&loaded.spec.module, pages, grows));
    }
    if !grew {
        answered(answer?)?;
    }
    Ok(())
}

/// Why the floor cannot run when the event on [`SCRATCH`] was to outgrow (`grows`) or fit
/// in the `pages` of `module`'s initial memory, and did the other.
fn growth_mismatch(module: &Path, pages: u64, grows: bool) -> String {
    format!(
        "the floor needs an event on {SCRATCH} to {} the initial memory of {} ({pages} \
         pages), and it {}: rebuild the echo handlers with ./scripts/bench",
        if grows { "outgrow" } else { "fit in" },
        module.display(),
        if grows { "did not grow it" } else { "grew it" },
    )
}

/// The lean row compares the same echo with and without WASI imports: the std build must
/// import some, and the lean build nothing but wasmev's own interfaces, or the row prices
/// something else (a lean build that picked up a std dependency, or a toolchain whose std
/// stopped importing them).
fn check_no_wasi(std_build: &Handler, lean: &Handler) -> anyhow::Result<()> {
    let foreign = |handler: &Handler| -> Vec<String> {
        let component = handler.pre.instance_pre().component();
        let engine = handler.pre.engine();
        component
            .component_type()
            .imports(engine)
            .map(|(name, _)| name.to_string())
            .filter(|name| !name.starts_with("wasmev:"))
            .collect()
    };
    let (std_imports, lean_imports) = (foreign(std_build), foreign(lean));
    match lean_row_problem(
        (&std_build.spec.module, &std_imports),
        (&lean.spec.module, &lean_imports),
    ) {
        Some(problem) => anyhow::bail!(problem),
        None => Ok(()),
    }
}

/// What is wrong with the lean row's two builds, each a module and the interfaces it
/// imports besides wasmev's; `None` when the std build imports some and the lean none.
fn lean_row_problem(
    (std_module, std_imports): (&Path, &[String]),
    (lean_module, lean_imports): (&Path, &[String]),
) -> Option<String> {
    if std_imports.is_empty() {
        return Some(format!(
            "the floor's lean row needs the std echo ({}) to import WASI interfaces, and it \
             imports none: the row would compare two equal builds",
            std_module.display()
        ));
    }
    if !lean_imports.is_empty() {
        return Some(format!(
            "the echo built without std ({}) imports {}: it should import wasmev's \
             interfaces only; rebuild it with ./scripts/bench",
            lean_module.display(),
            lean_imports.join(", ")
        ));
    }
    None
}

/// Bytes in a wasm page.
const WASM_PAGE: u64 = 64 << 10;

/// One round: every figure once, in turn, so a slow spell on the machine falls on all of
/// them rather than on one figure's rounds.
async fn round(
    handlers: &Handlers,
    warm_sync: &sync::HandlerPre<State>,
    bare: &Bare,
) -> anyhow::Result<Floor> {
    let Handlers {
        fresh,
        warm,
        growing,
        sized_scratch,
        sized,
        lean,
    } = handlers;
    // These three give an allocation count beside their time, so they are taken first,
    // before the fresh-instance figures (until the counts came, they ran after them). The
    // order decides only which figure runs right after which; the 256 KiB events still
    // run before the plain events measured in their pools, below.
    let (warm_call, warm_call_allocations) = wasmtime_warm(warm, IN).await?;
    let (dispatch_fresh, dispatch_fresh_allocations) = dispatched(fresh, FRESH_EVENTS).await?;
    let (dispatch_warm, dispatch_warm_allocations) = dispatched(warm, WARM_EVENTS).await?;
    Ok(Floor {
        fresh: wasmtime_fresh(fresh, IN).await?,
        fresh_growing: wasmtime_fresh(growing, SCRATCH).await?,
        fresh_after_growing: wasmtime_fresh(growing, IN).await?,
        fresh_sized_scratch: wasmtime_fresh(sized_scratch, SCRATCH).await?,
        fresh_sized_after_scratch: wasmtime_fresh(sized_scratch, IN).await?,
        fresh_sized: wasmtime_fresh(sized, IN).await?,
        fresh_lean: wasmtime_fresh(lean, IN).await?,
        warm_call,
        warm_quiet: wasmtime_warm(warm, QUIET).await?.0,
        warm_quiet_sync: sync::quiet(warm, warm_sync)?,
        dispatch_fresh,
        dispatch_warm,
        reference: reference(bare).await?,
        warm_call_allocations,
        dispatch_fresh_allocations,
        dispatch_warm_allocations,
    })
}

/// The subject the echo handler republishes from.
const IN: &str = "bench.in";
/// The subject it answers without publishing (`bench/echo`).
const QUIET: &str = "bench.quiet";
/// The subject it fills 256 KiB of heap for before it republishes (`bench/echo`).
const SCRATCH: &str = "bench.scratch";

/// The bench's event, as dispatch would build it from a message on `subject`.
fn event(subject: &str) -> Event {
    let message = Message {
        subject: subject.into(),
        reply: None,
        headers: Vec::new(),
        payload: bytes::Bytes::from(vec![b'x'; PAYLOAD]),
    };
    event_for(message, 1, || "bench".into())
}

/// A store as dispatch makes one (state, memory limiter), with a deadline that cannot
/// pass: no epoch ticker runs here.
fn store(handler: &Arc<Handler>) -> wasmtime::Store<State> {
    let far = Instant::now() + Duration::from_secs(3600);
    let mut store = wasmtime::Store::new(
        handler.pre.engine(),
        State::new(handler.core().clone(), IN, Delivery::default(), far),
    );
    store.limiter(|state| state);
    store.set_epoch_deadline(1 << 40);
    store
}

/// One round of fresh instances for events on `subject`: µs per event in each phase.
async fn wasmtime_fresh(handler: &Arc<Handler>, subject: &str) -> anyhow::Result<Fresh> {
    let mut spent = [Duration::ZERO; 4];
    let mut allocated = 0;
    for _ in 0..FRESH_EVENTS {
        let event = event(subject);
        let a0 = allocations();
        let t0 = Instant::now();
        let mut store = store(handler);
        let t1 = Instant::now();
        let instance = handler.pre.instantiate_async(&mut store).await?;
        let t2 = Instant::now();
        answered(
            instance
                .call_handle(&mut store, event.record(&mut Vec::new()))
                .await?,
        )?;
        let t3 = Instant::now();
        drop((instance, store));
        let t4 = Instant::now();
        allocated += allocations() - a0;
        for (phase, (from, to)) in spent
            .iter_mut()
            .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])
        {
            *phase += to - from;
        }
    }
    let [store, instantiate, call, drop] = spent.map(|d| per_event(d, FRESH_EVENTS));
    Ok(Fresh {
        store,
        instantiate,
        call,
        drop,
        allocations: per_event_count(allocated, FRESH_EVENTS),
    })
}

/// One round of calls on one instance, for events on `subject`: µs and heap allocations
/// per call.
async fn wasmtime_warm(handler: &Arc<Handler>, subject: &str) -> anyhow::Result<(f64, f64)> {
    let published = || handler.metrics.publish(PublishResult::ok).get();
    let published_before = published();
    let mut store = store(handler);
    let instance = handler.pre.instantiate_async(&mut store).await?;
    let mut spans = Spans::default();
    let far = Instant::now() + Duration::from_secs(3600);
    for _ in 0..WARM_EVENTS {
        let event = event(subject);
        // As dispatch readies a warm store: a fresh publish quota for each event.
        store
            .data_mut()
            .begin(&event.subject, Delivery::default(), far);
        let mut pairs = Vec::new();
        let call = instance.call_handle(&mut store, event.record(&mut pairs));
        answered(spans.measure(call).await?)?;
    }
    // Each event on `IN` publishes once, none on `QUIET`; otherwise the split between
    // the call and its publish measured something else (an echo built before `QUIET`).
    let expected = if subject == QUIET { 0 } else { WARM_EVENTS };
    let made = published() - published_before;
    if made != u64::from(expected) {
        anyhow::bail!("{WARM_EVENTS} events on {subject} published {made} times, not {expected}");
    }
    Ok(spans.per_event(WARM_EVENTS))
}

/// The quiet call without a fiber. wasmtime 48 makes every call on a store async (a
/// fiber per call) as soon as one import is async, and wasmev's publisher imports are:
/// a publish can wait for the broker's buffer, a request for its reply. This linker's
/// imports are synchronous and trap if called, so a quiet event, which calls none,
/// is the only one it can run; a call that did reach an import fails the round.
mod sync {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use ::wasmev::handler::Handler as Loaded;
    use ::wasmev::publish::Delivery;
    use ::wasmev::sandbox::State;
    use wasmtime::component::{HasSelf, Linker};

    use super::{QUIET, WARM_EVENTS, answered, event, per_event, store};

    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: trappable },
        ownership: Borrowing { duplicate_if_necessary: false },
    });

    use self::wasmev::events::{config, log, publisher, types};

    fn refused<T>() -> wasmtime::Result<T> {
        Err(wasmtime::format_err!(
            "the floor's synchronous linker serves no imports; only a quiet event runs on it"
        ))
    }

    /// The handler's component behind the synchronous linker.
    pub fn pre(handler: &Arc<Loaded>) -> anyhow::Result<HandlerPre<State>> {
        let component = handler.pre.instance_pre().component();
        let mut linker = Linker::<State>::new(handler.pre.engine());
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        Ok(HandlerPre::new(linker.instantiate_pre(component)?)?)
    }

    /// One round of quiet events on one instance, called synchronously: µs per call.
    pub fn quiet(handler: &Arc<Loaded>, pre: &HandlerPre<State>) -> anyhow::Result<f64> {
        let mut store = store(handler);
        let instance = pre.instantiate(&mut store)?;
        let mut spent = Duration::ZERO;
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..WARM_EVENTS {
            let event = event(QUIET);
            store
                .data_mut()
                .begin(&event.subject, Delivery::default(), far);
            let record = types::Event {
                id: event.id.as_str(),
                subject: &event.subject,
                payload: &event.payload,
                headers: &[],
                reply_to: None,
                attempt: event.attempt,
            };
            let started = Instant::now();
            answered(instance.call_handle(&mut store, record)?)?;
            spent += started.elapsed();
        }
        Ok(per_event(spent, WARM_EVENTS))
    }

    impl types::Host for State {}

    impl log::Host for State {
        fn log(&mut self, _: types::Level, _: String) -> wasmtime::Result<()> {
            refused()
        }
    }

    impl config::Host for State {
        fn get(&mut self, _: String) -> wasmtime::Result<Option<String>> {
            refused()
        }
    }

    impl publisher::Host for State {
        fn publish(
            &mut self,
            _: String,
            _: Vec<u8>,
            _: Vec<(String, String)>,
        ) -> wasmtime::Result<Result<(), types::PublishError>> {
            refused()
        }

        fn reply(
            &mut self,
            _: Vec<u8>,
            _: Vec<(String, String)>,
        ) -> wasmtime::Result<Result<(), types::PublishError>> {
            refused()
        }

        fn request(
            &mut self,
            _: String,
            _: Vec<u8>,
            _: Vec<(String, String)>,
            _: u32,
        ) -> wasmtime::Result<Result<types::Response, types::RequestError>> {
            refused()
        }
    }
}

/// One round of each of the reference component's figures.
async fn reference(bare: &Bare) -> anyhow::Result<Reference> {
    Ok(Reference {
        warm: reference_warm(bare, Call::Async).await?,
        warm_sync: reference_warm(bare, Call::Sync).await?,
        fresh: reference_fresh(bare, Call::Async).await?,
        fresh_sync: reference_fresh(bare, Call::Sync).await?,
    })
}

/// µs per call on one instance of the reference component.
async fn reference_warm(bare: &Bare, how: Call) -> anyhow::Result<f64> {
    let payload = vec![b'x'; PAYLOAD];
    let mut warm = bare.instance(how).await?;
    let started = Instant::now();
    for _ in 0..WARM_EVENTS {
        warm.call(&payload, how).await?;
    }
    Ok(per_event(started.elapsed(), WARM_EVENTS))
}

/// µs per event with a fresh instance of it each: store, instantiate, call, drop.
async fn reference_fresh(bare: &Bare, how: Call) -> anyhow::Result<f64> {
    let payload = vec![b'x'; PAYLOAD];
    let started = Instant::now();
    for _ in 0..FRESH_EVENTS {
        bare.call_fresh(&payload, how).await?;
    }
    Ok(per_event(started.elapsed(), FRESH_EVENTS))
}

/// One round of `events` through wasmev's dispatch: µs and heap allocations per event.
async fn dispatched(handler: &Arc<Handler>, events: u32) -> anyhow::Result<(f64, f64)> {
    let mut spans = Spans::default();
    for _ in 0..events {
        let event = event(IN);
        let (outcome, _) = spans
            .measure(dispatch(handler, event, Delivery::default()))
            .await;
        if let Outcome::Failed { detail, .. } = outcome {
            anyhow::bail!("the echo handler failed: {detail}");
        }
    }
    Ok(spans.per_event(events))
}

/// The time and heap allocations of a round's spans on this thread, added up. The span
/// is a future made before it starts (making one neither allocates nor runs anything).
#[derive(Default)]
struct Spans {
    spent: Duration,
    allocated: u64,
}

impl Spans {
    async fn measure<T>(&mut self, span: impl Future<Output = T>) -> T {
        let counted = allocations();
        let started = Instant::now();
        let out = span.await;
        self.spent += started.elapsed();
        self.allocated += allocations() - counted;
        out
    }

    /// µs and heap allocations per event, for a round of `events` spans.
    fn per_event(&self, events: u32) -> (f64, f64) {
        (
            per_event(self.spent, events),
            per_event_count(self.allocated, events),
        )
    }
}

/// The guest's answer must be ok, or the figure measured something else.
fn answered<E: std::fmt::Debug>(answer: Result<(), E>) -> anyhow::Result<()> {
    answer.map_err(|e| anyhow::anyhow!("the echo handler answered {e:?}"))
}

fn per_event(spent: Duration, events: u32) -> f64 {
    us_per_event(spent, f64::from(events))
}

/// Mean heap allocations per event.
fn per_event_count(allocated: u64, events: u32) -> f64 {
    allocated as f64 / f64::from(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lean_rows_checks_name_the_build_and_its_imports() {
        let (std_echo, lean) = (Path::new("echo.wasm"), Path::new("echo_lean.wasm"));
        let wasi = [
            "wasi:cli/stderr@0.2.6".to_string(),
            "wasi:cli/exit@0.2.6".into(),
        ];
        assert_eq!(lean_row_problem((std_echo, &wasi), (lean, &[])), None);
        insta::assert_snapshot!(
            lean_row_problem((std_echo, &[]), (lean, &[])).unwrap(),
            @"the floor's lean row needs the std echo (echo.wasm) to import WASI interfaces, and it imports none: the row would compare two equal builds"
        );
        insta::assert_snapshot!(
            lean_row_problem((std_echo, &wasi), (lean, &wasi)).unwrap(),
            @"the echo built without std (echo_lean.wasm) imports wasi:cli/stderr@0.2.6, wasi:cli/exit@0.2.6: it should import wasmev's interfaces only; rebuild it with ./scripts/bench"
        );
    }

    #[test]
    fn a_growth_mismatch_says_which_way_and_what_to_rebuild() {
        let echo = Path::new("target/wasm32-wasip2/release/bench_echo.wasm");
        insta::assert_snapshot!(growth_mismatch(echo, 17, true), @"the floor needs an event on bench.scratch to outgrow the initial memory of target/wasm32-wasip2/release/bench_echo.wasm (17 pages), and it did not grow it: rebuild the echo handlers with ./scripts/bench");
        insta::assert_snapshot!(growth_mismatch(echo, 32, false), @"the floor needs an event on bench.scratch to fit in the initial memory of target/wasm32-wasip2/release/bench_echo.wasm (32 pages), and it grew it: rebuild the echo handlers with ./scripts/bench");
    }
}
