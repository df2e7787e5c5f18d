//! The fuzz harness shared by every target in `tests/`: a time budget from the environment, a
//! counting global allocator, a CPU-time limit per input and a watchdog for hangs, and
//! mutators that turn valid seed inputs into the nearly valid ones that reach deep states.
//!
//! Inputs are [`proptest`] strategies, so a failure shrinks to a small input; the loop is our
//! own ([`fuzz`]) because proptest's runner counts cases, not seconds. See README.md for the
//! environment variables and how to run a target for an hour.

use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

pub mod alloc;
pub mod mutate;

/// Seconds each fuzz function runs for when `WEFT_FUZZ_SECONDS` is unset: CI's budget.
pub const DEFAULT_SECONDS: f64 = 2.0;
/// CPU milliseconds one input may take when `WEFT_FUZZ_CASE_MS` is unset.
pub const DEFAULT_CASE_MS: u64 = 1000;
/// Wall-clock seconds after which the watchdog calls an input a hang and aborts.
pub const HANG_SECONDS: u64 = 30;

/// Environment variables of the harness.
pub mod env {
    /// Seconds per fuzz function (default [`super::DEFAULT_SECONDS`]).
    pub const SECONDS: &str = "WEFT_FUZZ_SECONDS";
    /// Stop after this many inputs, whichever of the two comes first.
    pub const CASES: &str = "WEFT_FUZZ_CASES";
    /// The RNG seed (a u64); random when unset, and printed with every failure.
    pub const SEED: &str = "WEFT_FUZZ_SEED";
    /// Replay one input: with the failure's seed, regenerate input N, print it and run it.
    pub const CASE: &str = "WEFT_FUZZ_CASE";
    /// CPU milliseconds one input may take (default [`super::DEFAULT_CASE_MS`]).
    pub const CASE_MS: &str = "WEFT_FUZZ_CASE_MS";
}

/// A generated input: its size (the allocation bound is proportional to it) and how a
/// failure shows it.
pub trait InputSize: Debug {
    fn input_size(&self) -> usize;
    /// The input as a failure report shows it (bytes as a literal to paste into a test).
    fn show(&self) -> String {
        format!("{self:#?}")
    }
}

impl InputSize for Vec<u8> {
    fn input_size(&self) -> usize {
        self.len()
    }
    fn show(&self) -> String {
        byte_literal(self)
    }
}

impl InputSize for String {
    fn input_size(&self) -> usize {
        self.len()
    }
}

/// Numbers that steer a target (cut points, limits) are not input the parser reads.
impl InputSize for usize {
    fn input_size(&self) -> usize {
        0
    }
}

impl InputSize for serde_json::Value {
    fn input_size(&self) -> usize {
        serde_json::to_vec(self).map_or(0, |v| v.len())
    }
}

impl<A: InputSize, B: InputSize> InputSize for (A, B) {
    fn input_size(&self) -> usize {
        self.0.input_size() + self.1.input_size()
    }
    fn show(&self) -> String {
        format!("(\n{},\n{},\n)", self.0.show(), self.1.show())
    }
}

impl<T: InputSize> InputSize for Vec<T> {
    fn input_size(&self) -> usize {
        self.iter().map(InputSize::input_size).sum()
    }
}

/// Peak bytes one input may have live at once: 64 per input byte plus 1 MiB.
pub fn alloc_bound(input_size: usize) -> usize {
    input_size.saturating_mul(64).saturating_add(1 << 20)
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={v:?} does not parse"),
    }
}

/// What a run of [`fuzz`] did.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub cases: u64,
    pub elapsed: Duration,
    pub max_case_cpu: Duration,
    pub max_peak_bytes: usize,
}

/// The CPU time this thread has used: immune to the other test threads sharing two cores.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

thread_local! {
    /// Set while an input runs, so the panic hook stays quiet for panics we catch and report.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
}

struct Measured {
    cpu: Duration,
    peak: usize,
}

