//! Deadlines on waits that seldom wait.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tokio::time::error::Elapsed;

/// `fut`'s output, or `Elapsed` once the instant `deadline` names has passed; the timer is
/// made only if `fut` did not finish on its first poll.
///
/// Why: the waits on an event's path (the guest's call, each of its publishes) nearly always
/// end on their first poll. A timeout made up front cost every event a tokio timer (a
/// runtime handle and a timer entry, moved into the event's future) and, for a deadline
/// counted from the start of the wait, a clock read. `deadline` is called only when the
/// timer is made, so such a deadline reads the clock only then.
///
/// `fut` is pinned by the caller, where it was made: the waits it serves are an event's
/// largest futures (a guest publish's is over 1 KB), and taking one by value moves it into
/// this function's own future on every event, a copy the optimiser need not remove.
pub(crate) async fn timeout_if_waiting<F: Future>(
    mut fut: Pin<&mut F>,
    deadline: impl FnOnce() -> Instant,
) -> Result<F::Output, Elapsed> {
    match futures::poll!(fut.as_mut()) {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout_at(deadline(), fut).await,
    }
}

/// [`timeout_if_waiting`] with the deadline `limit` after `fut` first waits: a limit on
/// the wait itself, such as a publish's for room in the broker's queue.
pub(crate) fn limit_if_waiting<F: Future>(
    fut: Pin<&mut F>,
    limit: Duration,
) -> impl Future<Output = Result<F::Output, Elapsed>> + use<'_, F> {
    timeout_if_waiting(fut, move || Instant::now() + limit)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use super::*;

    /// Every await in a test has a bound of its own: a helper that never cut its wait
    /// would otherwise hang the test instead of failing it.
    async fn bounded<T>(wait: impl Future<Output = T>) -> T {
        match tokio::time::timeout(Duration::from_secs(60), wait).await {
            Ok(out) => out,
            Err(_) => panic!("the wait was not over within 60 s"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_on_its_first_poll_is_never_timed() {
        // Whether the deadline was asked for is whether a timer was made.
        let asked = Cell::new(false);
        let past = Instant::now() - Duration::from_secs(1);
        let out = bounded(timeout_if_waiting(std::pin::pin!(async { 7 }), || {
            asked.set(true);
            past
        }))
        .await;
        assert_eq!(out.ok(), Some(7));
        assert!(!asked.get(), "the deadline was asked for");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_waits_is_cut_at_its_deadline() {
        let start = Instant::now();
        let out = bounded(timeout_if_waiting(
            std::pin::pin!(std::future::pending::<()>()),
            || start + Duration::from_secs(5),
        ))
        .await;
        assert!(out.is_err(), "a wait that never ends was not cut");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_waits_but_ends_in_time_keeps_its_output() {
        let start = Instant::now();
        let out = bounded(timeout_if_waiting(
            std::pin::pin!(async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "done"
            }),
            || start + Duration::from_secs(5),
        ))
        .await;
        assert_eq!(out.ok(), Some("done"));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
