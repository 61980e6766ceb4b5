//! The benchmark's clients, run by `kpx-workload --client` inside a pod's namespace and its
//! node's cgroup (so eBPF's socket LB applies to them as to any pod). Each is bounded by its
//! count and by a deadline.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use crate::traffic::{any_address, http_reset_once, read_one_response, Outcome};

/// What a latency run prints: each request's latency in µs (-1 for a failure) on one line,
/// then the run's wall time.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub latencies_us: Vec<f64>,
    pub failed: usize,
    pub elapsed: Duration,
}

impl Run {
    pub fn print(&self) {
        let line: Vec<String> = self
            .latencies_us
            .iter()
            .map(|l| format!("{l:.0}"))
            .chain(std::iter::repeat_n("-1".to_string(), self.failed))
            .collect();
        println!("{}", line.join(" "));
        println!("elapsed_us {}", self.elapsed.as_micros());
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut lines = text.lines();
        let samples: Vec<f64> = lines
            .next()
            .unwrap_or("")
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let elapsed_us: u64 = lines
            .find_map(|l| l.strip_prefix("elapsed_us "))
            .ok_or_else(|| anyhow::anyhow!("the client printed no elapsed_us line: {text:?}"))?
            .trim()
            .parse()?;
        Ok(Self {
            failed: samples.iter().filter(|s| **s < 0.0).count(),
            latencies_us: samples.into_iter().filter(|s| *s >= 0.0).collect(),
            elapsed: Duration::from_micros(elapsed_us),
        })
    }

    /// Adds another slice of the same load: its samples, failures and time.
    pub fn absorb(&mut self, slice: Run) {
        self.latencies_us.extend(slice.latencies_us);
        self.failed += slice.failed;
        self.elapsed += slice.elapsed;
    }

    /// Successful requests per second of wall time.
    pub fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn micros(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

/// `count` HTTP requests, each on a new connection reset after its answer (no TIME_WAIT left
/// behind), from `concurrency` threads at once, over `targets` in turn.
pub fn new_connections(
    targets: &[SocketAddr],
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> Run {
    let concurrency = concurrency.clamp(1, count.max(1));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|t| {
            let share = count / concurrency + usize::from(t < count % concurrency);
            let targets = targets.to_vec();
            std::thread::spawn(move || {
                let mut out = Vec::with_capacity(share);
                for j in 0..share {
                    let target = targets[(t + j * concurrency) % targets.len().max(1)];
                    let start = Instant::now();
                    out.push(match http_reset_once(target, timeout) {
                        Outcome::Answer { .. } => micros(start),
                        _ => -1.0,
                    });
                }
                out
            })
        })
        .collect();
    let samples: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    let elapsed = started.elapsed();
    Run {
        failed: count - samples.iter().filter(|s| **s >= 0.0).count(),
        latencies_us: samples.into_iter().filter(|s| *s >= 0.0).collect(),
        elapsed,
    }
}

/// `count` HTTP requests one after another on one kept-alive connection.
pub fn keepalive(target: SocketAddr, count: usize, timeout: Duration) -> Run {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    let mut stream = TcpStream::connect_timeout(&target, timeout).ok();
    if let Some(s) = &stream {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(timeout));
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n");
    for _ in 0..count {
        let Some(s) = stream.as_mut() else { break };
        let start = Instant::now();
        if s.write_all(request.as_bytes()).is_ok() && read_one_response(s).is_some() {
            latencies.push(micros(start));
        } else {
            // A broken connection ends the run: the rest count as failed.
            stream = None;
        }
    }
    Run {
        failed: count - latencies.len(),
        latencies_us: latencies,
        elapsed: started.elapsed(),
    }
}

/// `count` request/response exchanges over one UDP flow (one connected socket), one at a
/// time, like netperf's UDP_RR.
pub fn udp_flow(target: SocketAddr, count: usize, timeout: Duration) -> Run {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(count);
    let socket = UdpSocket::bind(any_address(target, 0)).and_then(|s| {
        s.connect(target)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(s)
    });
    if let Ok(socket) = socket {
        let mut buf = [0u8; 512];
        for _ in 0..count {
            let start = Instant::now();
            if socket.send(b"ping").is_ok() && socket.recv(&mut buf).is_ok() {
                latencies.push(micros(start));
            }
        }
    }
    Run {
        failed: count - latencies.len(),
        latencies_us: latencies,
        elapsed: started.elapsed(),
    }
}

/// New connections to `target`, one after another, until one is answered by `pod` or
/// `deadline` passes; the wall-clock time of that answer (for network programming latency:
/// the write happened in another process, so only the wall clock is shared).
pub fn until_answered_by(target: SocketAddr, pod: &str, deadline: Duration) -> Option<SystemTime> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Outcome::Answer { pod: p, .. } = http_reset_once(target, Duration::from_millis(200))
        {
            if p == pod {
                return Some(SystemTime::now());
            }
        } else {
            // Refused or timed out (no endpoint yet): do not spin on errors.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_round_trip_through_their_printed_form() {
        let text = "120 130 -1 140\nelapsed_us 2000\n";
        let run = Run::parse(text).expect("parse");
        assert_eq!(run.latencies_us, vec![120.0, 130.0, 140.0]);
        assert_eq!(run.failed, 1);
        assert_eq!(run.elapsed, Duration::from_millis(2));
        assert!((run.rate() - 1500.0).abs() < 1e-6);
        assert!(Run::parse("1 2 3\n").is_err());
        assert!(Run::parse("1 x\nelapsed_us 5\n").is_err());
    }

    #[test]
    fn clients_measure_a_local_server() {
        // A real server on loopback: the workload's HTTP and UDP.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                    loop {
                        // One request: header lines up to the blank one.
                        let mut line = String::new();
                        loop {
                            line.clear();
                            match std::io::BufRead::read_line(&mut reader, &mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => {}
                            }
                        }
                        let body = "srv 127.0.0.1:1\n";
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_addr = udp.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(b"srv 127.0.0.1:1\n", peer);
            }
        });
        let timeout = Duration::from_secs(2);
        let run = new_connections(&[http, http], 20, 3, timeout);
        assert_eq!((run.latencies_us.len(), run.failed), (20, 0));
        let run = keepalive(http, 20, timeout);
        assert_eq!((run.latencies_us.len(), run.failed), (20, 0));
        let run = udp_flow(udp_addr, 20, timeout);
        assert_eq!((run.latencies_us.len(), run.failed), (20, 0));
        assert!(until_answered_by(http, "srv", timeout).is_some());
        assert!(until_answered_by(http, "other", Duration::from_millis(50)).is_none());
    }
}
