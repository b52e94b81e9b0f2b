//! Bundle chunks over MQTT: a device's `fetch` for a range of a bundle, answered on its `chunk`
//! topic (for devices that cannot reach the HTTP download).

use flotilla_proto::{Channel, Chunk, FetchRequest, Msg, Topics};
use rumqttc::{AsyncClient, QoS};

use crate::service::Fleet;
use crate::util::{new_id, now_ms};

/// Serve one requested range of a bundle.
pub(super) async fn serve(
    f: &Fleet,
    client: &AsyncClient,
    topics: &Topics,
    device: &str,
    req: FetchRequest,
) -> anyhow::Result<()> {
    let files = f.files.clone();
    let (id, off, len) = (req.bundle_id.clone(), req.offset, req.len);
    let read = tokio::task::spawn_blocking(move || files.read_range(&id, off, len)).await?;
    let chunk = match read {
        Ok((data, total)) => {
            f.metrics.served_mqtt.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(device, bundle = %req.bundle_id, offset = req.offset, len = data.len(), "chunk served");
            Chunk { bundle_id: req.bundle_id, offset: req.offset, total, data, error: None }
        }
        Err(e) => {
            Chunk { bundle_id: req.bundle_id, offset: req.offset, total: 0, data: vec![], error: Some(e.to_string()) }
        }
    };
    let payload = flotilla_proto::encode(&Msg::new(new_id(), now_ms(), chunk));
    client.publish(topics.device(device, Channel::Chunk), QoS::AtLeastOnce, false, payload).await?;
    Ok(())
}
