#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The caller's tensors do not fit the model (an HTTP 400).
    #[error("{0}")]
    BadInput(String),
    /// The backend cannot run this model.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("model failed to load on {backend}: {detail}")]
    Load { backend: &'static str, detail: String },
    #[error("inference failed on {backend}: {detail}")]
    Run { backend: &'static str, detail: String },
    #[error("no backend available for {0}")]
    NoBackend(String),
}
