//! A host on a NATS server with authorization, run as `wasmev run` with its user and
//! password in the environment. The README's "NATS permissions" block, filled in, is all
//! a host needs: a JetStream handler and a core one go down every path they have, and the
//! server logs no refusal; the same on a leaf node, with the host's own inbox prefix and
//! the hub's JetStream domain written in; the same in an account that imports another
//! account's JetStream under a prefix of its own. A permission left out stops the start with the
//! subject the server refused; one refused while the host runs is logged and counted, a
//! reload it stops says so, and it is not held against a reload once allowed again.

mod common;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use common::js::*;
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// The README's permissions block, filled in for [`write_manifest`]'s handlers (and the
/// ones tests add on `core.*`).
fn readme_permissions() -> String {
    readme_permissions_for(&Prefixes::DEFAULT)
}

/// The inbox and JetStream API prefixes of a host's connection: what `broker_keys` set in
/// its manifest.
struct Prefixes {
    broker_keys: &'static str,
    inbox: &'static str,
    jetstream_api: &'static str,
}

impl Prefixes {
    const DEFAULT: Self = Self {
        broker_keys: "",
        inbox: "_INBOX",
        jetstream_api: "$JS.API",
    };
}

/// [`readme_permissions`] for a host connecting with `prefixes`, as the README says to
/// write them: each in place of its default.
fn readme_permissions_for(prefixes: &Prefixes) -> String {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let section = readme
        .split("### NATS permissions")
        .nth(1)
        .expect("the README has a \"NATS permissions\" section");
    let block = section
        .split("```conf\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a conf block");
    let mut filled = String::new();
    for line in block.lines() {
        let values: &[&str] = if line.contains("<publish>") {
            &["chaos.>"]
        } else if line.contains("<subscribe>") {
            &["core.>"]
        } else if line.contains("<dead_letter>") {
            &["wasmev.dlq.chaos", "wasmev.dlq.core"]
        } else {
            &[""]
        };
        for value in values {
            let line = line
                .replace("<publish>", value)
                .replace("<subscribe>", value)
                .replace("<dead_letter>", value)
                .replace("<stream>", "EVENTS")
                .replace("<durable>", "chaos")
                .replace("\"_INBOX.", &format!("\"{}.", prefixes.inbox))
                .replace("\"$JS.API.", &format!("\"{}.", prefixes.jetstream_api));
            filled.push_str(&line);
            filled.push('\n');
        }
    }
    assert!(!filled.contains('<'), "a placeholder left:\n{filled}");
    filled
}

/// A server whose user `host` has `permissions`, and whose user `admin` may do anything.
fn server(permissions: &str) -> NatsServer {
    NatsServer::start_with_config(&users(permissions))
}

/// The server configuration of [`server`].
fn users(permissions: &str) -> String {
    format!(
        "authorization {{ users = [\n\
           {{ user: admin, password: admin }}\n\
           {{ user: host, password: host, {permissions} }}\n\
         ] }}\n"
    )
}

async fn admin(server: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let connect =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin".into())
            .connect(server.url());
    let client = within("connect as admin", WAIT, connect).await.unwrap();
    let js = jetstream::new(client.clone());
    (client, js)
}

/// A JetStream handler on EVENTS and a core one on `core.in`, both the chaos fixture;
/// the admin endpoint on `admin`, if given.
fn write_manifest(dir: &Path, server: &NatsServer, admin: Option<u16>) {
    write_manifest_with(dir, server, admin, "");
}

