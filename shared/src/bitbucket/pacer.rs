//! One pacer per Bitbucket: every status post (webhook or poll, live or backlog) asks it for a
//! turn, and tells it how the post went. Backoff belongs to the destination, not to each status.
//!
//! - **Rate.** Data Center keeps a token bucket per user (a burst, then a steady refill) and
//!   answers 429 with `Retry-After` when it is empty; Cloud counts requests per hour and answers
//!   429 with no `Retry-After`. With `BITBUCKET_RATE_LIMIT` set, posts are spaced at that rate
//!   from the start. Otherwise the pacer learns: before the first 429 a burst starts at 50/s
//!   and doubles every 100 ms (unpaced past 4,000/s), so the bucket runs dry one post at a time
//!   rather than under a wave of posts sent together; what that burst got through is the
//!   server's size (less what it refilled meanwhile). After the wait, the rate starts from what
//!   the burst and wait allow and doubles each second until the next 429; from the two moments
//!   the bucket was empty the pacer takes the refill rate (`refill_lower_bound`) and keeps just
//!   under it (a further 429 takes 5% off; each quiet second adds 0.5%). Every wait a server asks
//!   for is honoured, capped at [`MAX_SERVER_WAIT`].
//! - **Availability.** A 5xx, a timeout or a refused connection marks the destination down for
//!   1 s, doubling to 60 s: posts are held (they stay in the outbox) and one probe goes out when
//!   the time is up. The first success clears it, and everything held may go at once.
//! - **Priority.** A live post (a webhook's) is not queued behind the backlog's reserved turns,
//!   and gives up waiting sooner (its status then waits in the outbox).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Longest server-requested wait honoured (`Retry-After`, `RateLimit-Reset`); anything longer
/// (or unparseable, or absurd) is taken as this.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(15 * 60);
/// Wait after a 429 that says nothing about how long to wait (Bitbucket Cloud).
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest anyone waits for the next probe of a destination that is down.
const MAX_DOWN_WAIT: Duration = Duration::from_secs(3);
/// Slowest rate ever paced at (one post a minute).
const MIN_RATE: f64 = 1.0 / 60.0;
/// How far ahead a backlog post may hold a turn. One further back waits, then asks again: a turn
/// is timed at the rate of when it is given, so a rate raised meanwhile (the ramp) applies to the
/// posts already waiting, not only to those that come after them.
const RESERVE_AHEAD: Duration = Duration::from_millis(100);
/// A quiet spell after which a post starts a new burst (before the first 429).
const BURST_IDLE: Duration = Duration::from_secs(1);
/// Before the first 429 a burst starts at this rate and doubles every [`BURST_STEP`] until it
/// passes [`BURST_UNPACED`], from where it is unpaced: a backlog of many posts waiting at once
/// then reaches an empty bucket one post at a time (the 429 that tells the pacer so refuses one
/// post or two, not every post that was sent together), and a Bitbucket with no limit loses
/// well under a second to it.
const BURST_START_RATE: f64 = 50.0;
const BURST_STEP: Duration = Duration::from_millis(100);
const BURST_UNPACED: f64 = 4000.0;

/// Whose post it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A webhook's status: someone is looking at it now.
    Live,
    /// A poll cycle's or the outbox's.
    Backlog,
}

/// How a post went, for the pacer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    Accepted,
    /// 429, with the wait the server asked for (if any).
    RateLimited(Option<Duration>),
    /// 5xx, timeout, connection failure: the destination is not answering.
    Unavailable,
    /// Refused for reasons of its own (400, 401, 404...): says nothing about pace or health.
    Refused,
}

