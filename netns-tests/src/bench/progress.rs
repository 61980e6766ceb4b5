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

/// Seconds left: the work not done yet at the pace seen so far, that pace starting from the
/// expected one (a second per expected second) and trusting what is measured as it adds up —
/// one quick first step alone would otherwise promise hours or seconds.
fn seconds_left(elapsed: f64, done: f64, total: f64) -> f64 {
    let prior = (total / 10.0).min(30.0);
    let pace = (elapsed + prior) / (done + prior);
    (total - done).max(0.0) * pace
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
        let left = seconds_left(self.started.elapsed().as_secs_f64(), self.done, self.total);
        format!("~{} left", clock(Duration::from_secs(left as u64)))
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

#[cfg(test)]
mod tests {
    use super::seconds_left;

    #[test]
    fn the_estimate_starts_from_the_plan_and_follows_the_measured_pace() {
        // Nothing done: the plan itself.
        assert_eq!(seconds_left(0.0, 0.0, 600.0), 600.0);
        // A tiny first step that took long does not promise hours.
        let early = seconds_left(1.0, 0.004, 600.0);
        assert!((590.0..630.0).contains(&early), "{early}");
        // Half done in twice the expected time: about twice the plan for the rest.
        let late = seconds_left(600.0, 300.0, 600.0);
        assert!((560.0..600.0).contains(&late), "{late}");
        // Finished.
        assert_eq!(seconds_left(700.0, 600.0, 600.0), 0.0);
    }
}