/// [`write_manifest`]'s manifest, with `broker_keys` in its `[broker]`.
fn write_manifest_with(dir: &Path, server: &NatsServer, admin: Option<u16>, broker_keys: &str) {
    let admin = admin
        .map(|port| format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n"))
        .unwrap_or_default();
    let toml = format!(
        "version = 1\n{admin}[broker]\nurl = {:?}\nuser_env = \"WASMEV_TEST_NATS_USER\"\n\
         password_env = \"WASMEV_TEST_NATS_PASSWORD\"\n{broker_keys}",
        server.url()
    ) + &handler_block(
        "chaos",
        "chaos",
        "subscribe = [\"js.in\"]\npublish = [\"chaos.>\"]\n\
         [handler.jetstream]\nstream = \"EVENTS\"\nmax_deliver = 2\nack_wait = \"1s\"",
    ) + &handler_block(
        "core",
        "chaos",
        "subscribe = [\"core.in\"]\npublish = [\"chaos.>\"]",
    );
    std::fs::write(dir.join("runtime.toml"), toml).unwrap();
}

/// `wasmev run` in `dir` as user `host` (its password in the environment).
fn run_host(dir: &Path) -> LoggedHost {
    LoggedHost::run(
        dir,
        &[
            ("WASMEV_TEST_NATS_USER", "host"),
            ("WASMEV_TEST_NATS_PASSWORD", "host"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_permissions_the_readme_lists_are_all_a_host_needs() {
    let server = server(&readme_permissions());
    runs_every_path_refused_nothing(&server, &server, &Prefixes::DEFAULT).await;
}

/// A host at the edge: connected to a leaf node, with JetStream on the hub the leaf
/// connects to (`jetstream_domain`) and an inbox prefix of its own, its user needs no
/// permission on `_INBOX.>` (where it could read other users' replies) or `$JS.API.>`:
/// the README's block with those prefixes written in is all it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_a_leaf_node_with_its_own_inbox_prefix_needs_only_those() {
    let prefixes = Prefixes {
        broker_keys: "inbox_prefix = \"_INBOX_wasmev\"\njetstream_domain = \"hub\"\n",
        inbox: "_INBOX_wasmev",
        jetstream_api: "$JS.hub.API",
    };
    let permissions = readme_permissions_for(&prefixes);
    assert!(!permissions.contains("\"_INBOX.") && !permissions.contains("\"$JS.API."));
    let hub = NatsServer::start_in_domain(
        "authorization { users = [ { user: admin, password: admin } ] }\n\
         leafnodes { port: -1 }\n",
        "hub",
    );
    let remote = hub.leafnode_url().replace("://", "://admin:admin@");
    let leaf = NatsServer::start_in_domain(
        &format!(
            "{}leafnodes {{ remotes = [ {{ url: {remote:?} }} ] }}\n",
            users(&permissions)
        ),
        "leaf",
    );
    wait_for("the leaf node to connect", WAIT, || async {
        hub.log()
            .contains("Leafnode connection created")
            .then_some(())
    })
    .await;
    runs_every_path_refused_nothing(&leaf, &hub, &prefixes).await;
}

/// The prefixes of a host whose account imports another account's JetStream API
/// (`jetstream_api_prefix`), as [`cross_account`] sets it up.
const IMPORTED_API: Prefixes = Prefixes {
    broker_keys: "jetstream_api_prefix = \"JS.events.API\"\n",
    inbox: "_INBOX",
    jetstream_api: "JS.events.API",
};

/// A server with two accounts: EVENTS has JetStream and user `admin`, and exports its
/// JetStream API, the acks, the subjects the handlers publish to streams (`chaos.>`, the
/// dead letters) and the core events; APP has no JetStream of its own and user `host`
/// with `permissions`, and imports all that, the API under `JS.events.API`.
fn cross_account(permissions: &str) -> NatsServer {
    cross_account_importing(permissions, true)
}

/// [`cross_account`], with APP importing the JetStream API only if `api`.
fn cross_account_importing(permissions: &str, api: bool) -> NatsServer {
    let api_import = if api {
        format!(
            "{{ service: {{ account: EVENTS, subject: \"$JS.API.>\" }}, to: \"{}.>\" }}",
            IMPORTED_API.jetstream_api
        )
    } else {
        String::new()
    };
    NatsServer::start_with_config(&format!(
        "accounts {{\n\
           EVENTS {{\n\
             jetstream: enabled\n\
             users = [ {{ user: admin, password: admin }} ]\n\
             exports = [\n\
               {{ service: \"$JS.API.>\", response: stream }}\n\
               {{ service: \"$JS.ACK.>\" }}\n\
               {{ service: \"chaos.>\" }}\n\
               {{ service: \"wasmev.dlq.>\" }}\n\
               {{ stream: \"core.>\" }}\n\
             ]\n\
           }}\n\
           APP {{\n\
             users = [ {{ user: host, password: host, {permissions} }} ]\n\
             imports = [\n\
               {api_import}\n\
               {{ service: {{ account: EVENTS, subject: \"$JS.ACK.>\" }} }}\n\
               {{ service: {{ account: EVENTS, subject: \"chaos.>\" }} }}\n\
               {{ service: {{ account: EVENTS, subject: \"wasmev.dlq.>\" }} }}\n\
               {{ stream: {{ account: EVENTS, subject: \"core.>\" }} }}\n\
             ]\n\
           }}\n\
         }}\n",
    ))
}

/// A host whose account reads JetStream in another account, through the API that account
/// exports and its own imports under a prefix of its choosing (`jetstream_api_prefix`):
/// the README's block with that prefix written in is all its user needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_reading_jetstream_in_another_account_needs_only_the_prefix_it_imports() {
    let permissions = readme_permissions_for(&IMPORTED_API);
    assert!(!permissions.contains("\"$JS.API."));
    let server = cross_account(&permissions);
    runs_every_path_refused_nothing(&server, &server, &IMPORTED_API).await;
}

/// There, a refusal names the imported subject the host used, which is the one the
/// server checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_imported_api_a_refusal_names_the_subject_the_host_used() {
    let permissions: String = readme_permissions_for(&IMPORTED_API)
        .lines()
        .filter(|l| !l.contains("CONSUMER.CREATE.WASMEV_GIVEN_UP"))
        .map(|l| format!("{l}\n"))
        .collect();
    start_fails_on(
        cross_account(&permissions),
        IMPORTED_API.broker_keys,
        "error: handler \"chaos\": failed to get or create consumer \"wasmev\" on stream \
         \"WASMEV_GIVEN_UP_EVENTS_chaos\": the nats server refused this host's user \
         permission to publish to \"JS.events.API.CONSUMER.CREATE.WASMEV_GIVEN_UP_EVENTS_chaos.wasmev\"",
    )
    .await;
}

/// Where the host's account has no JetStream of its own, the start fails saying so, and
/// what to set; where it asks under a prefix its account does not import, the same.
/// Both used to read "stream not found: create it".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_jetstream_or_its_import_is_named_not_a_missing_stream() {
    start_fails_on(
        cross_account(&readme_permissions()),
        "",
        ": jetstream error: JetStream not enabled for account (code 503, error code 10039); \
         enable JetStream for the host's account, or set jetstream_api_prefix to where the \
         account imports another account's",
    )
    .await;
    start_fails_on(
        cross_account_importing(&readme_permissions_for(&IMPORTED_API), false),
        IMPORTED_API.broker_keys,
        ": nothing answers the JetStream API at \"JS.events.API.>\" (no responders); does the \
         host's account import another account's JetStream API under \"JS.events.API\" \
         (jetstream_api_prefix)?",
    )
    .await;
}

/// A host on `server`, connecting with `prefixes`, goes down every path a JetStream
/// handler and a core one have, and the server refuses it nothing. The streams are made
/// and the events published on `admin_server` (`server` itself, or the hub it is a leaf
/// node of).
async fn runs_every_path_refused_nothing(
    server: &NatsServer,
    admin_server: &NatsServer,
    prefixes: &Prefixes,
) {
    let (client, js) = admin(admin_server).await;
    create_stream(&js, "EVENTS", &["js.in"]).await;
    create_stream(&js, "SEEN", &["chaos.seen"]).await;
    create_stream(&js, "DLQ", &["wasmev.dlq.>"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_manifest_with(dir.path(), server, None, prefixes.broker_keys);

    // A first host creates the consumers and the advisories' stream, then stops.
    let mut host = run_host(dir.path());
    host.ready(dir.path()).await;
    let advisories = js.get_stream(GIVEN_UP).await.unwrap();
    advisories.consumer_info("wasmev").await.unwrap();
    assert_eq!(host.exit(true), Some(0), "{}", logged(dir.path()));

    // A message given up while no host runs: the next host reads its advisory, reads the
    // message back and dead-letters it. Once the stopped host's pull is gone: through a
    // leaf node, the hub hears late that nobody reads its inbox any more, and would
    // deliver the message there.
    let consumer = chaos_consumer(&js).await;
    wait_for("no pull waiting", WAIT, || async {
        (consumer.clone().info().await.ok()?.num_waiting == 0).then_some(())
    })
    .await;
    publish_ops(&js, [("lost".to_string(), json!({"op": "record"}))]).await;
    given_up_unsettled(&js, WAIT).await;

    let mut host = run_host(dir.path());
    host.ready(dir.path()).await;
    // Handled and acked, publishing to a stream (the stream lookup, its ack); rejected
    // and dead-lettered; a core event, on a subscription the round trip confirmed.
    publish_ops(
        &js,
        [
            ("kept".to_string(), json!({"op": "record"})),
            (
                "bad".to_string(),
                json!({"op": "reject", "reason": "not today"}),
            ),
        ],
    )
    .await;
    client
        .publish("core.in", json!({"op": "record"}).to_string().into())
        .await
        .unwrap();
    wait_for("both records", WAIT, || async {
        (count(&js, "SEEN").await == 2).then_some(())
    })
    .await;
    wait_for("both dead letters", WAIT, || async {
        (count(&js, "DLQ").await == 2).then_some(())
    })
    .await;
    wait_for("every event settled", WAIT, || async {
        let info = consumer.clone().info().await.ok()?.clone();
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
    assert_eq!(count(&js, GIVEN_UP).await, 0, "the advisory was acked");
    assert_eq!(host.exit(true), Some(0), "{}", logged(dir.path()));

    let log = logged(dir.path());
    assert!(!log.contains("refused"), "{log}");
    let server_log = server.log();
    let refused: Vec<&str> = server_log
        .lines()
        .filter(|l| l.contains("Violation"))
        .collect();
    assert!(
        refused.is_empty(),
        "the server refused:\n{}",
        refused.join("\n")
    );
}

/// The README's permissions less the lines containing `left_out`.
fn permissions_without(left_out: &str) -> String {
    readme_permissions()
        .lines()
        .filter(|l| !l.contains(left_out))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `wasmev run` with the README's permissions less the lines containing `left_out`
/// exits by itself, failing, and its log has `error`.
async fn start_fails_without(left_out: &str, error: &str) {
    start_fails_on(server(&permissions_without(left_out)), "", error).await;
}

/// `wasmev run` on `server`, with `broker_keys` in its manifest's `[broker]`, exits by
/// itself, failing, and its log has `error`.
async fn start_fails_on(server: NatsServer, broker_keys: &str, error: &str) {
    let (_client, js) = admin(&server).await;
    create_stream(&js, "EVENTS", &["js.in"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_manifest_with(dir.path(), &server, None, broker_keys);
    let code = run_host(dir.path()).exit(false);
    let log = logged(dir.path());
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(error), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_permission_left_out_stops_the_start_naming_the_subject() {
    // Before, this waited out the request's timeout and said only "timed out".
    start_fails_without(
        "STREAM.CREATE.WASMEV_GIVEN_UP",
        "error: handler \"chaos\": failed to get or create stream \"WASMEV_GIVEN_UP_EVENTS_chaos\": \
         the nats server refused this host's user permission to publish to \
         \"$JS.API.STREAM.CREATE.WASMEV_GIVEN_UP_EVENTS_chaos\"",
    )
    .await;
}

/// A server in the JetStream domain the host asks for checks the domain's API subjects
/// as its own (`$JS.API`), and refuses those: the host still names the refusal at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_servers_own_domain_a_refusal_names_the_subject_it_checked() {
    let left_out = "STREAM.CREATE.WASMEV_GIVEN_UP";
    start_fails_on(
        NatsServer::start_in_domain(&users(&permissions_without(left_out)), "hub"),
        "jetstream_domain = \"hub\"\n",
        "error: handler \"chaos\": failed to get or create stream \"WASMEV_GIVEN_UP_EVENTS_chaos\": \
         the nats server refused this host's user permission to publish to \
         \"$JS.API.STREAM.CREATE.WASMEV_GIVEN_UP_EVENTS_chaos\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pull_stops_the_start_naming_the_subject() {
    // Before, the host said it was ready, and warned of a missed heartbeat every 2 s.
    start_fails_without(
        "CONSUMER.MSG.NEXT.EVENTS.chaos",
        "error: the nats server refused this host's user permission to publish to \
         \"$JS.API.CONSUMER.MSG.NEXT.EVENTS.chaos\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_stops_the_start_naming_the_subject() {
    // Before, the host said it was ready, and the core handler never saw an event.
    start_fails_without(
        "\"core.>\"",
        "error: the nats server refused this host's user permission to subscribe to \
         \"core.in\"",
    )
    .await;
}

/// Core NATS does not answer a publish, so a refused one cannot fail the guest's call;
/// the server's word is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_plain_publish_is_logged_and_counted() {
    // Without the handlers' `publish` grants: `chaos.seen` is refused.
    let server = server(&permissions_without("\"chaos.>\""));
    let (client, js) = admin(&server).await;
    create_stream(&js, "EVENTS", &["js.in"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_manifest(dir.path(), &server, Some(port));
    let mut host = run_host(dir.path());
    host.ready(dir.path()).await;
    let refused = || {
        let metrics = http_get(port, "/metrics").expect("the admin endpoint answers");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("wasmev_broker_refused_total "))
            .map(|v| v.parse::<u64>().unwrap())
            .expect("wasmev_broker_refused_total is exported")
    };
    assert_eq!(refused(), 0);

    client
        .publish("core.in", json!({"op": "record"}).to_string().into())
        .await
        .unwrap();
    wait_for("the refusal to be counted", WAIT, || async {
        (refused() == 1).then_some(())
    })
    .await;
    assert_eq!(host.exit(true), Some(0));
    let log = logged(dir.path());
    assert!(
        log.contains(
            "WARN wasmev::broker::nats: the nats server refused this host's user permission \
             to publish to \"chaos.seen\""
        ),
        "{log}"
    );
}

/// A reload whose new subscription the server refuses changes nothing: the handler it
/// moved to a refused subject serves on, as the version it was, on the subscription it
/// had (before, that one was already drained, and its events were lost); the handler it
/// added and the one it removed are as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_subscription_is_refused_changes_nothing() {
    let server = server(&readme_permissions());
    let (client, js) = admin(&server).await;
    create_stream(&js, "EVENTS", &["js.in"]).await;
    create_stream(&js, "SEEN", &["chaos.seen"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &server, None);
    let mut host = run_host(dir.path());
    host.ready(dir.path()).await;

    // This user may subscribe to `core.>` only: `other.in` is refused, `core.more` is not.
    // `core` would lose its grant to publish `chaos.seen` (so an event on the new version
    // would fail), and `chaos` (on JetStream) is removed.
    let manifest = dir.path().join("runtime.toml");
    let toml = std::fs::read_to_string(&manifest).unwrap();
    let (chaos, core) = (
        toml.find("[[handler]]").unwrap(),
        toml.find("[[handler]]\nname = \"core\"").unwrap(),
    );
    let toml = format!("{}{}", &toml[..chaos], &toml[core..]).replace(
        "subscribe = [\"core.in\"]\npublish = [\"chaos.>\"]",
        "subscribe = [\"other.in\"]\npublish = [\"chaos.other\"]",
    ) + &handler_block("more", "chaos", "subscribe = [\"core.more\"]");
    std::fs::write(&manifest, toml).unwrap();
    wait_for("the reload", WAIT, || async {
        logged(dir.path()).contains("reload refused").then_some(())
    })
    .await;
    let record = json!({"op": "record"}).to_string();
    within("a publish", WAIT, client.publish("core.in", record.into()))
        .await
        .unwrap();
    publish_ops(&js, [("after".to_string(), json!({"op": "record"}))]).await;
    within("a flush", WAIT, client.flush()).await.unwrap();
    wait_for(
        "both events, on the old subscription and consumer",
        WAIT,
        || async { (count(&js, "SEEN").await == 2).then_some(()) },
    )
    .await;
    assert_eq!(host.exit(true), Some(0));
    let log = logged(dir.path());
    assert!(
        log.contains(
            "reload refused, nothing changed:\nthe nats server refused this host's user \
             permission to subscribe to \"other.in\""
        ),
        "{log}"
    );
    for change in ["handler swapped", "handler added", "handler removed"] {
        assert!(!log.contains(change), "{log}");
    }
}

/// Pulls refused while a host runs (the user's permissions changed on the server) are
/// logged and counted; once allowed again, they are not held against a later reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_refused_a_while_ago_do_not_fail_a_later_reload() {
    let allowed = readme_permissions();
    let server = server(&allowed);
    let (client, js) = admin(&server).await;
    create_stream(&js, "EVENTS", &["js.in"]).await;
    create_stream(&js, "SEEN", &["chaos.seen"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), &server, None);
    let mut host = run_host(dir.path());
    host.ready(dir.path()).await;

    let pull = "CONSUMER.MSG.NEXT.EVENTS.chaos";
    server.reconfigure(&users(&permissions_without(pull)));
    wait_for("a refused pull", WAIT, || async {
        logged(dir.path())
            .contains(&format!("permission to publish to \"$JS.API.{pull}\""))
            .then_some(())
    })
    .await;
    server.reconfigure(&users(&allowed));
    wait_for("JetStream to answer after the reload", WAIT, || async {
        count_when_answered(&js, "EVENTS").await
    })
    .await;
    publish_ops(&js, [("after".to_string(), json!({"op": "record"}))]).await;
    wait_for("the pulls to work again", WAIT, || async {
        (count_when_answered(&js, "SEEN").await? == 1).then_some(())
    })
    .await;

    // A reload that subscribes: a handler added to the manifest, seen by the watcher.
    let manifest = dir.path().join("runtime.toml");
    let mut toml = std::fs::read_to_string(&manifest).unwrap();
    toml += &handler_block(
        "more",
        "chaos",
        "subscribe = [\"core.more\"]\npublish = [\"chaos.>\"]",
    );
    std::fs::write(&manifest, toml).unwrap();
    wait_for("the reload", WAIT, || async {
        let log = logged(dir.path());
        (log.contains("handler added") || log.contains("reload refused")).then_some(())
    })
    .await;
    client
        .publish("core.more", json!({"op": "record"}).to_string().into())
        .await
        .unwrap();
    wait_for("the added handler's event", WAIT, || async {
        (count_when_answered(&js, "SEEN").await? == 2).then_some(())
    })
    .await;
    assert_eq!(host.exit(true), Some(0));
    let log = logged(dir.path());
    assert!(!log.contains("reload refused"), "{log}");
}
