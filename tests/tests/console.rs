//! The web console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver) by a small client written here. It signs in with a token, sees the fleet,
//! starts a rollout and pauses it, sees a drift chart drawn from real data, and checks that a
//! viewer gets no buttons. Screenshots of every page go to `target/console-screenshots/`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use flotilla_builder::BuildOptions;
use flotilla_builder::baseline::DriftOptions;
use flotilla_demo::{Fleet, digits, unix_now};
use flotilla_drift::{DriftConfig, Window};
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver session on a chromedriver this test started.
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A headless chromium that trusts the fleet server's key alone (pinned by its SPKI hash,
    /// as a browser given the fleet CA would trust the certificate).
    async fn start(server_cert_pem: &str) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; .ci/setup installs it)");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .chain([format!("--ignore-certificate-errors-spki-list={}", spki_pin(server_cert_pem))])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let r: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let session = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {r}")).to_string();
        Browser { http, session: format!("{base}/session/{session}"), driver, _profile: profile }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> Option<String> {
        let v = self.cmd(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        v[ELEMENT].as_str().map(String::from)
    }

    /// Waits for an element whose text satisfies `ok`; returns its text.
    async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            if let Some(el) = self.find(css).await {
                last = self
                    .cmd(reqwest::Method::GET, &format!("/element/{el}/text"), None)
                    .await
                    .as_str()
                    .unwrap_or("")
                    .into();
                if ok(&last) {
                    return last;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{css}: text {last:?} never matched");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await.unwrap_or_else(|| panic!("no {css}"));
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/click"), Some(json!({}))).await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css).await.unwrap_or_else(|| panic!("no {css}"));
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/clear"), Some(json!({}))).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/value"), Some(json!({ "text": text }))).await;
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(reqwest::Method::POST, "/execute/sync", Some(json!({"script": js, "args": []}))).await
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5000, "{name}: a real screenshot");
        path
    }

    async fn close(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = Fleet::start(dir.path(), 4).await.unwrap();
    for (i, (id, _)) in fleet.agents.iter().enumerate() {
        fleet.tag(id, "group", if i % 2 == 0 { "lab" } else { "field" }).await.unwrap();
    }
    // digits@1 with a 1 s drift window; the field sees brighter images.
    let mut b = BuildOptions::new("digits", 1, digits::MODEL.to_vec(), unix_now());
    b.golden = digits::golden(&digits::samples()[..1]);
    let config = DriftConfig { window: Window::Seconds(1), ..DriftConfig::default() };
    b.drift = Some((digits::baseline_reference(), DriftOptions { config, ..DriftOptions::default() }));
    fleet.push(fleet.build_signed(&b).unwrap()).await.unwrap();
    let r = fleet.wait_rollout(&fleet.start_rollout("digits@1").await.unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.state, "completed");
    let images = digits::baseline_images();
    let start = Instant::now();
    let mut k = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        for (i, (id, _)) in fleet.agents.iter().enumerate() {
            let batch: Vec<Vec<f32>> = (0..16)
                .map(|j| {
                    let img = &images[((k * 16 + j) as usize + i * 31) % images.len()];
                    if i % 2 == 1 { digits::brightened(img, k * 100 + j) } else { img.clone() }
                })
                .collect();
            fleet.infer(id, "digits", &digits::images_request(&batch)).await.unwrap();
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut b2 = BuildOptions::new("digits", 2, digits::MODEL.to_vec(), unix_now());
    b2.golden = digits::golden(&digits::samples()[..1]);
    fleet.push(fleet.build_signed(&b2).unwrap()).await.unwrap();
    fleet
        .wait_for(Duration::from_secs(20), || async {
            Ok(fleet.drift("digits", "&version=1").await?.iter().any(|r| r.psi.is_some()))
        })
        .await
        .unwrap();

    let server_cert = std::fs::read_to_string(fleet.server_cfg.data_dir.join("pki/server.pem")).unwrap();
    let web = Browser::start(&server_cert).await;
    let console = format!("{}/", fleet.api());
    web.goto(&console).await;
    web.wait_text("#login h2", |t| t == "Sign in").await;
    web.screenshot("login").await;
    web.type_into("#token", "flt_wrong").await;
    web.click("#login-button").await;
    web.wait_text("#login-error", |t| t.contains("not valid")).await;
    web.type_into("#token", &fleet.token).await;
    web.click("#login-button").await;
    web.wait_text("#who", |t| t.contains("admin")).await;
    web.wait_text("#devices-online .n", |t| t == "4").await;
    web.wait_text("#main", |t| t.contains("digits@1")).await;
    let mut shots = vec![web.screenshot("overview").await];

    web.goto(&format!("{console}#/devices")).await;
    web.wait_text("#main table", |t| t.contains("dev-3") && t.contains("group=field")).await;
    shots.push(web.screenshot("devices").await);
    // A fleet bigger than a page: the list pages by id, Next and Previous walk it.
    for i in 0..250 {
        let (hello, tags) = (flotilla_server::store::HelloRecord::default(), Default::default());
        fleet.server.shared().store.device_hello(&format!("zz-{i:03}"), &hello, &tags, 1).await.unwrap();
    }
    web.goto(&format!("{console}#/")).await;
    web.goto(&format!("{console}#/devices")).await;
    web.wait_text("#page-no", |t| t == "page 1").await;
    web.click("#next-page").await;
    web.wait_text("#page-no", |t| t == "page 2").await;
    web.wait_text("#main table", |t| t.contains("zz-249") && !t.contains("dev-3")).await;
    web.click("#prev-page").await;
    web.wait_text("#main table", |t| t.contains("dev-3")).await;
    web.goto(&format!("{console}#/devices/dev-1")).await;
    web.wait_text("#main", |t| t.contains("History") && t.contains("digits")).await;
    shots.push(web.screenshot("device").await);
    web.goto(&format!("{console}#/bundles")).await;
    web.wait_text("#main table", |t| t.contains("digits") && t.contains("KiB")).await;
    shots.push(web.screenshot("bundles").await);

    // Start a rollout of digits@2 from the form, then pause it with its button.
    web.goto(&format!("{console}#/rollouts")).await;
    web.wait_text("#ro-bundle", |t| t.contains("digits@2")).await;
    web.script("document.querySelector('#ro-bundle').value = 'digits@2';").await;
    web.type_into("#ro-waves", "1,100%").await;
    web.type_into("#ro-bake", "10m").await;
    web.click("#ro-start").await;
    web.wait_text("#rollout-state", |t| t == "running" || t == "pending").await;
    web.click("#ro-pause").await;
    web.wait_text("#rollout-state", |t| t == "paused").await;
    web.wait_text("#main", |t| t.contains("Waves") && t.contains("install_success")).await;
    shots.push(web.screenshot("rollout").await);
    let id = web.script("return location.hash.split('/')[2];").await.as_str().unwrap().to_string();
    assert_eq!(fleet.rollout(&id).await.unwrap().state, "paused", "the server paused it");

    // Drift: a PSI chart with a line per group, and baseline-vs-live histograms.
    web.goto(&format!("{console}#/drift")).await;
    web.wait_text("#drift-model", |t| t.contains("digits@1")).await;
    web.script(
        "const s = document.querySelector('#drift-model'); s.value = 'digits@1'; s.dispatchEvent(new Event('change'));",
    )
    .await;
    web.wait_text("#psi-chart", |t| t.contains("group=field") && t.contains("group=lab")).await;
    let drawn = web
        .script("return [...document.querySelectorAll('#psi-chart path.series')].map(p => p.getAttribute('d').split('L').length);")
        .await;
    assert!(drawn.as_array().unwrap().iter().all(|n| n.as_u64().unwrap() >= 2), "lines with points: {drawn}");
    let bars = web.script("return document.querySelectorAll('svg.histogram rect.live').length;").await;
    assert!(bars.as_u64().unwrap() >= 2, "histogram bars: {bars}");
    shots.push(web.screenshot("drift").await);

    web.goto(&format!("{console}#/retrain")).await;
    web.wait_text("#main", |t| t.contains("Retraining jobs") && t.contains("Policies")).await;
    shots.push(web.screenshot("retrain").await);

    // A viewer sees the same pages without the operator's buttons.
    let viewer = fleet.create_token("viewer", "wall screen").await.unwrap();
    web.click("#logout").await;
    web.type_into("#token", &viewer).await;
    web.click("#login-button").await;
    web.wait_text("#who", |t| t.contains("wall screen") && t.contains("viewer")).await;
    web.goto(&format!("{console}#/rollouts/{id}")).await;
    web.wait_text("#rollout-state", |t| t == "paused").await;
    assert!(web.find("#ro-pause").await.is_none() && web.find("#start-rollout").await.is_none());
    shots.push(web.screenshot("rollout-viewer").await);
    eprintln!("screenshots: {shots:?}");
    web.close().await;
    fleet.shutdown().await;
}

/// base64 of the SHA-256 of a certificate's public key: chromium's pin format.
fn spki_pin(cert_pem: &str) -> String {
    use base64::Engine;
    let info = flotilla_pki::parse_cert(cert_pem).unwrap();
    base64::engine::general_purpose::STANDARD.encode(info.spki_sha256)
}
