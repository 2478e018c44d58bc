//! A fixed team of threads that spin between the parallel loops of one short inference pass.
//!
//! Why: a 1 x 16 pass runs ~40 parallel loops of a few tens of microseconds each. On rayon the
//! idle thread goes to sleep between them and has to be woken through the kernel for the next
//! one (`perf`: futex sleep, wake-up and `sched_yield` ~15% of the pass on 2 cores). The team's
//! helpers instead spin for a while after each loop, as ONNX Runtime's and OpenMP's pools do,
//! so the next loop starts within a fraction of a microsecond; the calling thread takes a
//! share of every loop itself. Work is split statically, in contiguous blocks (every loop here
//! has equal-sized items), so each thread walks its own address range front to back.
//!
//! Passes opt in with [`with_team`]; every other caller gets rayon. A second thread asking
//! while the team is busy, or a loop nested inside a team loop, runs serially on its own thread
//! (waking rayon's threads would only add more runnable threads than cores).

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for the next loop before it parks. Between the loops of one pass
/// the gaps are microseconds; after the pass the helper gives the core back this soon.
const SPIN: Duration = Duration::from_micros(250);

thread_local! {
    /// Whether this thread's parallel loops go to the team (set by [`with_team`]).
    static USE_TEAM: Cell<bool> = const { Cell::new(false) };
}

/// Whether an inference pass of `tokens` rows in `dtype` suits [`with_team`]: f32 passes of
/// at most [`MAX_TOKENS`] tokens on CPUs with a panel kernel (AVX-512 or AVX2) run every
/// product of a loaded model (its weights packed at load) on it, whose loops are the team's;
/// half-precision passes run the general GEMM, which threads itself over rayon.
pub fn suits(tokens: usize, dtype: candle_core::DType) -> bool {
    dtype == candle_core::DType::F32
        && tokens <= MAX_TOKENS
        && crate::panel_gemm::PanelWeights::available()
}

/// Most tokens of a pass run on the team: longer passes run for milliseconds per loop, where
/// rayon's wake-ups cost nothing that matters and its work stealing evens out the threads.
pub const MAX_TOKENS: usize = 512;

/// Runs `f` with this thread's parallel kernel loops on the spinning team instead of rayon.
/// Meant for short inference passes whose loops all fit the team (no rayon-parallel GEMM
/// inside: the team's helpers would spin against rayon's threads for the cores).
pub fn with_team<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            USE_TEAM.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(USE_TEAM.with(|flag| flag.replace(true)));
    f()
}

/// Whether this thread's parallel loops go to the team now (inside [`with_team`]).
pub fn active() -> bool {
    USE_TEAM.with(Cell::get)
}

/// `f(i)` for every `i` in `0..count`: on the team inside [`with_team`], else on rayon.
pub(crate) fn parallel_for(count: usize, f: impl Fn(usize) + Sync + Send) {
    parallel_for_init(count, || (), |(), i| f(i));
}

/// `f(state, i)` for every `i` in `0..count`, `state` made by `init` once per thread and
/// block: on the team inside [`with_team`], else on rayon (`for_each_init`).
pub(crate) fn parallel_for_init<S>(
    count: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    if count == 0 {
        return;
    }
    if active() {
        let block = |member: usize, members: usize| {
            let (start, end) = (count * member / members, count * (member + 1) / members);
            if start < end {
                let mut state = init();
                (start..end).for_each(|i| f(&mut state, i));
            }
        };
        match Team::get() {
            Some(team) => {
                if team.run(&block) {
                    return;
                }
                // Busy (another thread's pass, or a loop nested in one of ours): serially,
                // rather than waking rayon's threads to compete with the spinning helpers.
                block(0, 1);
            }
            None => block(0, 1),
        }
        return;
    }
    use rayon::prelude::*;
    (0..count)
        .into_par_iter()
        .for_each_init(init, |state, i| f(state, i));
}

