//! Load generator + auth/ACL tester for the in-process broker benches.
//!   loadgen bench   <addr> <N> <broker_pid> [concurrency=200] [window_s=60]
//!   loadgen acltest <addr>
//! Devices: raw-TCP MQTT 3.1.1 clients (src/mqtt.rs), one task each.
//! "Server" client: rumqttc 0.25 (v4), clean_session=false, QoS1, keepalive 60 s.
mod mqtt;

use bytes::BytesMut;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{sleep, sleep_until, timeout};

static BASE: OnceLock<Instant> = OnceLock::new();
fn now_us() -> u64 { BASE.get().unwrap().elapsed().as_micros() as u64 }

#[derive(Clone, Copy, Debug)]
enum Phase { Idle, Publish { t0: tokio::time::Instant, end: tokio::time::Instant }, Stop }

#[derive(Default)]
struct Shared {
    pub_sent: AtomicU64,
    puback_rcvd: AtomicU64,
    cmd_received: AtomicUsize,
    cmd_done_us: AtomicU64,
    cmd_expected: AtomicUsize,
    dev_dropped: AtomicUsize,
}

#[derive(Default)]
struct SrvStats { seen: HashSet<(u32, u32)>, dup: u64, lat_us: Vec<u64>, in_window: u64, window: (u64, u64), errors: u64 }

fn proc_cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}
fn proc_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }).unwrap_or(0)
}
fn proc_threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Threads:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    }).unwrap_or(0)
}

async fn handshake(addr: &str, i: usize) -> Result<(TcpStream, BytesMut), String> {
    let id = format!("dev-{i}");
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("tcp: {e}"))?;
    s.set_nodelay(true).ok();
    let mut buf = BytesMut::with_capacity(512);
    mqtt::send(&mut s, &mqtt::connect(&id, &id, &format!("pw-{i}-secret"), false, 60)).await.map_err(|e| format!("send: {e}"))?;
    let (h, b) = mqtt::read_packet(&mut s, &mut buf).await.map_err(|e| format!("connack: {e}"))?;
    if h != 0x20 || b.len() < 2 || b[1] != 0 { return Err(format!("connack refused rc={:?}", b.get(1))); }
    mqtt::send(&mut s, &mqtt::subscribe(1, &format!("flotilla/v1/d/{id}/cmd"), 1)).await.map_err(|e| format!("send: {e}"))?;
    loop {
        let (h, b) = mqtt::read_packet(&mut s, &mut buf).await.map_err(|e| format!("suback: {e}"))?;
        if h == 0x90 { if b.get(2) != Some(&1) { return Err(format!("suback rc={:?}", b.get(2))); } break; }
    }
    Ok((s, buf))
}

