//! The events table: throughput and latency on NATS and the embedded broker, the floor
//! and JetStream rows, and `one` case on its own for a profiler.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use wasmev::broker::Broker;

use super::cpu;
use super::floor::{self, Floor};
use super::jetstream::{jetstream, jetstream_baseline, plain_consumer_rows, repeat};
use super::load::{
    Baseline, LATENCY_RUNS, LatencyRun, Measured, RUNS, Republish, Route, Running, SLOW_US,
    WorkersUse, baseline_row, cpu_row, echo_host, latency, latency_row, latency_run, measure,
    memory_baseline, nats_baseline, nats_route, on_one_worker, rate_row, throughput, worker_rows,
};
use super::{
    BARE, ECHO, ECHO_LEAN, ECHO_SIZED_MEMORY, ECHO_SMALL_STACK, IN_FLIGHT, LATENCY_RATE, PAYLOAD,
    Row, Server, WINDOW, median, rate, table,
};

/// JetStream runs per figure (each stores its events again, then consumes them). Why 3:
/// the median then survives one run that stalled; more would add ~10 s a run.
const JETSTREAM_RUNS: usize = 3;

/// Throughput and latency on NATS and the embedded broker, and JetStream.
pub async fn events(events: u64, latency_secs: u64) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let server = Server::start()?;
    let client = async_nats::connect(&server.url).await?;
    let nats = nats_route(&server.url).await?;
    let mut rows = Vec::new();

    // Throughput in rounds: each round starts every contender in turn and gives it one
    // run, so a slow spell of the VM (single runs here swing by ±20 % within a minute)
    // falls on all of them alike, and each ratio is the median of the rounds' own ratios.
    let rounds = in_rounds(
        dir.path(),
        On::Nats(&server.url, &nats),
        &CONTENDERS,
        RUNS,
        async |route| measure(route, events, 1, Duration::ZERO).await,
        |round, _| eprintln!("NATS throughput, round {round}/{RUNS} done"),
    )
    .await?;
    let [
        raw,
        hops,
        called,
        called_fresh,
        per_event,
        reuse,
        small,
        lean,
        raw_one,
        per_event_one,
        reuse_one,
    ] = rounds.as_slice()
    else {
        bail!("expected a list of runs per contender");
    };
    let raw_m = Measured::summary(raw);
    rows.push(baseline_row(
        "NATS: plain async-nats subscriber (baseline)",
        &raw_m,
    ));
    // Not a target's denominator: how much of the gap is the hop header wasmev stamps on
    // every guest publish (to cut feedback loops), priced on the plain subscriber.
    rows.push(round_row(
        "NATS: the same subscriber adding a `Wasmev-Hops` header to each publish",
        hops,
        raw,
        "",
    ));
    rows.extend(worker_rows(
        "NATS",
        "subscriber with the header",
        &Measured::summary(hops),
        &raw_m,
    ));
    // Nor this: the least any Wasm host with wasmev's loop guard does, a call of the least
    // component there is on a warm instance. Where `reuse` could get to at best.
    rows.push(round_row(
        "NATS: the same subscriber with the header, calling the reference component \
         (`bench/bare`: `handle(list<u8>)`, no imports) on a warm instance before each \
         publish",
        called,
        raw,
        "",
    ));
    rows.extend(worker_rows(
        "NATS",
        "subscriber with the header and the reference call",
        &Measured::summary(called),
        &raw_m,
    ));
    // And with a fresh instance of it per event: where `per-event` could get to at best.
    rows.push(round_row(
        &format!(
            "NATS: the same subscriber with the header, a fresh instance of the reference \
             component per event (store, instantiate, call, drop), each event on a task of \
             its own, at most {IN_FLIGHT} at once"
        ),
        called_fresh,
        raw,
        "",
    ));
    rows.extend(worker_rows(
        "NATS",
        "subscriber with the header and a fresh reference instance",
        &Measured::summary(called_fresh),
        &raw_m,
    ));

    // Latency in rounds as well: a run's p99 on this VM is set by whatever stalls fall in
    // it, so each wasmev run is compared with the baseline's run of the same round.
    let latency = latency_rounds(
        dir.path(),
        On::Nats(&server.url, &nats),
        &LATENCY_CONTENDERS,
        latency_secs,
    )
    .await?;
    let [raw_latency, per_event_latency, reuse_latency] = latency.as_slice() else {
        bail!("expected a list of latency runs per contender");
    };
    for (mode, runs, latency, target, lat_target) in [
        ("per-event", per_event, per_event_latency, "≥ 0.30", 250.0),
        ("reuse", reuse, reuse_latency, "≥ 0.90", 50.0),
    ] {
        rows.push(round_row(
            &format!("NATS: wasmev, instances = {mode}"),
            runs,
            raw,
            target,
        ));
        rows.extend(worker_rows("NATS", mode, &Measured::summary(runs), &raw_m));
        rows.push(latency_row(
            &format!("NATS: p50 / p99 latency at {LATENCY_RATE} ev/s, {mode}"),
            latency,
            raw_latency,
            &format!("p99 overhead ≤ {lat_target:.0} µs"),
        ));
    }

    // `--worker-threads 1`: the host on one worker, against the plain subscriber on one.
    // On this machine nats-server and the load generator share the two cores with it.
    rows.push(round_row(
        "NATS: the plain subscriber on one worker thread",
        raw_one,
        raw,
        "",
    ));
    let raw_one_m = Measured::summary(raw_one);
    for (mode, runs) in [("per-event", per_event_one), ("reuse", reuse_one)] {
        rows.push(round_row(
            &format!(
                "NATS: wasmev, instances = {mode}, one worker thread (`--worker-threads 1`), \
                 against the subscriber on one"
            ),
            runs,
            raw_one,
            "",
        ));
        rows.push(cpu_row(
            &format!("NATS: worker CPU per event, {mode}, one worker thread"),
            &Measured::summary(runs),
            &raw_one_m,
        ));
    }

    let floor = floor::measure(dir.path(), FLOOR_MODULES).await?;
    let core_per_event = Measured::summary(per_event);
    let core_reuse = Measured::summary(reuse);
    floor_rows(&mut rows, &floor, &raw_m, &core_per_event, &core_reuse);

    // What a fresh instance costs depends on the guest's memory: the same handler with a
    // 64 KiB shadow stack (2 wasm pages to reset after each event instead of 17).
    rows.push(round_row(
        "NATS: wasmev, per-event, handler linked with a 64 KiB stack",
        small,
        raw,
        "",
    ));
    rows.push(cpu_row(
        "NATS: worker CPU per event, per-event, 64 KiB stack",
        &Measured::summary(small),
        &raw_m,
    ));
    // And on its imports: the same echo built without std imports no WASI interface, so
    // a fresh instance lowers wasmev's two (publish, and log for a panic) instead of two
    // dozen.
    rows.push(round_row(
        "NATS: wasmev, per-event, the echo built without std (`bench/echo-lean`: no WASI imports)",
        lean,
        raw,
        "",
    ));
    rows.push(cpu_row(
        "NATS: worker CPU per event, per-event, built without std",
        &Measured::summary(lean),
        &raw_m,
    ));

    // The embedded broker: its own baseline (a plain task republishing), then each mode.
    let memory = wasmev::broker::memory::MemoryBroker::new();
    let mem_path = Route::Memory(memory.clone());
    let base = memory_baseline(&memory)?;
    let mem_raw = measure(&mem_path, events, RUNS, Duration::ZERO).await?;
    base.stop().await;
    rows.push(baseline_row(
        "embedded: plain task republishing (baseline)",
        &mem_raw,
    ));
    let latency =
        latency_rounds(dir.path(), On::Embedded, &LATENCY_CONTENDERS, latency_secs).await?;
    let [mem_latency, modes_latency @ ..] = latency.as_slice() else {
        bail!("expected a list of latency runs per contender");
    };
    for (mode, latency) in ["per-event", "reuse"].into_iter().zip(modes_latency) {
        let (host, broker) = echo_host(dir.path(), ECHO, mode, None, "").await?;
        let Broker::Memory(memory) = broker else {
            bail!("expected the embedded broker");
        };
        let m = measure(&Route::Memory(memory), events, RUNS, Duration::ZERO).await?;
        host.shutdown().await?;
        rows.push(rate_row(
            &format!("embedded: wasmev, {mode}"),
            &m,
            &mem_raw,
            "",
        ));
        rows.push(cpu_row(
            &format!("embedded: worker CPU per event, {mode}"),
            &m,
            &mem_raw,
        ));
        rows.push(latency_row(
            &format!("embedded: p50 / p99 latency at {LATENCY_RATE} ev/s, {mode}"),
            latency,
            mem_latency,
            "",
        ));
    }

    // JetStream in both modes, each against core in the same mode, then both against the
    // plain pull consumer.
    let mut js_runs = Vec::new();
    for (mode, core) in [("per-event", &core_per_event), ("reuse", &core_reuse)] {
        let js = repeat(&format!("JetStream, wasmev {mode}"), JETSTREAM_RUNS, || {
            jetstream(&server, &client, dir.path(), events / 2, mode)
        })
        .await?;
        rows.push(Row::new(
            &format!("JetStream: consume + ack, {mode} (stored events)"),
            rate(js.measured.median),
            format!("{} (core, {mode})", rate(core.median)),
            format!("{:.2}", js.measured.median / core.median),
            &js.stalled().unwrap_or_default(),
        ));
        rows.push(Row::new(
            &format!("JetStream: worker CPU per event, {mode}"),
            format!("{:.2} µs", js.measured.cpu_us),
            format!("{:.2} µs (core, {mode})", core.cpu_us),
            format!("{:.1}×", js.measured.cpu_us / core.cpu_us),
            "",
        ));
        js_runs.push((mode, js));
    }
    // Not a target's denominator: the JetStream ceiling on this server for the same work.
    let js_base = repeat("JetStream, plain consumer", JETSTREAM_RUNS, || {
        jetstream_baseline(&server, &client, events / 2)
    })
    .await?;
    for (mode, js) in &js_runs {
        plain_consumer_rows(&mut rows, mode, js, &js_base);
    }
    Ok(table(
        &format!(
            "## Events: throughput and latency\n\nThe echo handler (`bench/echo`: republish \
             the {PAYLOAD}-byte payload) against a baseline doing the same work without \
             Wasm, in the same run. Throughput: runs of {events} events each, at most \
             {WINDOW} unanswered, max_in_flight = {IN_FLIGHT}, publish→answer; a figure is \
             the median of {RUNS} runs. On NATS the runs are made in {RUNS} rounds, each \
             starting every subscriber in turn for one run, and a ratio is the median of \
             the rounds' own ratios, so a slow spell of the machine falls on both sides of \
             it. One worker thread: the plain subscriber and the host each on a runtime \
             of one worker thread (`wasmev run --worker-threads 1`), taking their turns in \
             the same rounds. Worker CPU per event: CPU time of the tokio worker threads \
             (the host, or the baseline subscriber; not the load generator, not \
             nats-server) over those runs, divided by the events, and the heap \
             allocations those threads made over the same runs, counted by the bench's \
             allocator; JetStream: the median of \
             {JETSTREAM_RUNS} runs of \
             {} stored events, and nats-server's CPU per event beside it. Latency: \
             {LATENCY_RATE} events/s for {latency_secs} s, publish→answer; {LATENCY_RUNS} \
             rounds, each starting the baseline and every mode in turn for one run; the \
             median p50 and the median p99 of each side's runs, an overhead the median of \
             the rounds' own differences, and beside them how busy the machine's cores \
             were over those runs on average (every process: the publisher, \
             nats-server, the subscriber; from /proc/stat). One thread, no broker I/O: \
             the echo handler compiled as the host compiles it, its publish going to an \
             embedded broker without subscribers; wasmtime alone is the store, instance and \
             call as dispatch makes them, without dispatch's bookkeeping, and the warm \
             call is split by timing an event the handler answers without publishing, \
             and that quiet call is timed again made synchronously, without the fiber an \
             async call runs on (through a linker whose imports are all synchronous); the \
             median of 5 rounds (`bench/src/perf/floor.rs`). Its heap allocations: counted \
             on the floor's thread over the same spans as the times \
             (the event is made before each span). The 256 KiB event: the echo \
             handler fills that much heap before it republishes, more than its default \
             build (17 wasm pages) has free, so that build grows its memory, and one \
             linked with a 2 MiB initial memory does not; every floor figure has an \
             instance pool of its own, except the plain events that run after the 256 KiB \
             ones on purpose. Built without std: the same echo (`bench/echo-lean`, \
             `no_std` through the SDK without its `std` feature), whose component imports \
             wasmev's interfaces and no WASI one, where the std build imports a dozen WASI \
             interfaces it never calls (std's stderr, wasi-libc's stdio and environment, \
             exit). The reference component: `bench/bare`, the least a component can be \
             (one export, `handle(list<u8>)`, taking the same payload; no imports), on an \
             engine with the host's settings, called through an empty linker on a fiber \
             as wasmev calls handlers, and again synchronously; on NATS the subscriber with \
             the header also calls it, on one warm instance, for each event before it \
             republishes, and again on a fresh instance for each event, each event on a \
             task of its own, taking their turns in the same rounds. {}.\n",
            events / 2,
            Server::version()
        ),
        &rows,
    ))
}