/// Not now: the post is held (kept in the outbox) until `retry_in` has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub retry_in: Duration,
    pub reason: HeldReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldReason {
    RateLimited,
    Unavailable,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.reason {
            HeldReason::RateLimited => "Bitbucket is rate limiting",
            HeldReason::Unavailable => "Bitbucket is not answering",
        };
        write!(f, "{why}; held for {} s", self.retry_in.as_secs().max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// No 429 seen yet: unpaced.
    Burst,
    /// Doubling the rate each second since `since` until the next 429.
    Ramp { since: Instant },
    /// Just under the learned (or configured) rate.
    Steady,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Posts per second; `None`: unpaced.
    rate: Option<f64>,
    /// The earliest time the next backlog post may go.
    next_slot: Instant,
    paused_until: Option<Instant>,
    /// Successes before the first 429: the server's burst.
    burst: u32,
    /// How long that burst took (it was paced, so the server refilled some of it meanwhile).
    burst_secs: f64,
    /// The last wait the server asked for (seconds): in the ramp, the one after the burst.
    last_wait: f64,
    /// The last drain of a steady phase: the wait before it, then (seconds, posts accepted)
    /// from the end of that wait to the 429 that ended it, at one rate throughout.
    last_drain: Option<Drain>,
    ok_since_resume: u32,
    /// Successes since the ramp last doubled the rate: what was really sent at that rate.
    ok_since_raise: u32,
    resumed_at: Instant,
    last_raise: Instant,
    /// When the last turn was given.
    last_turn: Instant,
    down: Option<Down>,
    /// Bumped whenever a pause or an outage begins: a turn reserved before it is void.
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct Drain {
    wait: f64,
    secs: f64,
    accepted: f64,
}

#[derive(Debug, Clone, Copy)]
struct Down {
    until: Instant,
    backoff: Duration,
    probing: bool,
}

/// What the pacer is doing, for `/healthz` and logs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PacerSnapshot {
    /// Posts per second paced at; `None`: unpaced.
    pub rate_per_second: Option<f64>,
    /// Seconds until a rate-limit wait ends.
    pub paused_for_s: Option<f64>,
    /// Seconds until the next probe of a destination that is down.
    pub down_for_s: Option<f64>,
}

#[derive(Debug)]
pub struct Pacer {
    configured: Option<f64>,
    state: Mutex<State>,
}

impl Pacer {
    /// `configured`: `BITBUCKET_RATE_LIMIT`, posts per second.
    pub fn new(configured: Option<f64>) -> Pacer {
        let now = Instant::now();
        let configured = configured.filter(|r| r.is_finite() && *r > 0.0);
        Pacer {
            configured,
            state: Mutex::new(State {
                phase: if configured.is_some() {
                    Phase::Steady
                } else {
                    Phase::Burst
                },
                rate: configured,
                next_slot: now,
                paused_until: None,
                burst: 0,
                burst_secs: 0.0,
                last_wait: 0.0,
                last_drain: None,
                ok_since_resume: 0,
                ok_since_raise: 0,
                resumed_at: now,
                last_raise: now,
                last_turn: now,
                down: None,
                generation: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is left consistent between statements; a panic elsewhere does not void it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a turn to post, at most `max_wait`; `Err` when the turn is further away.
    /// Returns how long it waited.
    pub async fn acquire(&self, priority: Priority, max_wait: Duration) -> Result<Duration, Held> {
        let start = Instant::now();
        loop {
            let (slot, generation) = self.reserve(priority, start, max_wait)?;
            // A turn that is due now goes at once: the timer's millisecond wheel would add up
            // to a millisecond to every live post.
            if slot > Instant::now() {
                tokio::time::sleep_until(slot).await;
            }
            // A pause or an outage that began while we slept voids the turn: reserve again.
            if self.lock().generation == generation {
                return Ok(start.elapsed());
            }
        }
    }

    fn reserve(
        &self,
        priority: Priority,
        start: Instant,
        max_wait: Duration,
    ) -> Result<(Instant, u64), Held> {
        let now = Instant::now();
        let deadline = start + max_wait;
        let mut s = self.lock();
        if let Some(down) = s.down.as_mut() {
            // Nobody waits long for a destination that is down: what is held goes out at the
            // next cycle, or as soon as a webhook's probe finds it back.
            let deadline = deadline.min(start + MAX_DOWN_WAIT);
            let held = |until: Instant| Held {
                retry_in: until.saturating_duration_since(now),
                reason: HeldReason::Unavailable,
            };
            if down.until > now {
                if down.until > deadline {
                    return Err(held(down.until));
                }
                // Wake when the probe is due; the loop then asks again.
                return Ok((down.until, s.generation.wrapping_sub(1)));
            }
            if down.probing {
                // Someone else's probe is out: wait for its answer (at most a while).
                let retry = now + Duration::from_millis(50);
                if retry > deadline {
                    return Err(held(down.until.max(retry)));
                }
                return Ok((retry, s.generation.wrapping_sub(1)));
            }
            down.probing = true;
            return Ok((now, s.generation));
        }
        // Before the first 429 the burst is counted from the first post after a quiet spell
        // (not from when this pacer was made, hours ago perhaps).
        if s.phase == Phase::Burst && now.saturating_duration_since(s.last_turn) >= BURST_IDLE {
            s.resumed_at = now;
            s.ok_since_resume = 0;
        }
        let mut slot = now;
        if let Some(p) = s.paused_until.filter(|p| *p > now) {
            slot = p;
        }
        if priority == Priority::Backlog {
            slot = slot.max(s.next_slot);
        }
        if slot > now && slot > deadline {
            // Paused by a 429, or paced (the backlog's turn is far off only when the rate is
            // very low): the rate limit either way.
            return Err(Held {
                retry_in: slot - now,
                reason: HeldReason::RateLimited,
            });
        }
        if priority == Priority::Backlog && slot > now + RESERVE_AHEAD {
            // Too far off to hold now: wake when it is near, then ask again.
            return Ok((slot - RESERVE_AHEAD, s.generation.wrapping_sub(1)));
        }
        s.last_turn = now;
        let rate = match s.phase {
            Phase::Burst => burst_rate(now.saturating_duration_since(s.resumed_at)),
            _ => s.rate,
        };
        if let Some(rate) = rate {
            let gap = Duration::from_secs_f64(1.0 / rate.max(MIN_RATE));
            s.next_slot = s.next_slot.max(slot) + gap;
        }
        Ok((slot, s.generation))
    }

    /// How a post went.
    pub fn feedback(&self, feedback: Feedback) {
        self.feedback_at(feedback, Instant::now());
    }

    fn feedback_at(&self, feedback: Feedback, now: Instant) {
        let mut s = self.lock();
        match feedback {
            Feedback::Accepted => {
                if s.down.take().is_some() {
                    tracing::info!("Bitbucket answers again; delivering what was held");
                }
                s.ok_since_resume = s.ok_since_resume.saturating_add(1);
                s.ok_since_raise = s.ok_since_raise.saturating_add(1);
                match s.phase {
                    Phase::Ramp { since }
                        if now.saturating_duration_since(since) >= Duration::from_secs(1) =>
                    {
                        s.rate = s.rate.map(|r| r * 2.0);
                        s.phase = Phase::Ramp { since: now };
                        s.ok_since_raise = 0;
                    }
                    Phase::Steady
                        if self.configured.is_none()
                            && now.saturating_duration_since(s.last_raise)
                                >= Duration::from_secs(1) =>
                    {
                        s.rate = s.rate.map(|r| r * 1.005);
                        s.last_raise = now;
                    }
                    _ => {}
                }
            }
            Feedback::RateLimited(wait) => {
                // Answers to posts already in flight when the pause began are the same event.
                if s.paused_until.is_some_and(|p| p > now) {
                    return;
                }
                let wait = wait.unwrap_or(DEFAULT_RATE_LIMIT_WAIT).min(MAX_SERVER_WAIT);
                let wait = wait.max(Duration::from_millis(100));
                let ok = f64::from(s.ok_since_resume);
                let waited = wait.as_secs_f64();
                let learned = match s.phase {
                    Phase::Burst => {
                        s.burst = s.ok_since_resume.max(1);
                        let since = now.saturating_duration_since(s.resumed_at).as_secs_f64();
                        s.burst_secs = since;
                        s.phase = Phase::Ramp { since: now + wait };
                        // What the burst and this wait allow, doubled: the ramp starts there.
                        2.0 * f64::from(s.burst) / (since + waited)
                    }
                    Phase::Ramp { since } => {
                        let step = now.saturating_duration_since(since).as_secs_f64();
                        // The rate the last step really sent at: the pacer's, unless fewer
                        // posts were waiting to go.
                        let sent = f64::from(s.ok_since_raise) / step.max(1e-3);
                        let r = s.rate.unwrap_or(MIN_RATE).min(sent);
                        s.phase = Phase::Steady;
                        refill_lower_bound(
                            f64::from(s.burst),
                            s.burst_secs,
                            s.last_wait,
                            ok,
                            now.saturating_duration_since(s.resumed_at).as_secs_f64(),
                            r,
                            step,
                        ) * 0.97
                    }
                    Phase::Steady => {
                        let rate = s.rate.unwrap_or(MIN_RATE);
                        let drain = Drain {
                            wait: s.last_wait,
                            secs: now.saturating_duration_since(s.resumed_at).as_secs_f64(),
                            accepted: ok,
                        };
                        let slope = s.last_drain.and_then(|d| refill_from_drains(d, drain));
                        s.last_drain = Some(drain);
                        match slope {
                            Some(refill) if refill < rate => (refill * 0.97).min(rate * 0.95),
                            _ => rate * 0.95,
                        }
                    }
                };
                let mut rate = learned.max(MIN_RATE);
                if let Some(c) = self.configured {
                    rate = rate.min(c);
                }
                s.rate = Some(rate);
                s.last_wait = waited;
                let until = now + wait;
                s.paused_until = Some(until);
                s.next_slot = until;
                s.resumed_at = until;
                s.last_raise = until;
                s.ok_since_resume = 0;
                s.ok_since_raise = 0;
                s.generation = s.generation.wrapping_add(1);
                tracing::warn!(
                    wait_ms = wait.as_millis() as u64,
                    rate_per_second = rate,
                    "Bitbucket rate limit reached; pausing posts"
                );
            }
            Feedback::Unavailable => {
                let backoff = match s.down {
                    // The probe failed: wait longer before the next.
                    Some(d) if d.probing => (d.backoff * 2).min(MAX_BACKOFF),
                    // Another answer of the wave that found it down: the same outage.
                    Some(_) => return,
                    None => FIRST_BACKOFF,
                };
                s.down = Some(Down {
                    until: now + backoff,
                    backoff,
                    probing: false,
                });
                s.generation = s.generation.wrapping_add(1);
            }
            Feedback::Refused => {
                // A probe that was refused for its own reasons still shows Bitbucket answers.
                s.down = None;
            }
        }
    }

    pub fn snapshot(&self) -> PacerSnapshot {
        let now = Instant::now();
        let s = self.lock();
        let left = |t: Instant| (t > now).then(|| (t - now).as_secs_f64());
        PacerSnapshot {
            rate_per_second: s.rate,
            paused_for_s: s.paused_until.and_then(left),
            down_for_s: s.down.and_then(|d| left(d.until)),
        }
    }
}

/// The server's refill rate, as the largest of three lower bounds (each holds whatever the
/// bucket did in between; only their sharpness depends on it). Known: the first burst (`c1`
/// posts accepted in `d1` seconds from a bucket taken to be full, so size = c1 - refill * d1)
/// ended with the bucket empty; the server asked for a wait of `w`; since it, `c2` posts were
/// accepted in `d2` seconds, the last step of the ramp sending at `r` for `step` seconds,
/// and the bucket is empty again.
/// - No more than the refill is let through between two empties: refill >= c2 / (w + d2).
/// - The bucket held at most its size after the wait: c2 <= size + refill * d2, so
///   refill >= (c2 - c1) / (d2 - d1). Sharp when the bucket filled up during the wait.
/// - It held at most its size when the last step began and was drained by it:
///   (r - refill) * step <= size, so refill >= (r * step - c1) / (step - d1). Sharp when the
///   bucket filled up during the step before.
fn refill_lower_bound(c1: f64, d1: f64, w: f64, c2: f64, d2: f64, r: f64, step: f64) -> f64 {
    let mut refill = c2 / (w + d2).max(1e-3);
    if d2 > d1 + 0.1 {
        refill = refill.max((c2 - c1) / (d2 - d1));
    }
    if step > d1 + 0.1 {
        refill = refill.max((r * step - c1) / (step - d1));
    }
    refill
}

/// The refill rate from two drains of the steady phase, each at one rate above the refill from
/// the end of a wait to the next 429. After a wait `w` the bucket holds min(size, refill * w),
/// so a drain of `secs` lets through min(size, refill * w) + refill * secs: for two drains after
/// equal waits, the refill is the difference in posts over the difference in time, whether or
/// not the bucket filled up. `None` where the two cannot tell it (other waits, too alike).
fn refill_from_drains(a: Drain, b: Drain) -> Option<f64> {
    let (dt, dn) = (b.secs - a.secs, b.accepted - a.accepted);
    let same_wait = (a.wait - b.wait).abs() < 0.05;
    (same_wait && dt.abs() >= 0.3 && dn.abs() >= 5.0)
        .then(|| dn / dt)
        .filter(|r| r.is_finite() && *r > 0.0)
}

/// The backlog's rate `into` a burst (before the first 429); `None`: unpaced.
fn burst_rate(into: Duration) -> Option<f64> {
    let doublings = into.as_secs_f64() / BURST_STEP.as_secs_f64();
    let rate = BURST_START_RATE * doublings.min(16.0).exp2();
    (rate < BURST_UNPACED).then_some(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token bucket as Data Center keeps it, and a client that posts as fast as the pacer
    /// lets it, in simulated time.
    fn drain(pacer: &Pacer, posts: u32, size: f64, refill: f64) -> (f64, u32) {
        let t0 = Instant::now();
        let mut now = t0;
        let (mut tokens, mut last) = (size, t0);
        let (mut ok, mut refused) = (0, 0);
        while ok < posts {
            // The pacer's next turn, computed as `reserve` would.
            let slot = {
                let s = pacer.lock();
                let mut slot = now;
                if let Some(p) = s.paused_until.filter(|p| *p > now) {
                    slot = p;
                }
                slot.max(s.next_slot)
            };
            now = slot;
            {
                let mut s = pacer.lock();
                if let Some(rate) = s.rate {
                    s.next_slot = s.next_slot.max(slot) + Duration::from_secs_f64(1.0 / rate);
                }
            }
            now += Duration::from_millis(1);
            tokens = (tokens + (now - last).as_secs_f64() * refill).min(size);
            last = now;
            if tokens >= 1.0 {
                tokens -= 1.0;
                ok += 1;
                pacer.feedback_at(Feedback::Accepted, now);
            } else {
                refused += 1;
                let wait = ((1.0 - tokens) / refill).ceil().max(1.0);
                pacer.feedback_at(
                    Feedback::RateLimited(Some(Duration::from_secs_f64(wait))),
                    now,
                );
            }
        }
        ((now - t0).as_secs_f64(), refused)
    }

    #[test]
    fn learns_a_token_bucket_and_keeps_under_it() {
        for (posts, size, refill) in [(1000, 20.0, 50.0), (300, 60.0, 5.0), (1000, 100.0, 20.0)] {
            let pacer = Pacer::new(None);
            let (took, refused) = drain(&pacer, posts, size, refill);
            let bound = (f64::from(posts) - size) / refill;
            assert!(
                took <= bound * 1.2,
                "{posts} posts, bucket {size}/{refill}: {took:.1} s, bound {bound:.1} s"
            );
            assert!(
                f64::from(refused) <= f64::from(posts) * 0.05,
                "{refused} refused of {posts}"
            );
        }
    }

    /// Bitbucket Data Center's token bucket in tokio's time: an empty bucket answers 429 with
    /// a whole number of seconds to wait (rounded up, at least 1), as the fake does.
    struct Bucket {
        tokens: f64,
        last: Instant,
        size: f64,
        refill: f64,
    }

    impl Bucket {
        fn take(&mut self) -> Result<(), Duration> {
            let now = Instant::now();
            self.tokens =
                (self.tokens + (now - self.last).as_secs_f64() * self.refill).min(self.size);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                Ok(())
            } else {
                let wait = ((1.0 - self.tokens) / self.refill).ceil().max(1.0);
                Err(Duration::from_secs_f64(wait))
            }
        }
    }

    /// `posts` statuses through `workers` concurrent posters, as the reporter sends a backlog
    /// (each retries its post after a 429), starting `idle` after the pacer was made. Returns
    /// the seconds from the first post to the last success, and the posts answered 429.
    async fn drain_concurrently(
        pacer: &Pacer,
        posts: u32,
        workers: usize,
        (size, refill): (f64, f64),
        idle: Duration,
    ) -> (f64, u32) {
        use std::cell::{Cell, RefCell};
        tokio::time::sleep(idle).await;
        let t0 = Instant::now();
        let bucket = RefCell::new(Bucket {
            tokens: size,
            last: t0,
            size,
            refill,
        });
        let (next, refused, done) = (Cell::new(0u32), Cell::new(0u32), Cell::new(t0));
        let worker = || async {
            while next.get() < posts {
                next.set(next.get() + 1);
                loop {
                    pacer
                        .acquire(Priority::Backlog, Duration::from_secs(60))
                        .await
                        .expect("a turn within a minute");
                    // The post's round trip.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let answer = bucket.borrow_mut().take();
                    match answer {
                        Ok(()) => {
                            pacer.feedback(Feedback::Accepted);
                            done.set(Instant::now());
                            break;
                        }
                        Err(wait) => {
                            refused.set(refused.get() + 1);
                            pacer.feedback(Feedback::RateLimited(Some(wait)));
                        }
                    }
                }
            }
        };
        futures::future::join_all((0..workers).map(|_| worker())).await;
        ((done.get() - t0).as_secs_f64(), refused.get())
    }

    /// The reporter keeps 64 posts waiting for turns. Turns reserved at a rate the pacer has
    /// since raised must not hold the backlog to the old rate (the ramp then measures a rate
    /// that was never sent, and learns one far above the server's); and the first burst is
    /// measured from the first post, not from when the pacer was made.
    #[tokio::test(start_paused = true)]
    async fn learns_a_token_bucket_with_many_posts_waiting() {
        for (posts, size, refill, idle) in [
            (1000, 20.0, 50.0, 0),
            (1000, 20.0, 50.0, 5),
            (600, 60.0, 5.0, 0),
            (1000, 100.0, 20.0, 30),
        ] {
            let pacer = Pacer::new(None);
            let idle = Duration::from_secs(idle);
            let (took, refused) = drain_concurrently(&pacer, posts, 64, (size, refill), idle).await;
            let bound = (f64::from(posts) - size) / refill;
            assert!(
                took <= bound * 1.2,
                "{posts} posts, bucket {size}/{refill}, first post after {idle:?}: {took:.1} s, bound {bound:.1} s ({refused} refused)"
            );
            assert!(
                f64::from(refused) <= f64::from(posts) * 0.05,
                "{posts} posts, bucket {size}/{refill}, first post after {idle:?}: {refused} refused ({took:.1} s)"
            );
        }
    }

    /// Drains after equal waits tell the refill whether or not the bucket filled up during the
    /// wait; other waits, or drains too alike, tell nothing.
    #[test]
    fn the_refill_from_two_steady_drains() {
        let drain = |wait, secs, accepted| Drain {
            wait,
            secs,
            accepted,
        };
        // 20 tokens at 50/s, 1 s waits: full after each wait.
        let (a, b) = (drain(1.0, 1.6, 20.0 + 80.0), drain(1.0, 2.8, 20.0 + 140.0));
        assert!((refill_from_drains(a, b).unwrap() - 50.0).abs() < 1e-9);
        // 60 tokens at 5/s, 1 s waits: 5 tokens after each wait.
        let (a, b) = (drain(1.0, 2.0, 5.0 + 10.0), drain(1.0, 6.0, 5.0 + 30.0));
        assert!((refill_from_drains(a, b).unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(refill_from_drains(a, drain(2.0, 6.0, 40.0)), None);
        assert_eq!(refill_from_drains(a, drain(1.0, 2.1, 15.5)), None);
    }

    #[test]
    fn a_configured_rate_is_kept_from_the_start() {
        let pacer = Pacer::new(Some(50.0));
        let (took, refused) = drain(&pacer, 500, 20.0, 50.0);
        assert_eq!(refused, 0);
        assert!((took - 10.0).abs() < 0.5, "{took}");
    }

    #[test]
    fn absurd_waits_are_capped() {
        let pacer = Pacer::new(None);
        pacer.feedback(Feedback::RateLimited(Some(Duration::from_secs(
            u64::MAX / 4,
        ))));
        let snap = pacer.snapshot();
        assert!(snap.paused_for_s.unwrap() <= MAX_SERVER_WAIT.as_secs_f64());
    }

    #[tokio::test]
    async fn a_destination_that_is_down_holds_posts_then_lets_one_probe_through() {
        let pacer = Pacer::new(None);
        pacer.feedback(Feedback::Unavailable);
        let held = pacer
            .acquire(Priority::Live, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(held.reason, HeldReason::Unavailable);
        // Waiting longer than the backoff gets the probe.
        let waited = pacer
            .acquire(Priority::Backlog, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(waited >= Duration::from_millis(900), "{waited:?}");
        // While the probe is out, others are held.
        assert!(
            pacer
                .acquire(Priority::Live, Duration::from_millis(10))
                .await
                .is_err()
        );
        pacer.feedback(Feedback::Accepted);
        assert!(pacer.acquire(Priority::Live, Duration::ZERO).await.is_ok());
    }

    #[tokio::test]
    async fn live_posts_do_not_queue_behind_the_backlog() {
        let pacer = Pacer::new(Some(10.0));
        // Ten backlog turns reserved: the last is a second away.
        for _ in 0..10 {
            pacer
                .reserve(Priority::Backlog, Instant::now(), Duration::from_secs(5))
                .unwrap();
        }
        let waited = pacer
            .acquire(Priority::Live, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(waited < Duration::from_millis(50), "{waited:?}");
        // The backlog's next turn is further away than a live budget allows.
        assert!(
            pacer
                .reserve(
                    Priority::Backlog,
                    Instant::now(),
                    Duration::from_millis(100)
                )
                .is_err()
        );
    }
}
