//! In-process rumqttd 0.20 broker with per-device username/password auth callback.
//! rumqttd has NO topic-ACL hook in its public API (see README/report).
//! Usage: bench-rumqttd [port]
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

mod stats;

fn main() {
    let mut port: u16 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(0);
    if port == 0 {
        // rumqttd binds inside its own server thread and exposes no way to read the bound
        // address back, so port 0 can't be used directly. Best effort: pick a free port (racy).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        port = l.local_addr().unwrap().port();
    }
    let mut m = HashMap::new();
    for i in 0..20000 {
        m.insert(format!("dev-{i}"), format!("pw-{i}-secret"));
    }
    m.insert("flotilla-server".to_string(), "srvpw".to_string());
    let creds = Arc::new(m);

    let mut conn = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    // ---- authentication callback: (client_id, username, password) -> bool ----
    let c = creds.clone();
    conn.set_auth_handler(move |client_id: String, user: String, pass: String| {
        let c = c.clone();
        async move {
            let ok = c.get(&user).map(|p| *p == pass).unwrap_or(false);
            ok && (user == "flotilla-server" || client_id == user)
        }
    });
    let server = ServerSettings {
        name: "v4-1".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 0,
        connections: conn,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    println!("LISTENING 127.0.0.1:{port}");
    stats::spawn_reporter();
    broker.start().unwrap(); // blocks; spawns router + server threads
}