/// Runs the property on one input: a panic, too much CPU or too much memory is a failure.
fn run_one<T: InputSize>(
    value: &T,
    case_limit: Duration,
    property: &impl Fn(&T) -> Result<(), String>,
) -> Result<Measured, String> {
    let size = value.input_size();
    QUIET.with(|q| q.set(true));
    let cpu0 = thread_cpu();
    alloc::reset_peak();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| property(value)));
    let peak = alloc::peak();
    let cpu = thread_cpu().saturating_sub(cpu0);
    QUIET.with(|q| q.set(false));
    match outcome {
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic)".into());
            return Err(format!("panicked: {msg}"));
        }
        Ok(Err(msg)) => return Err(format!("property failed: {msg}")),
        Ok(Ok(())) => {}
    }
    if cpu > case_limit {
        return Err(format!(
            "took {cpu:?} of CPU, more than the {case_limit:?} allowed ({}): a hang",
            env::CASE_MS
        ));
    }
    if peak > alloc_bound(size) {
        return Err(format!(
            "peak allocation {peak} bytes for a {size}-byte input, more than {} (64 x input + 1 MiB)",
            alloc_bound(size)
        ));
    }
    Ok(Measured { cpu, peak })
}

/// The watchdog: aborts the process when one input runs longer than [`HANG_SECONDS`] of wall
/// time, printing what to replay (a true hang never returns to the CPU-time check).
struct Watchdog {
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    /// `started_ms` holds when the current input started, in ms after `t0` (`u64::MAX`: none).
    fn start(
        name: &str,
        seed: u64,
        t0: Instant,
        case: Arc<AtomicU64>,
        started_ms: Arc<AtomicU64>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, name) = (stop.clone(), name.to_string());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = t0.elapsed().as_millis() as u64;
                let start = started_ms.load(Ordering::Relaxed);
                if start != u64::MAX && now.saturating_sub(start) > HANG_SECONDS * 1000 {
                    eprintln!(
                        "fuzz target {name}: input {} has run for more than {HANG_SECONDS} s: a hang. \
                         Replay it with {}={seed} {}={}",
                        case.load(Ordering::Relaxed),
                        env::SEED,
                        env::CASE,
                        case.load(Ordering::Relaxed),
                    );
                    std::process::abort();
                }
            }
        });
        Self { stop }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Generates inputs from `strategy` until the time budget (or case cap) is spent and checks
/// `property` on each: no panic, no `Err`, no more than the CPU limit, no more than
/// [`alloc_bound`] bytes live at the peak. A failure is shrunk and reported with its seed.
pub fn fuzz<S>(name: &str, strategy: S, property: impl Fn(&S::Value) -> Result<(), String>) -> Stats
where
    S: Strategy,
    S::Value: InputSize,
{
    install_quiet_hook();
    let seconds: f64 = env_parse(env::SECONDS).unwrap_or(DEFAULT_SECONDS);
    let max_cases: u64 = env_parse(env::CASES).unwrap_or(u64::MAX);
    let case_limit = Duration::from_millis(env_parse(env::CASE_MS).unwrap_or(DEFAULT_CASE_MS));
    let seed: u64 = env_parse(env::SEED).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (std::process::id() as u64) << 32
    });
    let replay: Option<u64> = env_parse(env::CASE);
    let mut seed_bytes = [0u8; 32];
    for (i, chunk) in seed_bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(seed.wrapping_add(i as u64)).to_le_bytes());
    }
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let case = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(u64::MAX));
    let t0 = Instant::now();
    let _watchdog = Watchdog::start(name, seed, t0, case.clone(), started.clone());
    let deadline = t0 + Duration::from_secs_f64(seconds);
    let mut stats = Stats {
        cases: 0,
        elapsed: Duration::ZERO,
        max_case_cpu: Duration::ZERO,
        max_peak_bytes: 0,
    };
    loop {
        let n = stats.cases;
        if let Some(r) = replay {
            if n > r {
                break;
            }
        } else if n >= max_cases || (n > 0 && Instant::now() >= deadline) {
            break;
        }
        let mut tree = match strategy.new_tree(&mut runner) {
            Ok(t) => t,
            Err(reason) => panic!("fuzz target {name}: cannot generate an input: {reason}"),
        };
        stats.cases += 1;
        if replay.is_some_and(|r| n < r) {
            continue;
        }
        if replay.is_some() {
            eprintln!(
                "fuzz target {name}: replaying input {n}: {}",
                tree.current().show()
            );
        }
        case.store(n, Ordering::Relaxed);
        started.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let value = tree.current();
        let result = run_one(&value, case_limit, &property);
        started.store(u64::MAX, Ordering::Relaxed);
        match result {
            Ok(m) => {
                stats.max_case_cpu = stats.max_case_cpu.max(m.cpu);
                stats.max_peak_bytes = stats.max_peak_bytes.max(m.peak);
            }
            Err(first) => {
                let (minimal, msg) = shrink(&mut tree, value, first, case_limit, &property);
                panic!(
                    "fuzz target {name} failed on input {n} (replay: {}={seed} {}={n}).\n\
                     {msg}\nminimal input ({} bytes): {}",
                    env::SEED,
                    env::CASE,
                    minimal.input_size(),
                    minimal.show(),
                );
            }
        }
    }
    stats.elapsed = t0.elapsed();
    eprintln!(
        "fuzz target {name}: {} inputs in {:.1?} (seed {seed}), slowest {:?} CPU, peak {} bytes",
        stats.cases, stats.elapsed, stats.max_case_cpu, stats.max_peak_bytes
    );
    stats
}

