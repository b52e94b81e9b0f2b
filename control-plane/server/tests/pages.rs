//! Lists that grow with the fleet come in pages: `GET /api/v1/devices?limit=N&after=CURSOR`
//! (with a selector that picks few of many), `GET /api/v1/events?limit=N&before=CURSOR`, each
//! page's `Flotilla-Next` header naming the next one.

use flotilla_server::store::HelloRecord;
use flotilla_server::{Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_events_page_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new(dir.path().join("fleet"));
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.mqtt = "127.0.0.1:0".parse().unwrap();
    let server = Server::start(cfg).await.unwrap();
    let store = &server.shared().store;
    for i in 0..250 {
        let id = format!("dev-{i:03}");
        let tags = [("group".to_string(), if i % 10 == 0 { "lab" } else { "field" }.to_string())].into();
        store.device_hello(&id, &HelloRecord::default(), &tags, 1).await.unwrap();
        store.add_event(&id, "m-1", i, "install_accepted", "{}").await.unwrap();
    }
    let ca = std::fs::read_to_string(server.ca_path().unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(flotilla_pki::tls::client_config(&ca, None).unwrap())
        .build()
        .unwrap();
    let token = server.admin_token().unwrap();
    let get = |path: String| {
        let (http, token, url) = (http.clone(), token.clone(), format!("{}{path}", server.api_url()));
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let next = r.headers().get("flotilla-next").map(|v| v.to_str().unwrap().to_string());
            let body: Vec<serde_json::Value> = r.json().await.unwrap();
            (body, next)
        }
    };
    let ids =
        |b: &[serde_json::Value], key: &str| b.iter().map(|d| d[key].as_str().unwrap().to_string()).collect::<Vec<_>>();

    // Pages of 100 of all 250, in id order, the last without a cursor.
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    for expect in [100, 100, 50] {
        let q = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let (page, next) = get(format!("/api/v1/devices?limit=100{q}")).await;
        assert_eq!(page.len(), expect);
        seen.extend(ids(&page, "id"));
        after = next;
    }
    assert!(after.is_none(), "the last page names no next one");
    let all: Vec<String> = (0..250).map(|i| format!("dev-{i:03}")).collect();
    assert_eq!(seen, all);

    // A selector that picks one in ten still fills its pages, and pages through the rest.
    let (page, next) = get("/api/v1/devices?selector=group%3Dlab&limit=10".into()).await;
    assert_eq!(ids(&page, "id"), (0..10).map(|i| format!("dev-{:03}", i * 10)).collect::<Vec<_>>());
    let (page, next) = get(format!("/api/v1/devices?selector=group%3Dlab&limit=10&after={}", next.unwrap())).await;
    assert_eq!(page.len(), 10);
    let (page, next) = get(format!("/api/v1/devices?selector=group%3Dlab&limit=10&after={}", next.unwrap())).await;
    assert_eq!((page.len(), next), (5, None));
    // Without limit: every device, as before.
    assert_eq!(get("/api/v1/devices".into()).await.0.len(), 250);

    // Events, newest first, older pages by cursor.
    let (first, next) = get("/api/v1/events?limit=100".into()).await;
    assert_eq!(ids(&first, "device")[0], "dev-249");
    let (second, _) = get(format!("/api/v1/events?limit=100&before={}", next.unwrap())).await;
    assert_eq!(ids(&second, "device")[0], "dev-149");
    server.shutdown().await;
}
