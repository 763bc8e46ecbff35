//! What the NATS server refused this host's user, passed on to the calls that wait for it.
//!
//! A publish the user's permissions do not allow is dropped by the server, which says so
//! only on the connection: `-ERR 'Permissions Violation for Publish to "…"'`. async-nats
//! hands that to the event callback and to nobody else, so a request whose publish was
//! refused (a JetStream API call, a guest's request, the round trip that confirms
//! subscriptions) waited out its timeout and failed as "timed out": a handler's start took
//! 10 s to fail with an error that did not say why. The event callback now tells
//! [`Refusals`], and a call made through [`Refusals::unless_refused`] fails at once,
//! naming the subject the user may not use.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::manifest::DEFAULT_JETSTREAM_API;

/// Refusals buffered for calls that are slow to read them. Why 64: only calls in flight
/// read them (a handful at start-up), and one that misses some for a burst of other
/// refusals reads on, so it at worst waits for its own timeout, as it did before.
const BUFFERED: usize = 64;

/// The subject prefixes of this host's connection that a refusal is read against.
#[derive(Debug)]
struct Prefixes {
    /// The JetStream API's, with its dot, when it is not the default (a
    /// `jetstream_domain`, or a `jetstream_api_prefix`, whose refusals already name it as
    /// the host does): see [`Prefixes::in_host_api`].
    domain_api: Option<String>,
    /// JetStream pull requests: `<JetStream API prefix>.CONSUMER.MSG.NEXT.`, and
    /// `<stream>.<durable>` follows.
    pull: String,
    /// The inboxes the client makes, `<inbox prefix>.`: every request's reply comes back
    /// on one.
    inbox: String,
}

impl Prefixes {
    /// A refused `subject` as this host's calls name it. A server in the JetStream domain
    /// the host asks for maps the domain's API subjects (`$JS.<domain>.API.…`) to its own
    /// (`$JS.API.…`) before it checks permissions, and refuses the mapped subject.
    fn in_host_api<'a>(&self, subject: &'a str) -> Cow<'a, str> {
        let rest = subject
            .strip_prefix(DEFAULT_JETSTREAM_API)
            .and_then(|rest| rest.strip_prefix('.'));
        match (&self.domain_api, rest) {
            (Some(api), Some(rest)) => Cow::Owned(format!("{api}{rest}")),
            _ => Cow::Borrowed(subject),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

/// One permission the server refused this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub action: Action,
    pub subject: String,
    /// A subscription to one of this host's inboxes, where its requests' answers come
    /// back (see [`Refusals::read`]).
    pub inbox: bool,
}

impl Refusal {
    /// The refusal in a server error's text, if it is one. nats-server writes
    /// `Permissions Violation for Publish to "<subject>"` and `… for Subscription to
    /// "<subject>"` (newer servers add ` using queue "<queue>"`).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("Permissions Violation for ")?;
        let (action, rest) = if let Some(rest) = rest.strip_prefix("Publish to ") {
            (Action::Publish, rest)
        } else if let Some(rest) = rest.strip_prefix("Subscription to ") {
            (Action::Subscribe, rest)
        } else {
            return None;
        };
        let subject = rest.strip_prefix('"')?.split('"').next()?;
        Some(Self {
            action,
            subject: subject.to_string(),
            inbox: false,
        })
    }

    /// Whether this refuses what brings a handler its events: a subscription, or a
    /// JetStream pull. Neither waits for an answer, so no call sees it fail.
    fn stops_intake(&self, prefixes: &Prefixes) -> bool {
        match self.action {
            Action::Subscribe => true,
            Action::Publish => prefixes
                .in_host_api(&self.subject)
                .starts_with(&prefixes.pull),
        }
    }

    /// Whether a call that publishes to `publishes` (each a subject, or one ending in `>`
    /// that stands for the subjects it starts, as in NATS) and reads its answers on an
    /// inbox is stopped by this refusal.
    fn stops(&self, publishes: &[String], prefixes: &Prefixes) -> bool {
        match self.action {
            Action::Publish => {
                let subject = prefixes.in_host_api(&self.subject);
                publishes.iter().any(|p| match p.strip_suffix('>') {
                    Some(start) => subject.starts_with(start),
                    None => subject == p.as_str(),
                })
            }
            Action::Subscribe => self.subject.starts_with(&prefixes.inbox),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, kind) = match self.action {
            Action::Publish => ("publish to", "publish"),
            Action::Subscribe => ("subscribe to", "subscribe"),
        };
        write!(
            f,
            "the nats server refused this host's user permission to {verb} {:?}",
            self.subject
        )?;
        if self.inbox {
            write!(
                f,
                ", the inbox its requests' answers come back on: allow it in the user's \
                 subscribe permissions, or set [broker] inbox_prefix to inboxes the user \
                 may read"
            )?;
        } else {
            write!(f, ": allow it in the user's {kind} permissions")?;
        }
        write!(
            f,
            " (README, \"NATS permissions\", lists what a host needs)"
        )
    }
}