async fn device_loop(i: usize, n: usize, mut s: TcpStream, mut buf: BytesMut, sh: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let mut next_pub = far;
    let mut end = far;
    let mut last_tx = tokio::time::Instant::now();
    let (mut seq, mut pid, mut got_cmd) = (0u32, 0u16, false);
    let topic = format!("flotilla/v1/d/dev-{i}/metrics");
    loop {
        tokio::select! {
            r = tokio::io::AsyncReadExt::read_buf(&mut s, &mut buf) => {
                match r { Ok(0) | Err(_) => { sh.dev_dropped.fetch_add(1, Relaxed); return; } Ok(_) => {} }
                while let Ok(Some((h, body))) = mqtt::try_parse(&mut buf) {
                    match h >> 4 {
                        4 => { sh.puback_rcvd.fetch_add(1, Relaxed); }
                        3 => {
                            let (qos, t, p, _) = mqtt::parse_publish(h, body);
                            if qos == 1 { let _ = mqtt::send(&mut s, &mqtt::puback(p)).await; last_tx = tokio::time::Instant::now(); }
                            if t.ends_with("/cmd") && !got_cmd {
                                got_cmd = true;
                                let c = sh.cmd_received.fetch_add(1, Relaxed) + 1;
                                if c == sh.cmd_expected.load(Relaxed) { sh.cmd_done_us.store(now_us(), Relaxed); }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ = sleep_until(next_pub) => {
                if tokio::time::Instant::now() < end {
                    seq += 1; pid = pid.wrapping_add(1).max(1);
                    let mut payload = format!("{i},{seq},{}", now_us()).into_bytes();
                    payload.resize(200, b' ');
                    if mqtt::send(&mut s, &mqtt::publish_qos1(pid, &topic, &payload)).await.is_err() { sh.dev_dropped.fetch_add(1, Relaxed); return; }
                    sh.pub_sent.fetch_add(1, Relaxed);
                    last_tx = tokio::time::Instant::now();
                    next_pub += Duration::from_secs(10);
                } else { next_pub = far; }
            }
            _ = sleep_until(last_tx + Duration::from_secs(30)) => {
                let _ = mqtt::send(&mut s, &mqtt::PINGREQ).await; last_tx = tokio::time::Instant::now();
            }
            r = phase.changed() => {
                if r.is_err() { return; }
                let p = *phase.borrow();
                match p {
                    Phase::Publish { t0, end: e } => { next_pub = t0 + Duration::from_millis((i as u64 * 10_000) / n as u64); end = e; }
                    Phase::Stop => return,
                    Phase::Idle => {}
                }
            }
        }
    }
}

async fn bench(addr: String, n: usize, bpid: u32, conc: usize, window_s: u64) {
    let sh = Arc::new(Shared::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Idle);
    let (host, port) = addr.rsplit_once(':').unwrap();

    // ---- server client (rumqttc) ----
    let mut o = MqttOptions::new("flotilla-server", host, port.parse().unwrap());
    o.set_credentials("flotilla-server", "srvpw").set_clean_session(false)
        .set_keep_alive(Duration::from_secs(60)).set_max_packet_size(1 << 20, 1 << 20)
        .set_request_channel_capacity(n + 100);
    let (client, mut el) = AsyncClient::new(o, n + 100);
    let srv = Arc::new(Mutex::new(SrvStats::default()));
    let srv2 = srv.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/metrics") {
                        let t = now_us();
                        let s = String::from_utf8_lossy(&p.payload);
                        let mut it = s.trim_end().split(',');
                        let (i, q, sent): (u32, u32, u64) = (it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap());
                        let mut st = srv2.lock().unwrap();
                        if st.seen.insert((i, q)) {
                            st.lat_us.push(t - sent);
                            if t >= st.window.0 && t < st.window.1 { st.in_window += 1; }
                        } else { st.dup += 1; }
                    }
                }
                Ok(_) => {}
                Err(e) => { eprintln!("server client error: {e}"); srv2.lock().unwrap().errors += 1; sleep(Duration::from_millis(500)).await; }
            }
        }
    });
    client.subscribe("flotilla/v1/d/+/metrics", QoS::AtLeastOnce).await.unwrap();
    sleep(Duration::from_secs(1)).await;
    let rss_idle = proc_rss_kb(bpid);

    // ---- phase 1: connect N devices, `conc` handshakes in flight ----
    let sem = Arc::new(Semaphore::new(conc));
    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let t_conn = Instant::now();
    for i in 0..n {
        let (addr, sh, sem, res_tx, prx) = (addr.clone(), sh.clone(), sem.clone(), res_tx.clone(), phase_rx.clone());
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await.unwrap();
            let r = timeout(Duration::from_secs(30), handshake(&addr, i)).await.unwrap_or_else(|_| Err("timeout".into()));
            drop(permit);
            match r {
                Ok((s, buf)) => { let _ = res_tx.send(Ok(())); device_loop(i, n, s, buf, sh, prx).await; }
                Err(e) => { let _ = res_tx.send(Err(e)); }
            }
        });
    }
    let (mut ok, mut errs, mut last_ok) = (0usize, std::collections::BTreeMap::<String, usize>::new(), Duration::ZERO);
    for _ in 0..n {
        match res_rx.recv().await.unwrap() {
            Ok(()) => { ok += 1; last_ok = t_conn.elapsed(); }
            Err(e) => { let k: String = e.chars().take(40).collect(); *errs.entry(k).or_default() += 1; }
        }
    }
    let connect_all = t_conn.elapsed();
    eprintln!("connected {ok}/{n} in {:.2}s (last ok at {:.2}s) errors={errs:?}", connect_all.as_secs_f64(), last_ok.as_secs_f64());
    sleep(Duration::from_secs(5)).await;
    let rss_conn = proc_rss_kb(bpid);
    let alive_before = ok - sh.dev_dropped.load(Relaxed);

    // ---- phase 2: telemetry for window_s seconds ----
    let t0 = tokio::time::Instant::now();
    let end = t0 + Duration::from_secs(window_s);
    { let mut st = srv.lock().unwrap(); st.window = (now_us(), now_us() + window_s * 1_000_000); }
    let cpu0 = proc_cpu_ticks(bpid); let me0 = proc_cpu_ticks(std::process::id()); let tw = Instant::now();
    phase_tx.send(Phase::Publish { t0, end }).unwrap();
    let mut rss_max = 0;
    while tokio::time::Instant::now() < end { sleep(Duration::from_secs(1)).await; rss_max = rss_max.max(proc_rss_kb(bpid)); }
    let wsecs = tw.elapsed().as_secs_f64();
    let cpu_pct = (proc_cpu_ticks(bpid) - cpu0) as f64 / 100.0 / wsecs * 100.0;
    let me_pct = (proc_cpu_ticks(std::process::id()) - me0) as f64 / 100.0 / wsecs * 100.0;
    let rss_steady = proc_rss_kb(bpid);
    let sent = sh.pub_sent.load(Relaxed);
    // drain
    let mut waited = 0;
    while waited < 20 { sleep(Duration::from_secs(1)).await; waited += 1; if srv.lock().unwrap().seen.len() as u64 >= sent { break; } }
    let (uniq, in_win, dup, mut lat, srv_err) = { let st = srv.lock().unwrap(); (st.seen.len() as u64, st.in_window, st.dup, st.lat_us.clone(), st.errors) };
    lat.sort_unstable();
    let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0 };

    // ---- phase 3: fan-out one cmd to every device ----
    let alive = ok - sh.dev_dropped.load(Relaxed);
    sh.cmd_expected.store(alive, Relaxed);
    let f0 = now_us(); let tf = Instant::now();
    let payload = vec![b'c'; 100];
    for i in 0..n { client.publish(format!("flotilla/v1/d/dev-{i}/cmd"), QoS::AtLeastOnce, false, payload.clone()).await.unwrap(); }
    let enqueue = tf.elapsed();
    let mut fan_ok = true;
    while sh.cmd_received.load(Relaxed) < alive { if tf.elapsed() > Duration::from_secs(120) { fan_ok = false; break; } sleep(Duration::from_millis(10)).await; }
    let fan_s = if fan_ok { (sh.cmd_done_us.load(Relaxed) - f0) as f64 / 1e6 } else { f64::NAN };
    let rss_end = proc_rss_kb(bpid);
    let res = format!(
        "RESULT n={n} connected={ok} connect_s={:.2} conn_errors={:?} alive_before_pub={alive_before} offered_msgps={:.1} delivered_msgps={:.1} sent={sent} received_unique={uniq} lost={} dup={dup} pubacks={} lat_ms_p50={:.1} p99={:.1} max={:.1} fanout_devices={}/{alive} fanout_s={:.2} fanout_enqueue_s={:.2} broker_cpu_pct={:.1} loadgen_cpu_pct={:.1} rss_idle_mb={:.1} rss_connected_mb={:.1} rss_steady_mb={:.1} rss_max_window_mb={:.1} rss_end_mb={:.1} broker_threads={} dev_dropped={} srv_client_errors={srv_err}",
        connect_all.as_secs_f64(), errs, sent as f64 / window_s as f64, in_win as f64 / window_s as f64, sent as i64 - uniq as i64,
        sh.puback_rcvd.load(Relaxed), pct(0.5), pct(0.99), pct(1.0), sh.cmd_received.load(Relaxed), fan_s, enqueue.as_secs_f64(), cpu_pct, me_pct,
        rss_idle as f64 / 1024.0, rss_conn as f64 / 1024.0, rss_steady as f64 / 1024.0, rss_max as f64 / 1024.0, rss_end as f64 / 1024.0, proc_threads(bpid), sh.dev_dropped.load(Relaxed));
    println!("{res}");
    let _ = phase_tx.send(Phase::Stop);
    sleep(Duration::from_millis(300)).await;
}

