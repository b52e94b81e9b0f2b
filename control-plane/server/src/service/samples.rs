//! Reservoir samples: the server asks devices for the inputs they kept (with their labels, when
//! feedback gave them), devices upload them in parts, and trainers and operators read them as
//! v2 requests.

use flotilla_api::v2::InferTensor;
use flotilla_proto::tags::Selector;
use flotilla_proto::{Command, Sample, SampleBatch, SampleRequest};
use serde::Serialize;

use super::{Error, Fleet, Result};
use crate::util::{new_id, now_s};

/// A stored sample. Its JSON is the file format trainers read (`samples.json`).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub device: String,
    pub model: String,
    pub version: u64,
    pub id: String,
    /// Milliseconds since the epoch (RFC 3339 in files and the API).
    #[serde(serialize_with = "crate::util::serialize_rfc3339_ms")]
    pub ts: i64,
    pub inputs: Vec<InferTensor>,
    pub predicted: Vec<u32>,
    pub labels: Option<Vec<u32>>,
}

/// Ask every online device that the selector picks and that runs the model (that version) for
/// its reservoir sample; returns the upload id and the devices asked.
pub async fn request(f: &Fleet, model: &str, version: Option<u64>, sel: &Selector) -> Result<(String, Vec<String>)> {
    let upload_id = format!("u-{}", new_id());
    let mut devices = Vec::new();
    for d in f.store.devices().await? {
        let runs = d.models.iter().any(|m| m.name == model && version.is_none_or(|v| v == m.version));
        if d.online && runs && sel.matches(&d.tags) {
            f.store.add_sample_upload(&upload_id, &d.id, model, now_s()).await?;
            let cmd =
                Command::UploadSamples(SampleRequest { upload_id: upload_id.clone(), model: model.into(), version });
            f.bus.send(&d.id, cmd).await.map_err(|e| anyhow::anyhow!("asking {} for samples: {e}", d.id))?;
            devices.push(d.id);
        }
    }
    if devices.is_empty() {
        return Err(Error::not_found("no_devices", format!("no online device matching the selector runs {model}"))
            .hint("see `flotilla devices ls` for what runs where"));
    }
    Ok((upload_id, devices))
}

/// An upload's progress: (device, parts, samples, done) per device asked.
pub async fn upload(f: &Fleet, id: &str) -> Result<Vec<(String, u32, u64, bool)>> {
    let rows = f.store.sample_upload(id).await?;
    if rows.is_empty() {
        return Err(Error::not_found("upload_not_found", format!("no sample upload {id:?}")));
    }
    Ok(rows)
}

/// A model's stored samples (that version) from the devices the selector picks, oldest first.
pub async fn list(f: &Fleet, model: &str, version: Option<u64>, sel: &Selector) -> Result<Vec<Record>> {
    let tags: std::collections::HashMap<String, flotilla_proto::tags::Tags> =
        f.store.devices().await?.into_iter().map(|d| (d.id, d.tags)).collect();
    let none = Default::default();
    let mut out = Vec::new();
    for (dev, version, body) in f.store.samples(model, version).await? {
        if sel.matches(tags.get(&dev).unwrap_or(&none)) {
            out.push(record(dev, version, model, &body)?);
        }
    }
    Ok(out)
}

/// Store a part of a reservoir sample the server asked for.
pub async fn ingest(s: &Fleet, device: &str, b: SampleBatch, now: i64) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(b.samples.len());
    for sample in &b.samples {
        let mut body = Vec::new();
        ciborium::into_writer(sample, &mut body)?;
        rows.push((sample.id.clone(), (sample.ts / 1000) as i64, body));
    }
    if !s.store.add_sample_part(device, &b.upload_id, &b.model, b.version, &rows, b.last, now).await? {
        tracing::warn!(device, upload = %b.upload_id, "samples for an upload this server did not ask for: ignored");
    }
    Ok(())
}

/// A stored sample with its inputs as v2 tensors (usable as golden or baseline data, or by a
/// trainer).
pub fn record(device: String, version: u64, model: &str, body: &[u8]) -> anyhow::Result<Record> {
    let sample: Sample = ciborium::from_reader(body)?;
    let inputs = sample
        .inputs
        .iter()
        .map(|t| {
            Ok(InferTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                datatype: t.datatype.clone(),
                data: serde_json::Value::Array(le_numbers(&t.datatype, &t.data)?),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Record {
        device,
        model: model.into(),
        version,
        id: sample.id,
        ts: sample.ts as i64,
        inputs,
        predicted: sample.predicted,
        labels: sample.labels,
    })
}

/// Little-endian element bytes of an Open Inference Protocol datatype, as JSON numbers.
fn le_numbers(datatype: &str, b: &[u8]) -> anyhow::Result<Vec<serde_json::Value>> {
    use serde_json::Value;
    macro_rules! each {
        ($t:ty, $n:expr) => {{
            anyhow::ensure!(b.len().is_multiple_of($n), "{} bytes do not make {datatype} values", b.len());
            b.chunks_exact($n).map(|c| Value::from(<$t>::from_le_bytes(c.try_into().expect("chunk size")))).collect()
        }};
    }
    Ok(match datatype {
        "FP32" => each!(f32, 4),
        "FP64" => each!(f64, 8),
        "INT64" => each!(i64, 8),
        "INT32" => each!(i32, 4),
        "INT16" => each!(i16, 2),
        "INT8" => each!(i8, 1),
        "UINT8" => each!(u8, 1),
        "BOOL" => b.iter().map(|&x| Value::from(x != 0)).collect(),
        other => anyhow::bail!("datatype {other} is not one samples carry"),
    })
}