impl std::error::Error for Refusal {}

/// Refusals as the server reports them, for the calls waiting on it.
#[derive(Clone)]
pub struct Refusals {
    told: broadcast::Sender<Arc<Refusal>>,
    /// Subscriptions and pulls refused since [`Refusals::take_intake`] last took them
    /// (see [`Refusal::stops_intake`]).
    intake: Arc<Mutex<Vec<Refusal>>>,
    /// The connection's JetStream API and inbox prefixes, from the manifest.
    prefixes: Arc<Prefixes>,
}

impl Refusals {
    /// Refusals on a connection whose JetStream API prefix is `jetstream_api` (`$JS.API`
    /// by default) and whose inboxes start `inbox_prefix` (`_INBOX`).
    pub fn new(jetstream_api: &str, inbox_prefix: &str) -> Self {
        let api = format!("{jetstream_api}.");
        Self {
            told: broadcast::channel(BUFFERED).0,
            intake: Arc::default(),
            prefixes: Arc::new(Prefixes {
                pull: format!("{api}CONSUMER.MSG.NEXT."),
                domain_api: (jetstream_api != DEFAULT_JETSTREAM_API).then_some(api),
                inbox: format!("{inbox_prefix}."),
            }),
        }
    }

    /// The refusal in a server error's `text`, if it is one (see [`Refusal::parse`]),
    /// marked when it refuses one of this connection's inboxes.
    pub fn read(&self, text: &str) -> Option<Refusal> {
        let mut refusal = Refusal::parse(text)?;
        refusal.inbox = refusal.action == Action::Subscribe
            && refusal.subject.starts_with(&self.prefixes.inbox);
        Some(refusal)
    }

    /// Pass on a refusal the server reported (from the client's event callback).
    pub fn tell(&self, refusal: Refusal) {
        if refusal.stops_intake(&self.prefixes) {
            let mut kept = self.intake.lock().unwrap_or_else(|e| e.into_inner());
            // Bounded like the broadcast: the first ones say what is wrong.
            if kept.len() < BUFFERED {
                kept.push(refusal.clone());
            }
        }
        // No receiver: no call is waiting, and there is nobody to tell.
        let _ = self.told.send(Arc::new(refusal));
    }