// ---------------- auth / ACL tests ----------------
async fn raw(addr: &str, cid: &str, user: &str, pass: &str) -> (Option<TcpStream>, BytesMut, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    mqtt::send(&mut s, &mqtt::connect(cid, user, pass, true, 60)).await.unwrap();
    match timeout(Duration::from_secs(5), mqtt::read_packet(&mut s, &mut buf)).await {
        Ok(Ok((0x20, b))) => { let rc = b[1]; (if rc == 0 { Some(s) } else { None }, buf, format!("CONNACK rc={rc}")) }
        Ok(Ok((h, _))) => (None, buf, format!("unexpected packet {h:#x}")),
        Ok(Err(e)) => (None, buf, format!("connection closed without CONNACK ({e})")),
        Err(_) => (None, buf, "timeout waiting CONNACK".into()),
    }
}
async fn sub(s: &mut TcpStream, buf: &mut BytesMut, pid: u16, f: &str) -> String {
    mqtt::send(s, &mqtt::subscribe(pid, f, 1)).await.unwrap();
    loop {
        match timeout(Duration::from_secs(3), mqtt::read_packet(s, buf)).await {
            Ok(Ok((0x90, b))) => return format!("SUBACK rc={:#04x}", b[2]),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return format!("closed ({e})"),
            Err(_) => return "timeout".into(),
        }
    }
}
/// wait up to `d` for: a PUBACK (returns "puback"), an incoming PUBLISH (returns "publish <topic>"), close, or timeout
async fn wait_evt(s: &mut TcpStream, buf: &mut BytesMut, d: Duration) -> String {
    match timeout(d, mqtt::read_packet(s, buf)).await {
        Ok(Ok((h, b))) if h >> 4 == 4 => format!("puback pid={}", u16::from_be_bytes([b[0], b[1]])),
        Ok(Ok((h, b))) if h >> 4 == 3 => { let (q, t, p, _) = mqtt::parse_publish(h, b); if q == 1 { mqtt::send(s, &mqtt::puback(p)).await.ok(); } format!("publish {t}") }
        Ok(Ok((h, _))) => format!("other {h:#x}"),
        Ok(Err(e)) => format!("closed ({e})"),
        Err(_) => "nothing (timeout)".into(),
    }
}
fn check(name: &str, got: &str, pass: bool) { println!("[{}] {name}: {got}", if pass { "PASS" } else { "FAIL" }); }

