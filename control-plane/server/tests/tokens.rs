//! `flotilla-server token create|ls|revoke` work on the store directly, and the server takes
//! the tokens they make (and stops taking revoked ones) without a restart.

use std::process::Command;

use flotilla_server::{Server, ServerConfig};

fn server_cmd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-server")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fleet");
    let mut cfg = ServerConfig::new(data.clone());
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.mqtt = "127.0.0.1:0".parse().unwrap();
    let server = Server::start(cfg).await.unwrap();
    let api = server.api_url();
    let d = data.to_str().unwrap();

    let (ok, token, err) = server_cmd(&["token", "create", "--data-dir", d, "--role", "operator", "--name", "ci"]);
    assert!(ok && token.trim().starts_with("flt_") && err.contains("shown once"), "{token} {err}");
    let (ok, _, err) = server_cmd(&["token", "create", "--data-dir", d, "--role", "root"]);
    assert!(!ok && err.contains("invalid value"), "{err}");
    let (_, ls, _) = server_cmd(&["token", "ls", "--data-dir", d]);
    assert!(ls.contains("operator") && ls.contains("ci") && ls.contains("admin"), "{ls}");
    assert!(!ls.contains(token.trim()), "the secret is never listed");

    let ca = std::fs::read_to_string(server.ca_path().unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(flotilla_pki::tls::client_config(&ca, None).unwrap())
        .build()
        .unwrap();
    let who = |t: String| {
        let http = http.clone();
        let url = format!("{api}/api/v1/whoami");
        async move { http.get(url).bearer_auth(t).send().await.unwrap() }
    };
    let r = who(token.trim().to_string()).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!((body["role"].as_str(), body["name"].as_str()), (Some("operator"), Some("ci")));

    let id = body["id"].as_str().unwrap().to_string();
    let (ok, _, _) = server_cmd(&["token", "revoke", "--data-dir", d, &id]);
    assert!(ok);
    assert_eq!(who(token.trim().to_string()).await.status(), 401);
    let (ok, _, err) = server_cmd(&["token", "revoke", "--data-dir", d, &id]);
    assert!(!ok && err.contains("no token"), "{err}");
    server.shutdown().await;
}
