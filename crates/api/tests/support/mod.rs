//! Shared by the auth and TLS tests: a real API stack in process (write-ahead log, batch
//! processor, embedded store) and certificates made with rcgen.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio_util::sync::CancellationToken;
use userseg_api::{ApiState, TlsReloader};
use userseg_domain::{Limits, Window};
use userseg_embedded::{open_standalone, EmbeddedStore, FileDeadLetters, WalConfig};
use userseg_usecase::{BatchConfig, BatchProcessor, Estimation, Ingest, SystemClock};

pub struct Server {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn https(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the whole API (standalone wiring) with `configure` applied to its state, over TLS
/// when `tls` is given.
pub async fn start(configure: impl FnOnce(&mut ApiState), tls: Option<TlsReloader>) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let window = Window::DEFAULT;
    let opened =
        open_standalone(dir.path(), window, WalConfig::new(dir.path().join("wal"))).expect("open");
    let store = EmbeddedStore(opened.store.clone());
    let stop = CancellationToken::new();
    let processor = BatchProcessor::new(
        Arc::new(store.clone()),
        Arc::new(FileDeadLetters::new(dir.path().join("dlq"))),
        BatchConfig {
            flush_interval: Duration::from_millis(20),
            ..BatchConfig::default()
        },
    );
    let s = stop.clone();
    tokio::spawn(async move { processor.run(opened.source, s).await });
    let clock = Arc::new(SystemClock);
    let ingest = Ingest::new(
        Arc::new(opened.log),
        clock.clone(),
        window,
        Limits::default(),
    );
    let estimation = Estimation::new(Arc::new(store), clock, window, Duration::ZERO);
    let mut state = ApiState::new(Some(ingest), Some(estimation));
    configure(&mut state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = userseg_api::router(state);
    match tls {
        Some(tls) => {
            tokio::spawn(userseg_api::serve_tls(listener, router, tls, stop.clone()));
        }
        None => {
            tokio::spawn(userseg_api::serve(listener, router, stop.clone()));
        }
    }
    Server {
        addr,
        stop,
        _dir: dir,
    }
}

/// A certificate authority made for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Identity {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self) -> Identity {
        self.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate (for mutual TLS).
    pub fn client(&self, name: &str) -> Identity {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes a server identity (and optionally a client CA) into `dir`; returns the files.
pub fn write_tls_files(dir: &Path, id: &Identity, client_ca: Option<&Ca>) -> userseg_api::TlsFiles {
    let cert = dir.join("server.crt");
    let key = dir.join("server.key");
    std::fs::write(&cert, &id.cert_pem).expect("write cert");
    std::fs::write(&key, &id.key_pem).expect("write key");
    let client_ca = client_ca.map(|ca| {
        let p: PathBuf = dir.join("client-ca.crt");
        std::fs::write(&p, ca.pem()).expect("write ca");
        p
    });
    userseg_api::TlsFiles {
        cert,
        key,
        client_ca,
    }
}

/// An HTTPS client trusting only `ca`, optionally presenting a client certificate.
pub fn https_client(ca: &Ca, identity: Option<&Identity>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("ca"))
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert_pem, id.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    b.build().expect("client")
}

/// A gRPC channel over TLS trusting only `ca`.
pub async fn grpc_tls(
    server: &Server,
    ca: &Ca,
    identity: Option<&Identity>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ));
    }
    tonic::transport::Endpoint::from_shared(server.https())
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}