/// The `instances` mode of a `one` JetStream mode; `None` for the plain consumer.
fn jetstream_mode(mode: &str) -> Option<&'static str> {
    match mode {
        "jetstream" => Some("per-event"),
        "jetstream-reuse" => Some("reuse"),
        _ => None,
    }
}

/// Who answers `bench.in` on NATS in the throughput rounds, in the order they take turns.
const CONTENDERS: [Contender; 11] = [
    Contender::Plain(Republish::Plain),
    Contender::Plain(Republish::WithHops),
    Contender::Plain(Republish::WithHopsAndCall),
    Contender::Plain(Republish::WithHopsAndFreshCall),
    Contender::Host("per-event", ECHO),
    Contender::Host("reuse", ECHO),
    Contender::Host("per-event", ECHO_SMALL_STACK),
    Contender::Host("per-event", ECHO_LEAN),
    Contender::OneWorker(&Contender::Plain(Republish::Plain)),
    Contender::OneWorker(&Contender::Host("per-event", ECHO)),
    Contender::OneWorker(&Contender::Host("reuse", ECHO)),
];

/// One subscriber the NATS figures compare.
#[derive(Clone, Copy)]
enum Contender {
    /// The baseline: a plain async-nats subscriber republishing, doing what else
    /// [`Republish`] says (on the embedded broker: nothing else).
    Plain(Republish),
    /// A host running the echo handler: its `instances` mode and its module.
    Host(&'static str, &'static str),
    /// Another contender on a runtime with one worker thread (NATS only).
    OneWorker(&'static Contender),
}

/// Who answers `bench.in` in the latency rounds (NATS and embedded), in turn: the baseline
/// first, then each mode.
const LATENCY_CONTENDERS: [Contender; 3] = [
    Contender::Plain(Republish::Plain),
    Contender::Host("per-event", ECHO),
    Contender::Host("reuse", ECHO),
];

/// Where a contender answers: on the nats-server at a URL, reached through the load
/// generator's connection to it, or on an embedded broker of its own.
#[derive(Clone, Copy)]
enum On<'a> {
    Nats(&'a str, &'a Route),
    Embedded,
}

