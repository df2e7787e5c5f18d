//! The open-loop schedule and the loop each slot (a connection, or one
//! stream's worth of an HTTP/2 connection) runs.
//!
//! Every slot takes the next ticket from one shared [`Schedule`] when it is
//! free. Ticket `i` is intended at `t0 + i/R`. A slot that is free early
//! sleeps until the intended time; a ticket nobody was free to take waits,
//! and [`latency_start`] charges that wait to the system under test. Time
//! comes from `tokio::time`, so the tests below run the real loop on a
//! paused clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hdrhistogram::Histogram;
use tokio::time::{Duration, Instant};

use super::stats::{new_histogram, RunStats, Timeline};

/// A boxed future, so that slots need no generic parameter.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One request/response exchange on a slot. The seam between the schedule
/// and the network: the tests use a scripted transport.
pub trait Transport: Send {
    /// Sends one request and reads the whole response; an error is a
    /// failed request (the transport reconnects on its next call if it must).
    fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>>;
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Open loop: `rate` requests per second, whatever the responses do.
    Open { rate: f64 },
    /// Closed loop: every slot sends back to back.
    Closed,
}

/// A request a slot is about to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub index: u64,
    /// When the schedule wants it sent.
    pub intended: Instant,
    /// When a free slot took it.
    pub picked_up: Instant,
}

/// The shared schedule of one run.
#[derive(Debug)]
pub struct Schedule {
    start: Instant,
    pacing: Pacing,
    /// Open loop: how many tickets in all.
    total: u64,
    /// Closed loop: no ticket is handed out after this.
    deadline: Instant,
    next: AtomicU64,
}

impl Schedule {
    pub fn new(start: Instant, pacing: Pacing, duration: Duration) -> Self {
        let total = match pacing {
            Pacing::Open { rate } => (rate * duration.as_secs_f64()).round().max(0.0) as u64,
            Pacing::Closed => u64::MAX,
        };
        Schedule {
            start,
            pacing,
            total,
            deadline: start + duration,
            next: AtomicU64::new(0),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Intended send time of ticket `index` (open loop).
    pub fn intended(&self, index: u64) -> Instant {
        match self.pacing {
            Pacing::Open { rate } if rate > 0.0 => {
                self.start + Duration::from_secs_f64(index as f64 / rate)
            }
            _ => self.start,
        }
    }

    /// Hands the next ticket to a slot that became free at `now`, or `None`
    /// when the run is over.
    pub fn take(&self, now: Instant) -> Option<Ticket> {
        match self.pacing {
            Pacing::Open { .. } => {
                let index = self.next.fetch_add(1, Ordering::Relaxed);
                (index < self.total).then(|| Ticket {
                    index,
                    intended: self.intended(index),
                    picked_up: now,
                })
            }
            Pacing::Closed => {
                if now >= self.deadline {
                    return None;
                }
                let index = self.next.fetch_add(1, Ordering::Relaxed);
                Some(Ticket {
                    index,
                    intended: now,
                    picked_up: now,
                })
            }
        }
    }
}

/// The instant a request's latency is counted from.
///
/// If the ticket was picked up after its intended time, every slot was busy
/// and the request queued: count from the intended time (the coordinated
/// omission correction). If a slot was waiting for it, any lateness of the
/// actual send is the generator's timer, not the system under test: count
/// from the send.
pub fn latency_start(ticket: &Ticket, sent: Instant) -> Instant {
    if ticket.picked_up > ticket.intended {
        ticket.intended
    } else {
        sent
    }
}

/// What one slot saw during one run.
#[derive(Debug)]
pub struct SlotStats {
    pub latency: Histogram<u64>,
    /// Generator lateness: send time minus intended time, for tickets a slot
    /// was waiting for.
    pub lag: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub last_done: Option<Instant>,
    /// Outcomes by intended send time: see [`Timeline`].
    pub timeline: Timeline,
}

const MAX_ERROR_SAMPLES: usize = 5;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Runs one slot until the schedule is exhausted.
pub async fn drive_slot(
    transport: &mut dyn Transport,
    schedule: &Schedule,
    timeout: Duration,
) -> SlotStats {
    let mut stats = SlotStats {
        latency: new_histogram(),
        lag: new_histogram(),
        ok: 0,
        errors: 0,
        error_samples: Vec::new(),
        last_done: None,
        timeline: Timeline::default(),
    };
    while let Some(ticket) = schedule.take(Instant::now()) {
        if ticket.intended > ticket.picked_up {
            tokio::time::sleep_until(ticket.intended).await;
        }
        let sent = Instant::now();
        let result = tokio::time::timeout(timeout, transport.call()).await;
        let done = Instant::now();
        stats.last_done = Some(done);
        let offset = ticket.intended.saturating_duration_since(schedule.start());
        stats.timeline.record(offset, matches!(result, Ok(Ok(()))));
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("no response within {timeout:?}")),
        };
        match error {
            None => {
                stats.ok += 1;
                let from = latency_start(&ticket, sent);
                stats
                    .latency
                    .saturating_record(micros(done.saturating_duration_since(from)).max(1));
                if from == sent {
                    stats
                        .lag
                        .saturating_record(micros(sent.saturating_duration_since(ticket.intended)));
                }
            }
            Some(message) => {
                stats.errors += 1;
                if stats.error_samples.len() < MAX_ERROR_SAMPLES
                    && !stats.error_samples.contains(&message)
                {
                    stats.error_samples.push(message);
                }
            }
        }
    }
    stats
}

