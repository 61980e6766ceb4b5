//! The progress bar: what is running, and the time left, estimated from the work done so far
//! (each step weighs what it is expected to cost, so a 10,000-Service fill counts for more
//! than a one-second load).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    started: Instant,
    done: f64,
    total: f64,
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

impl Progress {
    /// `total` in expected seconds. Drawn on stderr when it is a terminal; otherwise a line
    /// per step, so CI logs show progress too.
    pub fn new(total: f64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            bar,
            started: Instant::now(),
            done: 0.0,
            total: total.max(1.0),
        }
    }

    fn left(&self) -> String {
        if self.done <= 0.0 {
            return "estimating".into();
        }
        let rate = self.started.elapsed().as_secs_f64() / self.done;
        let left = ((self.total - self.done).max(0.0) * rate) as u64;
        format!("~{} left", clock(Duration::from_secs(left)))
    }

    /// Starts a step: what it is.
    pub fn step(&self, what: &str) {
        let line = format!("{what} ({})", self.left());
        self.bar.set_prefix(clock(self.started.elapsed()));
        if self.bar.is_hidden() {
            eprintln!("[{}] {line}", clock(self.started.elapsed()));
        } else {
            self.bar.set_message(line);
        }
    }

    /// Ends a step worth `weight` expected seconds.
    pub fn done(&mut self, weight: f64) {
        self.done += weight;
        self.bar
            .set_position((1000.0 * self.done / self.total).min(1000.0) as u64);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
