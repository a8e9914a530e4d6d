//! The one compare-and-set retry loop: read, decide, write under a condition on what was read,
//! and start over when another writer got there first.

use super::StoreError;

/// How many times a read-decide-write loop retries after losing a compare-and-set before it
/// reports the conflict. Each loss means another writer made progress, so this bounds only
/// pathological contention.
pub const CAS_ATTEMPTS: usize = 16;

/// How one attempt of a read-decide-write loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas<T> {
    /// Finished with this answer (written, or nothing to write).
    Done(T),
    /// The conditional write lost: read again and decide again.
    Retry,
}

/// Runs `attempt` until it is [`Cas::Done`] or fails, at most `attempts` times; after that many
/// lost races the answer is [`StoreError::Conflict`] (converted into the caller's error type).
///
/// `attempt` is a closure returning a future (`|| async move { .. }` over borrowed values)
/// rather than an async closure, so that the loop's future stays `Send` for `async_trait`.
pub async fn cas_retry<T, E, F, Fut>(attempts: usize, mut attempt: F) -> Result<T, E>
where
    E: From<StoreError>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Cas<T>, E>>,
{
    for _ in 0..attempts {
        if let Cas::Done(value) = attempt().await? {
            return Ok(value);
        }
    }
    Err(StoreError::Conflict.into())
}

/// A conditional write's result as an attempt's end: `done` once written, [`Cas::Retry`] when the
/// condition failed, the error otherwise.
pub fn retry_on_conflict<T>(
    written: Result<impl Sized, StoreError>,
    done: T,
) -> Result<Cas<T>, StoreError> {
    match written {
        Ok(_) => Ok(Cas::Done(done)),
        Err(StoreError::Conflict) => Ok(Cas::Retry),
        Err(e) => Err(e),
    }
}