/// Runs every slot against one schedule starting now, waits for all of them
/// (a request in flight at the end is waited for, up to `timeout`), and
/// hands the slots back for the next run.
pub async fn run_slots(
    slots: Vec<Box<dyn Transport>>,
    pacing: Pacing,
    duration: Duration,
    timeout: Duration,
) -> anyhow::Result<(Vec<Box<dyn Transport>>, RunStats)> {
    let schedule = Arc::new(Schedule::new(Instant::now(), pacing, duration));
    let mut tasks = Vec::with_capacity(slots.len());
    for mut slot in slots {
        let schedule = Arc::clone(&schedule);
        tasks.push(tokio::spawn(async move {
            let stats = drive_slot(slot.as_mut(), &schedule, timeout).await;
            (slot, stats)
        }));
    }
    let mut slots = Vec::with_capacity(tasks.len());
    let mut run = RunStats::empty();
    for task in tasks {
        let (slot, stats) = task
            .await
            .map_err(|e| anyhow::anyhow!("load slot task failed: {e}"))?;
        slots.push(slot);
        run.merge_slot(stats)?;
    }
    let end = run.last_done.unwrap_or_else(Instant::now);
    run.elapsed = match pacing {
        // Until the last response: a run that fell behind takes longer.
        Pacing::Open { .. } => end.saturating_duration_since(schedule.start()),
        Pacing::Closed => end
            .saturating_duration_since(schedule.start())
            .max(duration),
    };
    Ok((slots, run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Replies after a scripted delay: call `n` takes `delays[n]`, later
    /// calls take `default`.
    struct Scripted {
        calls: Arc<AtomicUsize>,
        delays: Arc<Vec<Duration>>,
        default: Duration,
    }

    impl Transport for Scripted {
        fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let delay = self.delays.get(n).copied().unwrap_or(self.default);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(())
            })
        }
    }

    fn scripted(slots: usize, delays: Vec<Duration>, default: Duration) -> Vec<Box<dyn Transport>> {
        let calls = Arc::new(AtomicUsize::new(0));
        let delays = Arc::new(delays);
        (0..slots)
            .map(|_| {
                Box::new(Scripted {
                    calls: Arc::clone(&calls),
                    delays: Arc::clone(&delays),
                    default,
                }) as Box<dyn Transport>
            })
            .collect()
    }

    const MS: Duration = Duration::from_millis(1);

    fn count_ms(h: &Histogram<u64>, ms: u64) -> u64 {
        h.count_at(ms * 1000)
    }

    #[test]
    fn intended_times_follow_the_rate() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, Pacing::Open { rate: 1000.0 }, Duration::from_secs(2));
        assert_eq!(s.total, 2000);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.intended(1500), t0 + Duration::from_millis(1500));
        let a = s.take(t0).expect("first ticket");
        let b = s.take(t0).expect("second ticket");
        assert_eq!((a.index, b.index), (0, 1));
        assert_eq!(b.intended, t0 + MS);
    }

    #[test]
    fn open_schedule_runs_out() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, Pacing::Open { rate: 10.0 }, Duration::from_millis(300));
        assert_eq!((0..10).filter_map(|_| s.take(t0)).count(), 3);
    }

    #[test]
    fn queued_tickets_count_from_intended_time() {
        let t0 = Instant::now();
        let queued = Ticket {
            index: 3,
            intended: t0,
            picked_up: t0 + 5 * MS,
        };
        assert_eq!(latency_start(&queued, t0 + 5 * MS), t0);
        // A slot waited for this ticket; the timer woke it 1 ms late: that
        // millisecond is the generator's, not the server's.
        let waited = Ticket {
            index: 4,
            intended: t0 + 10 * MS,
            picked_up: t0,
        };
        assert_eq!(latency_start(&waited, t0 + 11 * MS), t0 + 11 * MS);
    }

    /// One connection, 100 req/s, 1 ms responses, but the first response
    /// stalls for 50 ms. The four requests scheduled during the stall queue
    /// behind it and their latency grows: 41, 32, 23, 14 and 5 ms. A
    /// closed-loop measurement would see one slow request and nineteen fast
    /// ones.
    #[tokio::test(start_paused = true)]
    async fn stalled_response_makes_queued_latency_grow() {
        let slots = scripted(1, vec![50 * MS], MS);
        let (_, run) = run_slots(
            slots,
            Pacing::Open { rate: 100.0 },
            200 * MS,
            Duration::from_secs(5),
        )
        .await
        .expect("run");
        assert_eq!(run.ok, 20);
        assert_eq!(run.errors, 0);
        for ms in [50, 41, 32, 23, 14, 5] {
            assert_eq!(count_ms(&run.latency, ms), 1, "one request at {ms} ms");
        }
        assert_eq!(count_ms(&run.latency, 1), 14);
        assert_eq!(run.latency.len(), 20);
    }

    /// With a second connection free, the stall delays only the stalled
    /// request; when both stall, tickets queue again.
    #[tokio::test(start_paused = true)]
    async fn free_connections_absorb_a_stall() {
        let slots = scripted(2, vec![50 * MS], MS);
        let (_, run) = run_slots(
            slots,
            Pacing::Open { rate: 100.0 },
            200 * MS,
            Duration::from_secs(5),
        )
        .await
        .expect("run");
        assert_eq!(run.ok, 20);
        assert_eq!(count_ms(&run.latency, 50), 1);
        assert_eq!(count_ms(&run.latency, 1), 19);

        let slots = scripted(2, vec![50 * MS, 50 * MS], MS);
        let (_, run) = run_slots(
            slots,
            Pacing::Open { rate: 100.0 },
            200 * MS,
            Duration::from_secs(5),
        )
        .await
        .expect("run");
        assert_eq!(count_ms(&run.latency, 50), 2);
        for ms in [31, 22, 13, 4] {
            assert_eq!(count_ms(&run.latency, ms), 1, "one request at {ms} ms");
        }
        assert_eq!(count_ms(&run.latency, 1), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_sends_back_to_back() {
        let slots = scripted(2, vec![], 10 * MS);
        let (slots, run) = run_slots(slots, Pacing::Closed, 100 * MS, Duration::from_secs(5))
            .await
            .expect("run");
        assert_eq!(slots.len(), 2);
        assert_eq!(run.ok, 20);
        assert_eq!(count_ms(&run.latency, 10), 20);
        assert_eq!(run.elapsed, 100 * MS);
    }

    struct Failing;
    impl Transport for Failing {
        fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
            Box::pin(async { Err(anyhow::anyhow!("status 503")) })
        }
    }

    struct Hanging;
    impl Transport for Hanging {
        fn call(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_timeouts_are_counted_not_timed() {
        let slots: Vec<Box<dyn Transport>> = vec![Box::new(Failing), Box::new(Hanging)];
        let (_, run) = run_slots(slots, Pacing::Open { rate: 100.0 }, 100 * MS, 30 * MS)
            .await
            .expect("run");
        assert_eq!(run.ok, 0);
        assert_eq!(run.errors, 10);
        assert_eq!(run.latency.len(), 0);
        assert!(
            run.error_samples.iter().any(|e| e == "status 503"),
            "{:?}",
            run.error_samples
        );
        assert!(
            run.error_samples
                .iter()
                .any(|e| e.starts_with("no response within")),
            "{:?}",
            run.error_samples
        );
    }
}