async fn acltest(addr: String) {
    let a = addr.as_str();
    let (_, _, r) = raw(a, "dev-5", "dev-5", "WRONG").await; check("bad password refused", &r, !r.contains("rc=0"));
    let (_, _, r) = raw(a, "dev-5", "nobody", "x").await; check("unknown user refused", &r, !r.contains("rc=0"));
    let (_, _, r) = raw(a, "dev-6", "dev-5", "pw-5-secret").await; check("client-id != username refused", &r, !r.contains("rc=0"));
    let (s1, mut b1, r) = raw(a, "dev-1", "dev-1", "pw-1-secret").await; check("good password accepted (dev-1)", &r, s1.is_some());
    let mut s1 = s1.unwrap();
    let r = sub(&mut s1, &mut b1, 1, "flotilla/v1/d/dev-1/cmd").await; check("dev-1 subscribes own cmd", &r, r.contains("0x01"));
    let (ss, mut bs, r) = raw(a, "flotilla-server", "flotilla-server", "srvpw").await; check("server accepted", &r, ss.is_some());
    let mut ss = ss.unwrap();
    let r = sub(&mut ss, &mut bs, 1, "flotilla/v1/d/+/metrics").await; check("server subscribes d/+/metrics", &r, r.contains("0x01"));
    let (s0, mut b0, r) = raw(a, "dev-0", "dev-0", "pw-0-secret").await; check("dev-0 accepted", &r, s0.is_some());
    let mut s0 = s0.unwrap();
    let r = sub(&mut s0, &mut b0, 2, "flotilla/v1/d/dev-1/cmd").await; check("dev-0 subscribe to dev-1/cmd denied", &r, r.contains("0x80"));
    let r = sub(&mut s0, &mut b0, 3, "flotilla/v1/d/+/metrics").await; check("dev-0 wildcard subscribe denied", &r, r.contains("0x80"));
    // cross-device publish to dev-1/cmd
    mqtt::send(&mut s0, &mqtt::publish_qos1(10, "flotilla/v1/d/dev-1/cmd", b"evil")).await.unwrap();
    let r0 = wait_evt(&mut s0, &mut b0, Duration::from_secs(2)).await;
    println!("       dev-0 side after cross publish: {r0}");
    let r = wait_evt(&mut s1, &mut b1, Duration::from_secs(2)).await; check("dev-1 does NOT receive dev-0's publish to dev-1/cmd", &r, !r.starts_with("publish"));
    if r0.starts_with("closed") { let (s, b, _) = raw(a, "dev-0", "dev-0", "pw-0-secret").await; s0 = s.unwrap(); b0 = b; }
    mqtt::send(&mut s0, &mqtt::publish_qos1(11, "flotilla/v1/d/dev-1/metrics", b"0,0,0 spoof")).await.unwrap();
    let r0 = wait_evt(&mut s0, &mut b0, Duration::from_secs(2)).await;
    println!("       dev-0 side after spoofed metrics publish: {r0}");
    let r = wait_evt(&mut ss, &mut bs, Duration::from_secs(2)).await; check("server does NOT receive dev-0 spoofing dev-1/metrics", &r, !r.starts_with("publish"));
    if r0.starts_with("closed") { let (s, b, _) = raw(a, "dev-0", "dev-0", "pw-0-secret").await; s0 = s.unwrap(); b0 = b; }
    // positive controls
    mqtt::send(&mut s0, &mqtt::publish_qos1(12, "flotilla/v1/d/dev-0/metrics", b"0,1,0 ok")).await.unwrap();
    let r0 = wait_evt(&mut s0, &mut b0, Duration::from_secs(2)).await; check("dev-0 own metrics publish PUBACKed", &r0, r0.starts_with("puback"));
    let r = wait_evt(&mut ss, &mut bs, Duration::from_secs(2)).await; check("server receives dev-0 own metrics", &r, r == "publish flotilla/v1/d/dev-0/metrics");
    mqtt::send(&mut ss, &mqtt::publish_qos1(20, "flotilla/v1/d/dev-1/cmd", b"reboot")).await.unwrap();
    let r = wait_evt(&mut s1, &mut b1, Duration::from_secs(2)).await; check("dev-1 receives server cmd", &r, r == "publish flotilla/v1/d/dev-1/cmd");
}

fn main() {
    BASE.set(Instant::now()).unwrap();
    let a: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    match a[1].as_str() {
        "bench" => rt.block_on(bench(a[2].clone(), a[3].parse().unwrap(), a[4].parse().unwrap(),
            a.get(5).map(|s| s.parse().unwrap()).unwrap_or(200), a.get(6).map(|s| s.parse().unwrap()).unwrap_or(60))),
        "acltest" => rt.block_on(acltest(a[2].clone())),
        _ => eprintln!("usage: loadgen bench <addr> <N> <broker_pid> [conc] [window_s] | loadgen acltest <addr>"),
    }
}
