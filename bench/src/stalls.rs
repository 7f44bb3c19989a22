//! A witness for the machine itself: a thread that asks to sleep 1 ms at a time and
//! records how late it wakes. On a quiet machine it wakes within a fraction of a
//! millisecond; when the (virtual) machine is paused or no core is free for it, it sees
//! that pause — the same pause every request in flight sees, whatever the broker does.
//! Its cost is a thousand wake-ups a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How late a wake-up must be to count as a stall: the p99 mark of issue 5.
pub const STALL: Duration = Duration::from_millis(2);

const NAP: Duration = Duration::from_millis(1);

/// What the probe saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stalls {
    /// Wake-ups later than [`STALL`].
    pub count: u64,
    /// Their lateness, summed.
    pub total: Duration,
    /// The latest one.
    pub longest: Duration,
}

/// The running probe.
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Stalls>,
}

impl StallProbe {
    /// Starts the probe thread.
    pub fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("stall-probe".into())
            .spawn(move || {
                let mut seen = Stalls::default();
                while !flag.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    std::thread::sleep(NAP);
                    let late = asked.elapsed().saturating_sub(NAP);
                    if late > STALL {
                        seen.count += 1;
                        seen.total += late;
                        seen.longest = seen.longest.max(late);
                    }
                }
                seen
            })
            .expect("spawn the stall probe");
        Self { stop, thread }
    }

    /// Stops the probe and returns what it saw.
    pub fn finish(self) -> Stalls {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}