/// A contender answering `bench.in` until stopped.
enum Started {
    Plain(Baseline),
    Host(Running),
}

impl Contender {
    /// Start answering; the route the load reaches it by.
    async fn start(self, dir: &Path, on: On<'_>) -> anyhow::Result<(Started, Route)> {
        match on {
            On::Nats(url, route) => {
                let started = match self {
                    Contender::OneWorker(contender) => {
                        let (contender, dir, url) = (*contender, dir.to_owned(), url.to_owned());
                        on_one_worker(async move { contender.start_nats(&dir, &url).await }).await?
                    }
                    _ => self.start_nats(dir, url).await?,
                };
                Ok((started, route.clone()))
            }
            On::Embedded => match self {
                Contender::Plain(Republish::Plain) => {
                    let memory = wasmev::broker::memory::MemoryBroker::new();
                    Ok((
                        Started::Plain(memory_baseline(&memory)?),
                        Route::Memory(memory),
                    ))
                }
                Contender::Plain(_) | Contender::OneWorker(_) => {
                    bail!(
                        "the baselines with the hop header or a call, and the one-worker \
                         contenders, answer on NATS only"
                    )
                }
                Contender::Host(mode, module) => {
                    let (host, broker) = echo_host(dir, module, mode, None, "").await?;
                    let Broker::Memory(memory) = broker else {
                        bail!("expected the embedded broker");
                    };
                    Ok((Started::Host(host), Route::Memory(memory)))
                }
            },
        }
    }

