//! Every MQTT payload type the agent or the control plane decodes.
#![no_main]
use flotilla_proto::{Chunk, Command, Event, FetchRequest, Hello, State, Telemetry, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Command>(data);
    let _ = decode::<Chunk>(data);
    let _ = decode::<FetchRequest>(data);
    let _ = decode::<Hello>(data);
    let _ = decode::<State>(data);
    let _ = decode::<Event>(data);
    // The control plane then validates drift sketches against the baseline before merging.
    if let Ok(mut m) = decode::<Telemetry>(data)
        && let Telemetry::Drift(r) = &mut m.body
    {
        for s in &mut r.signals {
            let _ = s.sketch.validate();
        }
    }
});