    /// The subscriptions and pulls refused since the last call, oldest first.
    pub fn take_intake(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.intake.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Run `call`, which publishes to `publishes` (subjects; `$JS.API.CONSUMER.CREATE.S.D.>`
    /// stands for that with any filter after it) and reads its answers on an inbox. If the
    /// server refuses one of those before the call ends, the call is dropped and the
    /// refusal returned.
    pub async fn unless_refused<F: Future>(
        &self,
        publishes: &[String],
        call: F,
    ) -> Result<F::Output, Refusal> {
        // Before the call starts: its publish goes out on the first poll, so a refusal of
        // it cannot come before this receiver exists.
        let mut told = self.told.subscribe();
        let refused = async {
            loop {
                match told.recv().await {
                    Ok(refusal) if refusal.stops(publishes, &self.prefixes) => {
                        return Refusal::clone(&refusal);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    // The broker is gone: the call ends by itself.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                }
            }
        };
        tokio::select! {
            biased;
            output = call => Ok(output),
            refusal = refused => Err(refusal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DEFAULT_INBOX_PREFIX;

    /// Refusals on a connection with the default prefixes.
    fn refusals() -> Refusals {
        Refusals::new(DEFAULT_JETSTREAM_API, DEFAULT_INBOX_PREFIX)
    }

    fn publish(subject: &str) -> Refusal {
        Refusal {
            action: Action::Publish,
            subject: subject.to_string(),
            inbox: false,
        }
    }

    fn subjects(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_servers_permission_violations_are_read_and_other_errors_are_not() {
        assert_eq!(
            Refusal::parse(r#"Permissions Violation for Publish to "$JS.API.STREAM.CREATE.USERS""#),
            Some(publish("$JS.API.STREAM.CREATE.USERS"))
        );
        assert_eq!(
            Refusal::parse(r#"Permissions Violation for Subscription to "user.>" using queue "q""#),
            Some(Refusal {
                action: Action::Subscribe,
                subject: "user.>".to_string(),
                inbox: false,
            })
        );
        for other in [
            "Authorization Violation",
            "Maximum Payload Violation",
            r#"Permissions Violation for Publish with Reply of "_INBOX.x""#,
            "Permissions Violation for Publish to $JS.API.INFO",
        ] {
            assert_eq!(Refusal::parse(other), None, "{other}");
        }
    }

    #[test]
    fn a_refusal_stops_the_calls_publishing_there_or_reading_an_inbox() {
        let prefixes = &refusals().prefixes;
        let create = subjects(&[
            "$JS.API.CONSUMER.CREATE.USERS.email",
            "$JS.API.CONSUMER.CREATE.USERS.email.>",
        ]);
        // The consumer's filter follows its name in the subject.
        assert!(
            publish("$JS.API.CONSUMER.CREATE.USERS.email.user.created").stops(&create, prefixes)
        );
        assert!(publish("$JS.API.CONSUMER.CREATE.USERS.email").stops(&create, prefixes));
        // Another consumer whose name starts the same is another call's.
        assert!(!publish("$JS.API.CONSUMER.CREATE.USERS.email-sender").stops(&create, prefixes));
        assert!(!publish("$JS.API.STREAM.INFO.USERS").stops(&create, prefixes));
        // A plain subject is only itself: a request to `orders` is not stopped by a refused
        // publish to `orders.new`.
        assert!(!publish("orders.new").stops(&subjects(&["orders"]), prefixes));
        assert!(publish("orders").stops(&subjects(&["orders"]), prefixes));
        // Every request reads its answer on an inbox.
        let inbox = Refusal {
            action: Action::Subscribe,
            subject: "_INBOX.abc.*".to_string(),
            inbox: false,
        };
        assert!(inbox.stops(&create, prefixes));
        let handlers = Refusal {
            action: Action::Subscribe,
            subject: "user.created".to_string(),
            inbox: false,
        };
        assert!(!handlers.stops(&create, prefixes));
    }

    #[test]
    fn a_connection_with_prefixes_of_its_own_reads_refusals_by_them() {
        // `jetstream_domain = "hub"` and `inbox_prefix = "_INBOX_wasmev"`.
        let refusals = Refusals::new("$JS.hub.API", "_INBOX_wasmev");
        let prefixes = &refusals.prefixes;
        let inbox = |subject: &str| Refusal {
            action: Action::Subscribe,
            subject: subject.to_string(),
            inbox: false,
        };
        let info = subjects(&["$JS.hub.API.STREAM.INFO.USERS"]);
        assert!(inbox("_INBOX_wasmev.abc.*").stops(&info, prefixes));
        // Someone else's inboxes are not this host's.
        assert!(!inbox("_INBOX.abc.*").stops(&info, prefixes));
        assert!(!inbox("_INBOX_wasmevil.abc.*").stops(&info, prefixes));

        // Refused as the host asked (a leaf node passing the domain's API on), or as the
        // server whose domain it is mapped it.
        assert!(publish("$JS.hub.API.STREAM.INFO.USERS").stops(&info, prefixes));
        assert!(publish("$JS.API.STREAM.INFO.USERS").stops(&info, prefixes));
        assert!(!publish("$JS.other.API.STREAM.INFO.USERS").stops(&info, prefixes));
        let pulls = [
            publish("$JS.hub.API.CONSUMER.MSG.NEXT.USERS.email-sender"),
            publish("$JS.API.CONSUMER.MSG.NEXT.USERS.email-sender"),
        ];
        for pull in &pulls {
            refusals.tell(pull.clone());
        }
        refusals.tell(publish(
            "$JS.other.API.CONSUMER.MSG.NEXT.USERS.email-sender",
        ));
        assert_eq!(refusals.take_intake(), pulls);
    }

    #[test]
    fn refused_subscriptions_and_pulls_are_kept_until_taken_and_other_refusals_are_not() {
        let refusals = refusals();
        let subscription = Refusal {
            action: Action::Subscribe,
            subject: "user.created".to_string(),
            inbox: false,
        };
        let pull = publish("$JS.API.CONSUMER.MSG.NEXT.USERS.email-sender");
        refusals.tell(subscription.clone());
        refusals.tell(publish("email.sent"));
        refusals.tell(publish("$JS.API.STREAM.INFO.USERS"));
        refusals.tell(pull.clone());
        assert_eq!(refusals.take_intake(), [subscription, pull]);
        assert_eq!(refusals.take_intake(), []);
    }

    #[tokio::test]
    async fn a_call_refused_meanwhile_ends_with_the_refusal_and_others_run_to_their_end() {
        let refusals = refusals();
        let wanted = subjects(&["$JS.API.STREAM.INFO.USERS"]);

        let (refused, _) = tokio::join!(
            refusals.unless_refused(&wanted, std::future::pending::<()>()),
            async {
                tokio::task::yield_now().await;
                refusals.tell(publish("$JS.API.STREAM.INFO.OTHER"));
                refusals.tell(publish("$JS.API.STREAM.INFO.USERS"));
            }
        );
        assert_eq!(refused, Err(publish("$JS.API.STREAM.INFO.USERS")));

        let (ended, _) = tokio::join!(
            refusals.unless_refused(&wanted, async {
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                7
            }),
            async { refusals.tell(publish("$JS.API.STREAM.INFO.OTHER")) }
        );
        assert_eq!(ended, Ok(7));
    }

    #[test]
    fn a_refused_inbox_is_told_apart_and_says_inbox_prefix_would_do() {
        let refusals = Refusals::new(DEFAULT_JETSTREAM_API, "_INBOX_orders");
        let read = |subject: &str| {
            refusals
                .read(&format!(
                    "Permissions Violation for Subscription to {subject:?}"
                ))
                .unwrap()
        };
        assert!(!read("_INBOX.abc.*").inbox, "not this host's inbox");
        assert!(!read("user.created").inbox);
        let inbox = read("_INBOX_orders.abc.*");
        assert!(inbox.inbox);
        insta::assert_snapshot!(
            inbox.to_string(),
            @r#"the nats server refused this host's user permission to subscribe to "_INBOX_orders.abc.*", the inbox its requests' answers come back on: allow it in the user's subscribe permissions, or set [broker] inbox_prefix to inboxes the user may read (README, "NATS permissions", lists what a host needs)"#
        );
    }

    #[test]
    fn a_refusal_names_the_subject_and_where_to_allow_it() {
        insta::assert_snapshot!(
            publish("$JS.API.STREAM.CREATE.USERS").to_string(),
            @r#"the nats server refused this host's user permission to publish to "$JS.API.STREAM.CREATE.USERS": allow it in the user's publish permissions (README, "NATS permissions", lists what a host needs)"#
        );
        insta::assert_snapshot!(
            Refusal { action: Action::Subscribe, subject: "user.created".to_string(), inbox: false }.to_string(),
            @r#"the nats server refused this host's user permission to subscribe to "user.created": allow it in the user's subscribe permissions (README, "NATS permissions", lists what a host needs)"#
        );
    }
}