    /// Start answering on the nats-server at `url`, on the runtime this is called on.
    async fn start_nats(self, dir: &Path, url: &str) -> anyhow::Result<Started> {
        Ok(match self {
            Contender::Plain(republish) => Started::Plain(nats_baseline(url, republish).await?),
            Contender::Host(mode, module) => {
                Started::Host(echo_host(dir, module, mode, Some(url), "").await?.0)
            }
            Contender::OneWorker(_) => bail!("a one-worker contender is started by `start`"),
        })
    }
}

impl Started {
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Started::Plain(base) => base.stop().await,
            Started::Host(host) => host.shutdown().await?,
        }
        Ok(())
    }
}

/// `rounds` rounds, each starting every contender in turn on `on` for one `run` of it:
/// the runs per contender, in round order. `report` is handed each round's number and
/// the runs so far, for the log.
async fn in_rounds<T>(
    dir: &Path,
    on: On<'_>,
    contenders: &[Contender],
    rounds: usize,
    mut run: impl AsyncFnMut(&Route) -> anyhow::Result<T>,
    report: impl Fn(usize, &[Vec<T>]),
) -> anyhow::Result<Vec<Vec<T>>> {
    let mut runs: Vec<Vec<T>> = contenders.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (contender, runs) in contenders.iter().zip(&mut runs) {
            let (started, route) = contender.start(dir, on).await?;
            runs.push(run(&route).await?);
            started.stop().await?;
        }
        report(round, &runs);
    }
    Ok(runs)
}

