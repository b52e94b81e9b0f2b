//! HTTP contracts: the control plane's `/api/v1` types ([`v1`]) and the Open Inference Protocol
//! (KServe v2 REST) spoken by agents to local apps ([`v2`]). Server, CLI, agent and tests all use
//! these types; none of them redefines a field.

pub mod v1;
pub mod v2;
