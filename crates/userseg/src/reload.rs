//! SIGHUP reloads the API keys file and the TLS files without dropping connections. A file
//! that fails to load keeps what is in use and logs why.

use anyhow::Result;
use tokio::signal::unix::{signal, SignalKind};
use userseg_api::{Authenticator, TlsReloader};

/// Reloads `auth`'s keys file and `tls`'s files on every SIGHUP (a no-op for what is unset).
pub(crate) fn on_sighup(auth: Option<Authenticator>, tls: Option<TlsReloader>) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    for what in ["api_keys", "tls"] {
        for result in ["ok", "error"] {
            metrics::counter!("userseg_reloads_total", "what" => what, "result" => result)
                .absolute(0);
        }
    }
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(auth.as_ref(), tls.as_ref());
        }
    });
    Ok(())
}

fn outcome(what: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!("userseg_reloads_total", "what" => what, "result" => result).increment(1);
}

pub(crate) fn reload(auth: Option<&Authenticator>, tls: Option<&TlsReloader>) {
    if let Some(auth) = auth {
        if let Some(file) = auth.file() {
            match auth.reload() {
                Ok(keys) => {
                    outcome("api_keys", true);
                    tracing::info!(file = %file.display(), keys, "reloaded the API keys");
                }
                Err(e) => {
                    outcome("api_keys", false);
                    tracing::error!(error = %e, "API keys not reloaded; keeping the previous keys");
                }
            }
        }
    }
    if let Some(tls) = tls {
        match tls.reload() {
            Ok(()) => {
                outcome("tls", true);
                tracing::info!(cert = %tls.files().cert.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                outcome("tls", false);
                tracing::error!(error = %e, "TLS files not reloaded; keeping the previous certificate");
            }
        }
    }
}