/// [`LATENCY_RUNS`] rounds of one latency run of `secs` per contender ([`in_rounds`]).
async fn latency_rounds(
    dir: &Path,
    on: On<'_>,
    contenders: &[Contender],
    secs: u64,
) -> anyhow::Result<Vec<Vec<LatencyRun>>> {
    let label = match on {
        On::Nats(..) => "NATS",
        On::Embedded => "embedded",
    };
    in_rounds(
        dir,
        on,
        contenders,
        LATENCY_RUNS,
        async |route| latency_run(route, secs).await,
        |round, runs| {
            // Each run's percentiles, in the contenders' order: whether an overhead holds
            // in every round or comes from one is not in the table.
            let percentiles: Vec<String> = runs
                .iter()
                .filter_map(|runs| runs.last())
                .map(|r| format!("{:.0}/{:.0}", r.latency.p50, r.latency.p99))
                .collect();
            eprintln!(
                "{label} latency, round {round}/{LATENCY_RUNS}: p50/p99 µs {}",
                percentiles.join(", ")
            );
        },
    )
    .await
}

/// The row comparing a contender's median rate with the baseline's; its ratio is the
/// median of the rounds' own ratios (each run against the baseline's run of that round).
fn round_row(what: &str, runs: &[Measured], base: &[Measured], target: &str) -> Row {
    let ratio = median(
        runs.iter()
            .zip(base)
            .map(|(m, b)| m.median / b.median)
            .collect(),
    );
    Row::new(
        what,
        rate(Measured::summary(runs).median),
        rate(Measured::summary(base).median),
        format!("{ratio:.2}"),
        target,
    )
}

