//! End-to-end tests live in `tests/`. This library holds what they share: a TCP proxy on the
//! loopback that can throttle and cut real connections (HTTP or MQTT alike), Debian's
//! Mosquitto started on a free port, and the real models fetched from PyPI wheels at set-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A proxy from a fresh `127.0.0.1` port to `target`.
///
/// Downstream bytes (target → client) can be throttled; [`Proxy::cut_after`] arms a one-shot cut:
/// once that many downstream bytes passed in all, every open connection is closed mid-stream.
/// Later connections pass normally.
pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

struct Inner {
    target: std::sync::Mutex<SocketAddr>,
    /// Downstream bytes per second; 0 is unlimited.
    rate: AtomicU64,
    downstream: AtomicU64,
    cut_at: AtomicU64,
    cut_done: AtomicBool,
    cut: Notify,
    cuts: AtomicU64,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target: std::sync::Mutex::new(target),
            rate: AtomicU64::new(0),
            downstream: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
            cut_done: AtomicBool::new(false),
            cut: Notify::new(),
            cuts: AtomicU64::new(0),
        });
        let i = inner.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let i = i.clone();
                tokio::spawn(async move {
                    let target = *i.target.lock().expect("target lock");
                    if let Ok(upstream) = TcpStream::connect(target).await {
                        relay(i, client, upstream).await;
                    }
                });
            }
        });
        Ok(Proxy { addr, inner })
    }

    /// Send new connections to `target` (for a proxy started before its target existed).
    pub fn retarget(&self, target: SocketAddr) {
        *self.inner.target.lock().expect("target lock") = target;
    }

    /// Throttle downstream to about `bytes_per_s` (0: unlimited).
    pub fn throttle(&self, bytes_per_s: u64) {
        self.inner.rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// Cut every open connection once `n` more downstream bytes have passed.
    pub fn cut_after(&self, n: u64) {
        let now = self.inner.downstream.load(Ordering::Relaxed);
        self.inner.cut_done.store(false, Ordering::Relaxed);
        self.inner.cut_at.store(now + n, Ordering::Relaxed);
    }

    /// Close every open connection now (new ones still connect to the target).
    pub fn cut_now(&self) {
        self.inner.cuts.fetch_add(1, Ordering::Relaxed);
        self.inner.cut.notify_waiters();
    }

    /// Downstream bytes that reached clients.
    pub fn downstream(&self) -> u64 {
        self.inner.downstream.load(Ordering::Relaxed)
    }

    /// How many times connections were cut.
    pub fn cuts(&self) -> u64 {
        self.inner.cuts.load(Ordering::Relaxed)
    }
}

async fn relay(i: Arc<Inner>, client: TcpStream, upstream: TcpStream) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let i2 = i.clone();
    let down = async move {
        let mut buf = vec![0u8; 4096];
        loop {
            // Never pass more than the cut allows, so the cut lands on its byte.
            let before = i2.downstream.load(Ordering::Relaxed);
            let room = i2.cut_at.load(Ordering::Relaxed).saturating_sub(before);
            if room == 0 {
                // The first connection to hit the mark cuts them all, then disarms the cut.
                if !i2.cut_done.swap(true, Ordering::Relaxed) {
                    i2.cuts.fetch_add(1, Ordering::Relaxed);
                    i2.cut_at.store(u64::MAX, Ordering::Relaxed);
                    i2.cut.notify_waiters();
                }
                return;
            }
            let want = buf.len().min(room.min(usize::MAX as u64) as usize);
            let n = match ur.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
            i2.downstream.fetch_add(n as u64, Ordering::Relaxed);
            let rate = i2.rate.load(Ordering::Relaxed);
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
        }
    };
    // Whichever ends first (or a cut anywhere) closes both directions.
    let cut = i.cut.notified();
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut => {}
    }
}

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

pub struct Mosquitto {
    child: Child,
    pub port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start mosquitto on a free loopback port. Mosquitto cannot listen on port 0 and report the
/// port, so a free port is found first and the start is retried if another process takes it.
pub fn start_mosquitto(dir: &std::path::Path) -> Mosquitto {
    start_mosquitto_with(dir, |port| {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")).unwrap();
        conf
    })
}

/// As [`start_mosquitto`] with the configuration `conf(port)` writes (and returns the path of).
pub fn start_mosquitto_with(dir: &std::path::Path, conf: impl Fn(u16) -> std::path::PathBuf) -> Mosquitto {
    let _ = dir;
    assert!(
        std::path::Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: install it with `apt-get install mosquitto` (.ci/run does)"
    );
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = conf(port);
        let mut child =
            Command::new(MOSQUITTO).arg("-c").arg(&conf).stderr(Stdio::piped()).spawn().expect("start mosquitto");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Ready when it accepts TCP connections.
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Mosquitto { child, port };
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log: Vec<String> = rx.try_iter().collect();
        let _ = child.kill();
        eprintln!("mosquitto did not start on port {port}: {log:?}; retrying");
    }
    panic!("mosquitto would not start");
}

/// Mosquitto with the fleet's certificates, as `flotilla-server mosquitto` sets it up: mutual
/// TLS, the device id from each certificate, each device confined to its own topics. The fleet
/// CA is the one in `server_data_dir` (made there if missing, so a fleet started on that data
/// directory afterwards uses it). Returns the broker and its `mqtts://` URL.
pub fn start_mosquitto_tls(dir: &std::path::Path, server_data_dir: &std::path::Path) -> (Mosquitto, String) {
    let out = dir.join("mosquitto");
    let broker = start_mosquitto_with(dir, |port| {
        let conf = flotilla_server::pki::mosquitto_files(
            server_data_dir,
            &out,
            &[],
            flotilla_proto::topics::DEFAULT_PREFIX,
            &format!("127.0.0.1:{port}"),
        )
        .expect("writing mosquitto's files");
        // Mosquitto started as root runs as the mosquitto user: the key must be that user's, as
        // the operator's steps say, and the directories must let it in.
        let own = Command::new("chown").arg("mosquitto:").arg(out.join("broker.key")).status();
        assert!(own.is_ok_and(|s| s.success()), "chown mosquitto: broker.key");
        for d in [dir, &out] {
            let _ = Command::new("chmod").arg("o+x").arg(d).status();
        }
        conf
    });
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    (broker, url)
}

/// `target/test-assets/{kind}`, made by `agent/runtime/assets/{script}` (models from PyPI wheels
/// and their reference outputs) unless it already made it (the script checks its own recipe).
pub fn test_assets(kind: &str, script: &str) -> std::path::PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dest = repo.join("target/test-assets").join(kind);
    // One fetch at a time: tests of one binary run in parallel.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("bash").arg(repo.join("agent/runtime/assets").join(script)).arg(&dest).output();
    let out = out.unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(out.status.success(), "{script} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    dest
}
