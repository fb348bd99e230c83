//! HTTPS and gRPC over TLS on the one port (rustls), optionally with client certificates
//! (mutual TLS). The certificate files are reloaded on demand (SIGHUP in the binary): new
//! connections get the new certificate, open ones keep theirs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of the server's TLS identity.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// `TLS_CERT_FILE`: the certificate chain, leaf first.
    pub cert: PathBuf,
    /// `TLS_KEY_FILE`: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `TLS_CLIENT_CA_FILE`: when set, clients must present a certificate signed by one of
    /// these CAs.
    pub client_ca: Option<PathBuf>,
}

/// TLS files that cannot be used; the message names the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{var}: cannot read {}: {source}", path.display())]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{var}: {}: {message}", path.display())]
    Pem {
        var: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("TLS_CERT_FILE / TLS_KEY_FILE: {0}")]
    Config(String),
}

fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        var,
        path: path.to_owned(),
        source,
    })
}

fn certs(var: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(var, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            var,
            path: path.to_owned(),
            message: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            var,
            path: path.to_owned(),
            message: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls server configuration from the files (ALPN h2 and http/1.1).
pub(crate) fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let chain = certs("TLS_CERT_FILE", &files.cert)?;
    let key_pem = read("TLS_KEY_FILE", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        var: "TLS_KEY_FILE",
        path: files.key.clone(),
        message: format!("no usable PRIVATE KEY block: {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs("TLS_CLIENT_CA_FILE", ca)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    var: "TLS_CLIENT_CA_FILE",
                    path: ca.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Pem {
                    var: "TLS_CLIENT_CA_FILE",
                    path: ca.clone(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("the key does not fit the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The server's TLS configuration, reloadable from its files while serving.
#[derive(Clone)]
pub struct TlsReloader {
    files: TlsFiles,
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("files", &self.files)
            .finish()
    }
}

impl TlsReloader {
    /// Loads the files; errors name the variable.
    pub fn load(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let config = server_config(&files)?;
        Ok(TlsReloader {
            files,
            config: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Re-reads the files; on error the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// What a plaintext HTTP client reads from the TLS port before it is closed.
const PLAINTEXT_BODY: &str = "this port speaks TLS only: connect with https://\n";

fn plaintext_reply() -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{PLAINTEXT_BODY}",
        PLAINTEXT_BODY.len()
    )
    .into_bytes()
}

fn handshake_failed(reason: &'static str) {
    metrics::counter!("userseg_tls_handshake_failures_total", "reason" => reason).increment(1);
}

/// Registers the TLS metrics at zero.
pub(crate) fn describe_metrics() {
    for reason in ["plaintext", "handshake", "timeout"] {
        metrics::counter!("userseg_tls_handshake_failures_total", "reason" => reason).absolute(0);
    }
}

/// Answers a client that did not start with a TLS handshake: an HTTP client reads a 400
/// saying to use https, any other client sees the connection close. Never waits long.
async fn refuse_plaintext(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    // Read what the client sent so closing does not reset the connection before it reads.
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&plaintext_reply()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    router: Router,
    watcher: hyper_util::server::graceful::Watcher,
) {
    // A TLS connection starts with a handshake record (content type 22).
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => {
            handshake_failed("plaintext");
            tracing::debug!("plaintext connection to the TLS port refused");
            refuse_plaintext(stream).await;
            return;
        }
        Ok(_) => return,
        Err(_) => {
            handshake_failed("timeout");
            return;
        }
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            handshake_failed("handshake");
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            handshake_failed("timeout");
            return;
        }
    };
    crate::conn::serve(tls, router, watcher).await;
}

/// Serves `router` over TLS on `listener` until `shutdown` fires, then stops accepting and
/// lets open connections finish their requests.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: TlsReloader,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    describe_metrics();
    crate::accept_until(listener, shutdown, |stream, watcher| {
        serve_connection(stream, tls.acceptor(), router.clone(), watcher)
    })
    .await
}
