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

impl Mosquitto {
    /// The broker's process id (to measure its CPU and memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
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

// PostgreSQL and an S3-compatible object store, each a child process on a free loopback port,
// for the scale-out configuration (the store in PostgreSQL, bundles in S3). `.ci/setup`
// installs both: Debian's postgresql, and moto's server mode from PyPI.

/// Debian's PostgreSQL 15 server binaries (package postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The role that owns `flotilla` and every database [`Postgres::create_database`] makes: it can
/// log in and create databases, and is not a superuser (as the server's role would be).
pub const PG_USER: &str = "flotilla";

/// A PostgreSQL cluster of the test's own, listening on `127.0.0.1:port` (trust authentication,
/// from that address and the unix socket only) and on a unix socket in its directory. Made for
/// speed, not durability: fsync, full-page writes and synchronous commit are off. Dropping it
/// stops it at once (immediate shutdown, then SIGKILL).
pub struct Postgres {
    child: Option<Child>,
    pub port: u16,
    /// The data directory.
    pub data: std::path::PathBuf,
    /// Where the unix socket and the server's log are.
    pub dir: std::path::PathBuf,
    /// The `postgres` OS user's (uid, gid) when the tests run as root, which PostgreSQL refuses.
    owner: Option<(u32, u32)>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown (SIGQUIT) takes the backends down too; SIGKILL would leave them.
            signal(&child, "QUIT");
            if wait_exit(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Start a fresh PostgreSQL cluster in `dir/postgres` (made here) on a free loopback port, with a
/// database `flotilla` owned by the role [`PG_USER`]. The cluster is initialised as the
/// `postgres` OS user when the tests run as root (the directory is given to that user, and `dir`
/// made traversable), else as the current user.
///
/// Measured on the project's machine (2 cores, with another build running): 1.4 to 1.7 s from
/// nothing to the `flotilla` database made, most of it initdb (about 1.2 s); starting the server
/// takes about 70 ms, a stop about 50 ms. A further database from [`Postgres::create_database`]
/// takes about 150 ms, so tests that need isolation should share one cluster and take a
/// database each rather than start clusters.
pub fn start_postgres(dir: &std::path::Path) -> Postgres {
    let initdb = std::path::Path::new(PG_BIN).join("initdb");
    assert!(
        initdb.exists(),
        "{} is missing: install PostgreSQL with `apt-get install postgresql` (.ci/setup does)",
        initdb.display()
    );
    let owner = if running_as_root() { Some(os_user("postgres")) } else { None };
    let base = dir.join("postgres");
    std::fs::create_dir_all(&base).unwrap();
    if let Some((uid, gid)) = owner {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(&base, Some(uid), Some(gid)).expect("chown the cluster's directory to postgres");
        // The postgres user must reach its directory through the test's (a 0700 tempdir).
        let mut mode = std::fs::metadata(dir).unwrap().permissions();
        mode.set_mode(mode.mode() | 0o001);
        std::fs::set_permissions(dir, mode).unwrap();
    }
    let data = base.join("data");
    let out = pg_command(owner, "initdb")
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        .stdin(Stdio::null())
        .output()
        .expect("running initdb");
    assert!(out.status.success(), "initdb failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    // Trust from the socket and 127.0.0.1 alone (initdb's -A trust also admits ::1).
    std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 trust\n").unwrap();
    let mut pg = Postgres { child: None, port: 0, data, dir: base, owner };
    for _ in 0..5 {
        pg.port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        match pg.spawn() {
            Ok(()) => {
                pg.psql(&format!("CREATE ROLE {PG_USER} LOGIN CREATEDB"));
                pg.create_database("flotilla");
                return pg;
            }
            Err(log) => eprintln!("postgres did not start on port {}: {log}; retrying", pg.port),
        }
    }
    panic!("postgres would not start");
}

impl Postgres {
    /// `postgres://flotilla@127.0.0.1:PORT/flotilla`
    pub fn url(&self) -> String {
        self.url_for("flotilla")
    }

    /// The URL of database `db` as [`PG_USER`].
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The superuser's URL (`postgres` on database `postgres`), e.g. to terminate backends.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Make an empty database `name` (lower-case letters, digits and `_`) owned by [`PG_USER`]
    /// and return its URL: a fresh database costs about 150 ms, a fresh cluster about 1.5 s.
    pub fn create_database(&self, name: &str) -> String {
        assert!(
            !name.is_empty()
                && name.len() < 64
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "database name {name:?}: use lower-case letters, digits and _"
        );
        self.psql(&format!("CREATE DATABASE \"{name}\" OWNER {PG_USER}"));
        self.url_for(name)
    }

    /// Run `sql` with psql as the superuser on database `postgres` over the unix socket; panics
    /// with psql's message if a statement fails. Returns what psql printed (unaligned, no
    /// headers: one row a line, `|` between columns).
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(std::path::Path::new(PG_BIN).join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres", "-h"])
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the server is running (between [`Postgres::stop`] and [`Postgres::start`] it is not).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stop the server as an outage would: fast shutdown (SIGINT: open connections are cut,
    /// committed data stays), waiting until it has exited. Nothing listens on the port until
    /// [`Postgres::start`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        signal(&child, "INT");
        if wait_exit(&mut child, Duration::from_secs(30)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("postgres did not stop within 30 s");
        }
    }

    /// Start the stopped server again on the same port and data directory, returning once it
    /// accepts connections.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        // The port was free while the server was down: someone may have taken it meanwhile.
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("postgres would not start again on port {}: {last}", self.port);
    }

    /// Start the server on `self.port` and wait until it is ready; on failure, its log.
    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.join(format!("postgres-{}.log", self.port));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let pid_file = self.data.join("postmaster.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = pg_command(self.owner, "postgres");
        cmd.arg("-D").arg(&self.data).arg("-p").arg(self.port.to_string());
        for setting in [
            "listen_addresses=127.0.0.1".to_string(),
            format!("unix_socket_directories={}", self.dir.display()),
            // Speed over durability: a test cluster is thrown away.
            "fsync=off".into(),
            "synchronous_commit=off".into(),
            "full_page_writes=off".into(),
            "wal_level=minimal".into(),
            "max_wal_senders=0".into(),
            "checkpoint_timeout=1h".into(),
            "max_wal_size=1GB".into(),
            "shared_buffers=32MB".into(),
            "max_connections=100".into(),
            "autovacuum=off".into(),
            "jit=off".into(),
            "huge_pages=off".into(),
            "timezone=UTC".into(),
            "log_min_messages=warning".into(),
            "logging_collector=off".into(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().expect("starting postgres");
        let started = std::time::Instant::now();
        // Ready when postmaster.pid says so (as pg_ctl -w checks) and the port answers.
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = child.try_wait() {
                return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
            }
            let ready = std::fs::read_to_string(&pid_file)
                .is_ok_and(|s| s.lines().nth(7).is_some_and(|status| status.trim() == "ready"));
            if ready && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!("not ready within 30 s: {}", std::fs::read_to_string(&log_path).unwrap_or_default()))
    }
}

/// A PostgreSQL program, run as the `postgres` OS user when `owner` is set. The program itself
/// becomes that user (no runuser in between), so the server's `Child` is the postmaster.
fn pg_command(owner: Option<(u32, u32)>, program: &str) -> Command {
    let mut cmd = Command::new(std::path::Path::new(PG_BIN).join(program));
    if let Some((uid, gid)) = owner {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// (uid, gid) of an OS user, from /etc/passwd.
fn os_user(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .unwrap_or_else(|| panic!("no OS user {name}: install PostgreSQL with `apt-get install postgresql`"))
}

/// Send SIG`name` to a child (std's `Child` sends SIGKILL alone; unsafe code is denied here).
fn signal(child: &Child, name: &str) {
    let _ = Command::new("sh").arg("-c").arg(format!("kill -{name} {}", child.id())).status();
}

/// Wait up to `limit` for a child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// moto's S3-compatible server (`python3 -m moto.server`), in memory, on `127.0.0.1:port`.
/// It takes any credentials: use [`S3Server::ACCESS_KEY`] and [`S3Server::SECRET_KEY`] in
/// [`S3Server::REGION`]. Dropping it kills it.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    pub const ACCESS_KEY: &str = "flotilla-test";
    pub const SECRET_KEY: &str = "flotilla-test-secret";
    pub const REGION: &str = "us-east-1";

    /// `http://127.0.0.1:PORT` (path-style requests: `endpoint/bucket/key`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Make bucket `name` (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let status = http_status(self.port, "PUT", &format!("/{name}")).expect("creating a bucket");
        assert_eq!(status, 200, "creating bucket {name}");
    }
}

/// Start moto's S3 server on a free loopback port; its log goes to `dir/moto-PORT.log`.
///
/// Measured on the project's machine (2 cores, with another build running): 0.8 to 1.2 s until
/// it answers HTTP.
pub fn start_s3(dir: &std::path::Path) -> S3Server {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log_path = dir.join(format!("moto-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting python3 -m moto.server");
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                assert!(
                    !log.contains("No module named"),
                    "moto's server mode is missing: `pip install 'moto[server]'` (.ci/setup does): {log}"
                );
                eprintln!("moto exited ({status}) on port {port}: {log}; retrying");
                break;
            }
            // Ready when it answers HTTP (the socket is bound before the app is loaded).
            if http_status(port, "GET", "/").is_ok() {
                return S3Server { child, port };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("moto's S3 server would not start");
}

/// The status code of a bodiless HTTP/1.1 request to `127.0.0.1:port`.
fn http_status(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {:?}", String::from_utf8_lossy(&head))))
}
