//! In-process rmqtt broker with per-device auth + topic ACL hooks.
//! Usage: bench-rmqtt [port]   (port 0 = ephemeral; bound address is printed as "LISTENING <addr>")
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::types::{AuthResult, PublishAclResult, SubscribeAclResult};

mod stats;

/// Credential store: username -> password. Devices are dev-{i}; "flotilla-server" is the superuser.
struct Creds(HashMap<String, String>);

fn device_prefix(user: &str) -> String {
    format!("flotilla/v1/d/{user}/")
}

struct AuthAcl {
    creds: Arc<Creds>,
}

#[async_trait]
impl Handler for AuthAcl {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            // ---- authentication: username/password callback ----
            Parameter::ClientAuthenticate(ci) => {
                let user = ci.username().map(|u| &**u).unwrap_or("");
                let pass = ci.password().map(|p| p.as_ref()).unwrap_or(b"");
                let ok = self.creds.0.get(user).map(|p| p.as_bytes() == pass).unwrap_or(false);
                // device client id must equal its username
                let id_ok = user == "flotilla-server" || &**ci.client_id() == user;
                let res = if ok && id_ok {
                    AuthResult::Allow(user == "flotilla-server", None) // (superuser, auth_info)
                } else {
                    AuthResult::BadUsernameOrPassword
                };
                (false, Some(HookResult::AuthResult(res)))
            }
            // ---- publish ACL ----
            Parameter::MessagePublishCheckAcl(s, p) => {
                let user = s.id.username_ref();
                if p.topic.starts_with(&device_prefix(user)) {
                    (false, Some(HookResult::PublishAclResult(PublishAclResult::allow())))
                } else {
                    // false = don't disconnect; message is dropped (v3 has no PUBACK reason code)
                    (false, Some(HookResult::PublishAclResult(PublishAclResult::rejected(false, None))))
                }
            }
            // ---- subscribe ACL ----
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let user = s.id.username_ref();
                let r = if sub.topic_filter.starts_with(&device_prefix(user)) {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(r)))
            }
            _ => (true, acc),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(0);
    let busy_check = std::env::var("RMQTT_BUSY_CHECK").map(|v| v == "1").unwrap_or(false);
    let mut m = HashMap::new();
    for i in 0..20000 {
        m.insert(format!("dev-{i}"), format!("pw-{i}-secret"));
    }
    m.insert("flotilla-server".into(), "srvpw".into());
    let creds = Arc::new(Creds(m));

    let scx = ServerContext::new().busy_check_enable(busy_check).build().await;

    // register the hooks (in-process, no plugin crate / config files needed)
    let reg = scx.extends.hook_mgr().register();
    reg.add(Type::ClientAuthenticate, Box::new(AuthAcl { creds: creds.clone() })).await;
    reg.add(Type::MessagePublishCheckAcl, Box::new(AuthAcl { creds: creds.clone() })).await;
    reg.add(Type::ClientSubscribeCheckAcl, Box::new(AuthAcl { creds: creds.clone() })).await;
    reg.start().await;

    let listener = Builder::new()
        .name("external/tcp")
        .laddr(([127, 0, 0, 1], port).into())
        .allow_anonymous(false)
        .max_connections(100_000)
        .max_handshaking_limit(10_000)
        .backlog(4096)
        .max_inflight(std::num::NonZeroU16::new(100).unwrap())
        .max_mqueue_len(10_000)
        .bind()?
        .tcp()?;
    let addr = listener.local_addr()?; // bound address read back (works with port 0)
    println!("LISTENING {addr}");
    stats::spawn_reporter();
    MqttServer::new(scx).listener_by_id(listener, 1).build().run().await?;
    Ok(())
}