/// What one event costs without broker I/O, beside what the baseline and wasmev spend per
/// event on NATS: how much of wasmev's figure is the Wasm call itself.
fn floor_rows(
    rows: &mut Vec<Row>,
    floor: &Floor,
    baseline: &Measured,
    per_event: &Measured,
    reuse: &Measured,
) {
    let us = |v: f64| format!("{v:.2} µs");
    for (mode, what, alone, alone_figure, dispatched, nats, allocations) in [
        (
            "per-event",
            "fresh instance (store + instantiate + call + drop)",
            floor.fresh.total(),
            floor.fresh.phases(),
            floor.dispatch_fresh,
            per_event,
            (floor.fresh.allocations, floor.dispatch_fresh_allocations),
        ),
        (
            "reuse",
            "a call on a warm instance",
            floor.warm_call,
            floor.warm_phases(),
            floor.dispatch_warm,
            reuse,
            (floor.warm_call_allocations, floor.dispatch_warm_allocations),
        ),
    ] {
        let row = |what: String, figure: String, base: String, ratio: String| {
            Row::new(
                &format!("one thread, no broker I/O: {what}"),
                figure,
                base,
                ratio,
                "",
            )
        };
        rows.push(row(
            format!("wasmtime alone, {what}"),
            alone_figure,
            format!("{} (baseline: all its work per event)", us(baseline.cpu_us)),
            format!("{:.1}×", alone / baseline.cpu_us),
        ));
        rows.push(row(
            format!("wasmev dispatch, {mode}"),
            us(dispatched),
            format!("{} (wasmtime alone)", us(alone)),
            format!("{:+.2} µs", dispatched - alone),
        ));
        let (alone_allocations, dispatch_allocations) = allocations;
        rows.push(row(
            format!("heap allocations per event, wasmev dispatch, {mode}"),
            format!("{dispatch_allocations:.2}"),
            format!("{alone_allocations:.2} (wasmtime alone)"),
            format!("{:+.2}", dispatch_allocations - alone_allocations),
        ));
        rows.push(row(
            format!("wasmev dispatch, {mode}, against NATS worker CPU per event"),
            us(dispatched),
            format!("{} (NATS, {mode})", us(nats.cpu_us)),
            format!("{:.0} %", 100.0 * dispatched / nats.cpu_us),
        ));
    }
    // The reference component beside the echo: what any component call costs here, and
    // how much of the echo's cost is wasmev's interface (the event record, the publish).
    let r = &floor.reference;
    for (what, figure, sync, echo) in [
        (
            "a call on a warm instance",
            r.warm,
            r.warm_sync,
            floor.warm_call,
        ),
        (
            "fresh instance (store + instantiate + call + drop)",
            r.fresh,
            r.fresh_sync,
            floor.fresh.total(),
        ),
    ] {
        rows.push(Row::new(
            &format!(
                "one thread, no broker I/O: the reference component (`bench/bare`: \
                 `handle(list<u8>)`, no imports), {what}"
            ),
            format!("{} (without a fiber {})", us(figure), us(sync)),
            format!("{} (the echo, wasmtime alone)", us(echo)),
            format!("{:.2}×", figure / echo),
            "",
        ));
    }
    // What growing memory during an event costs a fresh instance, what linking the room
    // in from the start saves it, and what either costs the events that need no heap
    // (the README's advice to `per-event` handler authors).
    let f = floor;
    for (what, figure, base, base_what, ratio) in [
        (
            "an event that fills 256 KiB of heap (the memory grows)",
            &f.fresh_growing,
            &f.fresh,
            "the plain event",
            false,
        ),
        (
            "the same event, handler linked with a 2 MiB initial memory (nothing grows)",
            &f.fresh_sized_scratch,
            &f.fresh_growing,
            "the memory grows",
            true,
        ),
        (
            "the plain event, handler linked with a 2 MiB initial memory",
            &f.fresh_sized,
            &f.fresh,
            "default initial memory",
            false,
        ),
        (
            "the plain event in a pool where 256 KiB events ran (they grew the memory)",
            &f.fresh_after_growing,
            &f.fresh,
            "a pool of its own",
            false,
        ),
        (
            "the plain event in a pool where 256 KiB events ran, 2 MiB initial memory",
            &f.fresh_sized_after_scratch,
            &f.fresh_sized,
            "a pool of its own",
            false,
        ),
        (
            "the plain event, the echo built without std (`bench/echo-lean`: no WASI imports)",
            &f.fresh_lean,
            &f.fresh,
            "built with std",
            true,
        ),
    ] {
        rows.push(Row::new(
            &format!("one thread, no broker I/O: wasmtime alone, fresh instance, {what}"),
            figure.phases(),
            format!("{} ({base_what})", us(base.total())),
            if ratio {
                format!("{:.2}×", figure.total() / base.total())
            } else {
                format!("{:+.2} µs", figure.total() - base.total())
            },
            "",
        ));
    }
}