/// `f(index, chunk)` for the consecutive `chunk_len`-element chunks of `data` (the last one
/// shorter), in parallel as [`parallel_for`]: a `par_chunks_mut` that also runs on the team.
pub(crate) fn parallel_chunks_mut<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let (len, chunk_len) = (data.len(), chunk_len.max(1));
    let base = crate::kernels::SharedMut(data.as_mut_ptr());
    parallel_for(len.div_ceil(chunk_len), |c| {
        let start = c * chunk_len;
        // SAFETY: chunk c lies inside `data` (start < len) and no other index touches it;
        // `data` stays mutably borrowed until every chunk is done.
        let chunk = unsafe {
            std::slice::from_raw_parts_mut(base.get().add(start), chunk_len.min(len - start))
        };
        f(c, chunk);
    });
}

/// The work a loop hands every member: `(member, members)`.
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// The team: the calling thread is member 0, the helpers 1.. .
struct Team {
    helpers: Vec<Helper>,
    /// One loop at a time.
    busy: Mutex<()>,
    /// Bumped for every loop; helpers wait for it to move.
    epoch: AtomicUsize,
    /// The current loop, valid while `busy` is held and until every helper has reported.
    job: std::cell::UnsafeCell<Option<Job<'static>>>,
    /// Helpers finished with the current loop.
    done: AtomicUsize,
    /// Whether a helper's share of the current loop panicked.
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by the thread holding `busy`, before `epoch` is bumped
// (release), and read by helpers after they see the new epoch (acquire); it is not written
// again until every helper has reported `done`.
unsafe impl Sync for Team {}

struct Helper {
    thread: std::thread::Thread,
    parked: AtomicBool,
}

impl Team {
    /// The process's team, sized to rayon's thread count (so `RAYON_NUM_THREADS` sets both),
    /// started on first use; `None` when that is one thread or a helper could not start.
    fn get() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
        *TEAM.get_or_init(Team::start)
    }

