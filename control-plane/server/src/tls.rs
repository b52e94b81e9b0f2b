//! TLS on the server's listeners (rustls on ring, through tokio-rustls).
//!
//! - [`HttpsListener`]: `axum::serve` over TLS. Handshakes run in tasks of their own with a
//!   timeout, so a slow or hostile client never stalls the accept loop. A client that speaks
//!   plain HTTP to it gets a plain-text 400 saying to use https, not a reset.
//! - [`accept`]: one TLS handshake with the client certificate's facts, for the MQTT front
//!   (`broker.rs`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE: u8 = 0x16;

/// A TLS listener for `axum::serve`.
pub struct HttpsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<HttpsListener> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    r = tcp.accept() => match r {
                        Ok(x) => x,
                        // Out of file descriptors and the like: wait, do not spin.
                        Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&acceptor, sock, peer).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(HttpsListener { rx, local })
    }
}

async fn handshake(acceptor: &TlsAcceptor, sock: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE => {
            // Plain HTTP (or anything else): say what this port speaks, then close.
            let mut sock = sock;
            let body = "this server speaks HTTPS: use https:// and the fleet CA (DATA_DIR/pki/ca.pem)\n";
            let resp = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
            return None;
        }
        Ok(Ok(1)) => {}
        _ => return None,
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (never while the listener lives): serve nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// What the broker's front learns from a client's verified certificate.
#[derive(Clone, Debug)]
pub struct ClientCert {
    /// The subject CN: the device id.
    pub device: String,
    pub serial: String,
    pub sha256: String,
}

/// A TLS handshake that requires a client certificate (the verifier in `config` checks it),
/// and the facts of that certificate. Errors are for the log.
pub async fn accept(acceptor: &TlsAcceptor, sock: TcpStream) -> Result<(TlsStream<TcpStream>, ClientCert), String> {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err("TLS handshake timed out".into()),
    };
    let info = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|der| flotilla_pki::CertInfo::from_der(der))
        .ok_or("no client certificate")?
        .map_err(|e| e.to_string())?;
    let device = info.common_name.ok_or("the client certificate names no device (no CN)")?;
    Ok((tls, ClientCert { device, serial: info.serial, sha256: info.sha256 }))
}