/// The echo builds the floor measures.
const FLOOR_MODULES: floor::Modules = floor::Modules {
    echo: ECHO,
    sized: ECHO_SIZED_MEMORY,
    lean: ECHO_LEAN,
    bare: BARE,
};

/// One throughput case on its own, repeated for `secs` seconds (for a profiler to attach
/// to): `mode` is `baseline`, `per-event` or `reuse`; `embedded` picks the embedded broker.
pub async fn one(
    mode: &str,
    embedded: bool,
    events: u64,
    secs: u64,
    latency_secs: Option<u64>,
) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    if mode == "floor" {
        let f = floor::measure(dir.path(), FLOOR_MODULES).await?;
        return Ok(format!(
            "one thread, no broker I/O: wasmtime alone, fresh instance {}, warm call {}; \
             wasmev dispatch per-event {:.2} µs, reuse {:.2} µs; fresh instance, event \
             filling 256 KiB of heap {} (the plain event after it, same pool {}), with a \
             2 MiB initial memory {} (after it {}); plain event with a 2 MiB initial \
             memory {}; plain event built without std (no WASI imports) {}; the \
             reference component (`bench/bare`, no imports): warm call {:.2} µs ({:.2} \
             without a fiber), fresh instance {:.2} µs ({:.2} without a fiber); heap \
             allocations per event: fresh instance {:.2} (wasmtime alone), {:.2} \
             (dispatch), warm call {:.2} (wasmtime alone), {:.2} (dispatch)",
            f.fresh.phases(),
            f.warm_phases(),
            f.dispatch_fresh,
            f.dispatch_warm,
            f.fresh_growing.phases(),
            f.fresh_after_growing.phases(),
            f.fresh_sized_scratch.phases(),
            f.fresh_sized_after_scratch.phases(),
            f.fresh_sized.phases(),
            f.fresh_lean.phases(),
            f.reference.warm,
            f.reference.warm_sync,
            f.reference.fresh,
            f.reference.fresh_sync,
            f.fresh.allocations,
            f.dispatch_fresh_allocations,
            f.warm_call_allocations,
            f.dispatch_warm_allocations,
        ));
    }
    let server = if embedded {
        None
    } else {
        Some(Server::start()?)
    };
    let url = server.as_ref().map(|s| s.url.clone());
    let memory = wasmev::broker::memory::MemoryBroker::new();
    let (route, running, base) = match (mode, &url) {
        ("baseline" | "baseline-hops" | "baseline-call" | "baseline-call-fresh", Some(url)) => {
            let republish = match mode {
                "baseline" => Republish::Plain,
                "baseline-hops" => Republish::WithHops,
                "baseline-call" => Republish::WithHopsAndCall,
                _ => Republish::WithHopsAndFreshCall,
            };
            (
                nats_route(url).await?,
                None,
                Some(nats_baseline(url, republish).await?),
            )
        }
        ("baseline", None) => (
            Route::Memory(memory.clone()),
            None,
            Some(memory_baseline(&memory)?),
        ),
        ("per-event" | "reuse" | "per-event-lean", _) => {
            let (module, instances) = match mode {
                "per-event-lean" => (ECHO_LEAN, "per-event"),
                _ => (ECHO, mode),
            };
            let (host, broker) =
                echo_host(dir.path(), module, instances, url.as_deref(), "").await?;
            let route = match (broker, &url) {
                (Broker::Memory(m), None) => Route::Memory(m),
                (_, Some(url)) => nats_route(url).await?,
                _ => bail!("unexpected broker"),
            };
            (route, Some(host), None)
        }
        ("jetstream" | "jetstream-reuse" | "jetstream-baseline", Some(_)) => {
            let server = server.as_ref().context("no nats-server")?;
            let client = async_nats::connect(&server.url).await?;
            let (what, run) = if let Some(instances) = jetstream_mode(mode) {
                (
                    "jetstream consume+ack",
                    jetstream(server, &client, dir.path(), events, instances).await?,
                )
            } else {
                (
                    "jetstream consume+ack, plain pull consumer",
                    jetstream_baseline(server, &client, events).await?,
                )
            };
            let stalled = run.stalled().map(|s| format!("; {s}")).unwrap_or_default();
            return Ok(format!(
                "{what}: {} ({events} events); {:.2} µs worker CPU, {:.1} heap allocations \
                 on the worker threads, {:.2} µs nats-server CPU per event{stalled}",
                rate(run.measured.median),
                run.measured.cpu_us,
                run.measured.allocations,
                run.server_us
            ));
        }
        _ => bail!(
            "mode is baseline, baseline-hops, baseline-call or baseline-call-fresh (NATS \
             only), per-event, reuse, per-event-lean, jetstream, jetstream-reuse or \
             jetstream-baseline (NATS only), or floor, not {mode:?}"
        ),
    };
    let broker = if embedded {
        "the embedded broker"
    } else {
        "NATS"
    };
    let result = match latency_secs {
        Some(latency_secs) => {
            throughput(&route, events / 10).await?; // warm-up
            let used = WorkersUse::now();
            let machine = cpu::MachineCpu::now();
            let run = latency(&route, latency_secs).await?;
            let machine = cpu::MachineCpu::busy_since(machine)
                .map_or(String::new(), |busy| format!("; {busy}"));
            let (cpu, allocations) = used.per_event((LATENCY_RATE * latency_secs) as f64);
            format!(
                "{mode} on {broker}: p50 {:.0} µs, p99 {:.0} µs at {LATENCY_RATE} ev/s \
                 ({:.1} % over {SLOW_US:.0} µs, the slowest {:.0} µs); \
                 {cpu:.2} µs worker CPU and {allocations:.1} heap allocations on the worker \
                 threads per event{machine}",
                run.p50,
                run.p99,
                run.slow * 100.0,
                run.max
            )
        }
        None => {
            // Compare changes by the median and the CPU per event, not by the best run:
            // single runs swing by ±20 % on a shared machine.
            let m = measure(&route, events, 1, Duration::from_secs(secs)).await?;
            format!(
                "{mode} on {broker}: {} runs of {events} events, median {}, best {}; \
                 {:.2} µs worker CPU and {:.1} heap allocations on the worker threads per \
                 event",
                m.runs,
                rate(m.median),
                rate(m.best),
                m.cpu_us,
                m.allocations,
            )
        }
    };
    if let Some(host) = running {
        host.shutdown().await?;
    }
    if let Some(base) = base {
        base.stop().await;
    }
    Ok(result)
}