    fn start() -> Option<&'static Team> {
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if helpers == 0 {
            return None;
        }
        // The helpers' handles are needed before the team can be shared with them: each
        // helper waits on a channel for the finished team's address.
        let mut senders = Vec::with_capacity(helpers);
        let mut handles = Vec::with_capacity(helpers);
        for member in 1..=helpers {
            let (send, receive) = std::sync::mpsc::channel::<&'static Team>();
            let spawned = std::thread::Builder::new()
                .name(format!("bert-team-{member}"))
                .spawn(move || {
                    if let Ok(team) = receive.recv() {
                        team.serve(member);
                    }
                });
            match spawned {
                Ok(handle) => {
                    senders.push(send);
                    handles.push(handle);
                }
                // Dropping the senders ends the helpers already started.
                Err(_) => return None,
            }
        }
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: handles
                .iter()
                .map(|h| Helper {
                    thread: h.thread().clone(),
                    parked: AtomicBool::new(false),
                })
                .collect(),
            busy: Mutex::new(()),
            epoch: AtomicUsize::new(0),
            job: std::cell::UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }));
        for send in senders {
            send.send(team).ok()?;
        }
        Some(team)
    }

    /// Runs `job(member, members)` on every member, the caller as member 0, and returns once
    /// all have finished; `false` (nothing run) when the team is busy.
    fn run(&self, job: Job<'_>) -> bool {
        let _busy = match self.busy.try_lock() {
            Ok(guard) => guard,
            // A panic that went through an earlier loop poisoned the lock; the team is intact.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        let members = self.helpers.len() + 1;
        // SAFETY: the lifetime is erased only for the duration of this call: helpers use
        // `job` between seeing the new epoch and reporting done, and this call does not return
        // (or unwind) before every helper has reported.
        unsafe {
            *self.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(job));
        }
        self.done.store(0, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for helper in &self.helpers {
            if helper.parked.swap(false, Ordering::SeqCst) {
                helper.thread.unpark();
            }
        }
        let own = catch_unwind(AssertUnwindSafe(|| job(0, members)));
        while self.done.load(Ordering::Acquire) < self.helpers.len() {
            std::hint::spin_loop();
        }
        // SAFETY: every helper has finished with the job.
        unsafe { *self.job.get() = None };
        let helper_panicked = self.panicked.swap(false, Ordering::Relaxed);
        if let Err(payload) = own {
            resume_unwind(payload);
        }
        if helper_panicked {
            panic!("a parallel kernel loop panicked on a team thread");
        }
        true
    }

    /// A helper's life: wait for a new epoch (spinning, then parked), run its share, report.
    fn serve(&self, member: usize) {
        let me = &self.helpers[member - 1];
        // Loops nested in a team loop run serially here too (the team is busy with this one).
        USE_TEAM.with(|flag| flag.set(true));
        let members = self.helpers.len() + 1;
        // The epoch the team started at: a loop posted before this thread got here still counts.
        let mut seen = 0;
        loop {
            let since = Instant::now();
            let mut spins = 0u32;
            loop {
                if self.epoch.load(Ordering::Acquire) != seen {
                    break;
                }
                spins = spins.wrapping_add(1);
                if !spins.is_multiple_of(1024) || since.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                // Park, unless a loop was posted after the check above: the poster bumps the
                // epoch before reading `parked`, and this thread sets `parked` before reading
                // the epoch again, so one of the two sees the other (both SeqCst).
                me.parked.store(true, Ordering::SeqCst);
                if self.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                me.parked.store(false, Ordering::SeqCst);
            }
            seen = self.epoch.load(Ordering::Acquire);
            // SAFETY: the poster wrote the job before bumping the epoch and keeps it alive
            // until this helper reports done below.
            if let Some(job) = unsafe { *self.job.get() } {
                if catch_unwind(AssertUnwindSafe(|| job(member, members))).is_err() {
                    self.panicked.store(true, Ordering::Relaxed);
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_on_the_team_and_on_rayon() {
        for use_team in [false, true] {
            for count in [0usize, 1, 2, 3, 17, 1000] {
                let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                let body = || parallel_for(count, |i| _ = hits[i].fetch_add(1, Ordering::Relaxed));
                if use_team {
                    with_team(body);
                } else {
                    body();
                }
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "team {use_team}, count {count}"
                );
            }
        }
    }

    #[test]
    fn chunks_cover_the_data_once_in_place() {
        for use_team in [false, true] {
            for (len, chunk) in [(0usize, 4usize), (1, 4), (10, 4), (12, 4), (1000, 7)] {
                let mut data = vec![0usize; len];
                let mut body = || {
                    parallel_chunks_mut(&mut data, chunk, |c, part| {
                        for (j, v) in part.iter_mut().enumerate() {
                            *v += c * chunk + j + 1;
                        }
                    })
                };
                if use_team {
                    with_team(body);
                } else {
                    body();
                }
                let expected: Vec<usize> = (1..=len).collect();
                assert_eq!(data, expected, "team {use_team}, {len} by {chunk}");
            }
        }
    }

    #[test]
    fn nested_loops_and_concurrent_callers_fall_back_and_finish() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    with_team(|| {
                        for _ in 0..200 {
                            parallel_for(4, |_| {
                                parallel_for(5, |_| _ = total.fetch_add(1, Ordering::Relaxed));
                            });
                        }
                    })
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 4 * 5);
    }

    #[test]
    fn a_panic_in_a_loop_reaches_the_caller_and_the_team_still_works() {
        let outcome = catch_unwind(|| with_team(|| parallel_for(64, |i| assert_ne!(i, 40))));
        assert!(outcome.is_err());
        let hits = AtomicUsize::new(0);
        with_team(|| parallel_for(64, |_| _ = hits.fetch_add(1, Ordering::Relaxed)));
        assert_eq!(hits.load(Ordering::Relaxed), 64);
        // The flag is restored after the unwinding pass.
        assert!(!USE_TEAM.with(Cell::get));
    }
}
