//! Standalone mode in process, started by the same `userseg::standalone::start` the binary
//! runs (on a free port and a fresh data directory), and certificates made with rcgen. Shared
//! by the API, auth and TLS tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use userseg::cli::{Cli, Command};
use userseg::config::StandaloneConfig;
use userseg::standalone::Seams;

pub struct Server {
    pub addr: SocketAddr,
    /// `http://` and the address.
    pub base: String,
    pub stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn http(&self) -> String {
        self.base.clone()
    }
    /// By the name the test certificates carry.
    pub fn https(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Standalone mode with `flags` (and a 20 ms flush interval unless they set one).
pub async fn start(flags: &[&str]) -> Server {
    start_with(flags, |_, _| {}).await
}

/// [`start`], with `configure` applied to the validated config and the wiring's seams (for
/// what has no flag: an authenticator or TLS files made in the test, a store that holds
/// writes).
pub async fn start_with(
    flags: &[&str],
    configure: impl FnOnce(&mut StandaloneConfig, &mut Seams),
) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut argv = vec![
        "userseg",
        "standalone",
        "--service-port",
        "0",
        "--data-dir",
        data.to_str().expect("utf-8 temp dir"),
    ];
    if !flags.contains(&"--flush-interval") {
        argv.extend_from_slice(&["--flush-interval", "20ms"]);
    }
    argv.extend_from_slice(flags);
    let Command::Standalone(args) = Cli::try_parse_from(argv).expect("flags").command else {
        unreachable!("parsed the standalone command")
    };
    let mut config = args.validate().expect("valid flags");
    let mut seams = Seams::default();
    configure(&mut config, &mut seams);
    let stop = CancellationToken::new();
    let server = userseg::standalone::start_with(config, stop.clone(), seams)
        .await
        .expect("standalone starts");
    let addr = server.addr();
    Server {
        addr,
        base: format!("http://{addr}"),
        stop,
        _dir: dir,
    }
}

/// The process's metrics recorder: the one every role started in this process installs.
pub fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    userseg::observability::metrics(userseg::observability::Role::Standalone).expect("metrics")
}

pub use userseg_testkit::tls::{Ca, Identity};

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
