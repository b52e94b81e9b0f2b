//! How fast devices connect to the embedded broker, and what each connection costs the
//! control plane, in plain TCP (`--insecure-plaintext`) and over mutual TLS (the default: the
//! server's TLS front, then rmqtt). The server is the real `flotilla-server` binary in its own
//! process, so its RSS is the server's alone; the devices are rumqttc clients in this process,
//! each with its own certificate from the fleet CA.
//!
//!   cargo bench -p flotilla-server --bench connect            # 1000 devices
//!   cargo bench -p flotilla-server --bench connect -- 3000    # another count

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, TlsConfiguration, Transport};

const CONCURRENCY: usize = 64;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Figures {
    per_second: f64,
    mib_per_1000: f64,
    rss_idle_mib: f64,
}

async fn run(n: usize, tls: bool) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla-server"));
    cmd.arg("--data-dir").arg(&data).args(["--http", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"]);
    if !tls {
        cmd.arg("--insecure-plaintext");
    }
    let mut child = cmd.env("RUST_LOG", "error").stderr(std::process::Stdio::null()).spawn().unwrap();
    let endpoints = data.join("endpoints.json");
    for _ in 0..200 {
        if endpoints.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&endpoints).unwrap()).unwrap();
    let port: u16 = e["mqtt"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
    // Certificates first (not timed): each device's own, as flashed.
    let configs: Vec<Option<Arc<rustls::ClientConfig>>> = if tls {
        let pki = data.join("pki");
        let ca = flotilla_pki::Ca::load(
            &std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(pki.join("ca.key")).unwrap(),
        )
        .unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        (0..n)
            .map(|i| {
                let id = ca.device(&format!("bench-{i}"), now, 86_400).unwrap();
                Some(Arc::new(flotilla_pki::tls::client_config(ca.cert_pem(), Some(&id)).unwrap()))
            })
            .collect()
    } else {
        vec![None; n]
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(child.id());
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let start = Instant::now();
    let mut joins = Vec::new();
    let mut keep = Vec::new();
    for (i, config) in configs.into_iter().enumerate() {
        let gate = gate.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        keep.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let id = format!("bench-{i}");
            let mut o = MqttOptions::new(id.clone(), "127.0.0.1", port);
            o.set_credentials(id, "");
            o.set_keep_alive(Duration::from_secs(60));
            if let Some(c) = config {
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(c)));
            }
            let (client, mut events) = AsyncClient::new(o, 10);
            let mut tx = Some(tx);
            let mut permit = Some(permit);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        drop(permit.take());
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench-{i}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                let _ = &client;
            }
        }));
        joins.push(rx);
    }
    for rx in joins {
        rx.await.unwrap();
    }
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_kib(child.id());
    for k in keep {
        k.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
    Figures {
        per_second: n as f64 / took.as_secs_f64(),
        mib_per_1000: (loaded.saturating_sub(idle)) as f64 / 1024.0 / n as f64 * 1000.0,
        rss_idle_mib: idle as f64 / 1024.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1000);
    println!("embedded broker, {n} devices connecting {CONCURRENCY} at a time (server in its own process)");
    for tls in [false, true] {
        let f = run(n, tls).await;
        println!(
            "{:<22} {:>8.0} devices/s   {:>6.1} MiB per 1000 devices   (server idle {:.1} MiB)",
            if tls { "mutual TLS (default)" } else { "plain TCP" },
            f.per_second,
            f.mib_per_1000,
            f.rss_idle_mib
        );
    }
}