/// proptest's shrinking: simplify while the input still fails, step back when it passes.
fn shrink<T: InputSize + Debug>(
    tree: &mut impl ValueTree<Value = T>,
    value: T,
    msg: String,
    case_limit: Duration,
    property: &impl Fn(&T) -> Result<(), String>,
) -> (T, String) {
    let mut best = (value, msg);
    if !tree.simplify() {
        return best;
    }
    for _ in 0..4096 {
        let v = tree.current();
        match run_one(&v, case_limit, property) {
            Err(m) => {
                best = (v, m);
                if !tree.simplify() {
                    break;
                }
            }
            Ok(_) => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    best
}

/// Renders bytes as a Rust byte-string literal, for pasting a failure into a regression test.
pub fn byte_literal(bytes: &[u8]) -> String {
    let mut s = String::from("b\"");
    for &b in bytes {
        s.extend(std::ascii::escape_default(b).map(char::from));
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::any;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        vec(any::<u8>(), 0..64)
    }

    #[test]
    #[should_panic(expected = "panicked: boom")]
    fn a_panic_is_caught_shrunk_and_reported() {
        fuzz("test::panic", bytes(), |b| {
            assert!(b.len() < 10, "boom");
            Ok(())
        });
    }

    #[test]
    #[should_panic(expected = "peak allocation")]
    fn an_allocation_beyond_the_bound_fails() {
        fuzz("test::alloc", bytes(), |b| {
            let v = vec![0u8; alloc_bound(b.len()) + 1];
            std::hint::black_box(&v);
            Ok(())
        });
    }

    #[test]
    #[should_panic(expected = "of CPU")]
    fn an_input_over_the_cpu_limit_fails() {
        // One input that cannot shrink: each try costs a second.
        fuzz("test::cpu", proptest::strategy::Just(vec![1u8]), |_| {
            let t0 = thread_cpu();
            while thread_cpu() - t0 < Duration::from_millis(DEFAULT_CASE_MS + 50) {
                std::hint::black_box(0);
            }
            Ok(())
        });
    }

    #[test]
    fn the_failing_input_is_shrunk() {
        let r = panic::catch_unwind(|| {
            fuzz("test::shrink", bytes(), |b| {
                if b.iter().any(|&x| x >= 7) {
                    return Err("has a byte of 7 or more".into());
                }
                Ok(())
            })
        });
        let msg = r.expect_err("must fail");
        let msg = msg
            .downcast_ref::<String>()
            .expect("a formatted message")
            .clone();
        assert!(msg.contains("minimal input (1 bytes): b\"\\x07\""), "{msg}");
    }
}
