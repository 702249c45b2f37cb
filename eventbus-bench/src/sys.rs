//! Process figures from /proc: peak RSS (resettable) and CPU seconds.

/// Reset the peak RSS counter (VmHWM) of this process. Linux only; a no-op elsewhere.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the last reset, in bytes.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU seconds of process `pid` (or this process).
fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based); `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// Process figures over one measured run: created right before the clock starts.
pub(crate) struct Meter {
    cpu0: f64,
    /// The broker's pid and CPU seconds at start, when the bench started the broker itself.
    broker: Option<(u32, f64)>,
    /// The run's clock start.
    pub(crate) t0: std::time::Instant,
}

impl Meter {
    /// Reset peak RSS, take CPU baselines (this process and, if known, the broker), start the
    /// clock.
    pub(crate) fn start(broker_pid: Option<u32>) -> Meter {
        reset_peak_rss();
        let cpu0 = cpu_seconds(None);
        let broker = broker_pid.map(|p| (p, cpu_seconds(Some(p))));
        Meter {
            cpu0,
            broker,
            t0: std::time::Instant::now(),
        }
    }

    /// Peak RSS since start, and CPU seconds used by this process and by the broker (0 for a
    /// broker the bench did not start: its pid is unknown).
    pub(crate) fn stop(&self) -> (u64, f64, f64) {
        let broker = self.broker.map_or(0.0, |(p, c0)| cpu_seconds(Some(p)) - c0);
        (peak_rss_bytes(), cpu_seconds(None) - self.cpu0, broker)
    }
}
