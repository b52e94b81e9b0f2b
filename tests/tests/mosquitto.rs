//! Interoperability: the control plane and agents speak plain MQTT 3.1.1, so Debian's
//! Mosquitto can replace the embedded broker (`flotilla-server --broker mqtt://HOST:PORT`).
//! `.ci/run` installs mosquitto; without it this test fails and says so.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_demo::{Fleet, digits};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start mosquitto on a free loopback port. Mosquitto cannot listen on port 0 and report the
/// port, so a free port is found first and the start is retried if another process takes it.
fn start_mosquitto(dir: &std::path::Path) -> Mosquitto {
    assert!(
        std::path::Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: install it with `apt-get install mosquitto` (.ci/run does)"
    );
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n")).unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollout_over_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_mosquitto(dir.path());
    let fleet =
        Fleet::start_with_broker(&dir.path().join("fleet"), 2, Some(format!("mqtt://127.0.0.1:{}", broker.port)))
            .await
            .unwrap();
    assert_eq!(fleet.server.mqtt_addr.port(), broker.port);
    let samples = digits::samples();
    fleet.push(fleet.bundle("digits", 1, digits::MODEL, digits::golden(&samples[..2])).unwrap()).await.unwrap();
    let id = fleet.start_rollout("digits@1").await.unwrap();
    let r = fleet.wait_rollout(&id, Duration::from_secs(60)).await.unwrap();
    assert_eq!((r.state.as_str(), r.succeeded), ("completed", 2), "{r:?}");
    for (device, _) in &fleet.agents {
        let resp = fleet.infer(device, "digits", &digits::request(&samples)).await.unwrap();
        assert_eq!(digits::classes(&resp.outputs[0].data), samples.iter().map(|s| s.label).collect::<Vec<_>>());
    }
    fleet.shutdown().await;
}
