//! Telling a TLS failure apart from an unreachable etcd.
//!
//! gRPC over TLS 1.3 hides why etcd dropped a connection: the client's handshake finishes
//! before etcd checks the client certificate, and etcd's alert ("certificate required") is lost
//! in hyper's "connection closed". When a request over TLS fails like an unreachable store,
//! [`probe`] does one handshake of its own with the same material and reads the answer.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::etcd::EtcdTls;

/// Handshakes with `endpoint` (`host:port`) as the store client would and waits briefly for
/// etcd's first word. `Some(cause)` when TLS itself failed (the handshake, or an alert right
/// after it); `None` when TLS is fine or the member cannot be reached at all.
pub async fn probe(endpoint: &str, tls: &EtcdTls, limit: Duration) -> Option<String> {
    tokio::time::timeout(limit, probe_inner(endpoint, tls))
        .await
        .ok()
        .flatten()
}

async fn probe_inner(endpoint: &str, tls: &EtcdTls) -> Option<String> {
    let config = match client_config(tls) {
        Ok(c) => c,
        Err(e) => return Some(e),
    };
    let host = endpoint.rsplit_once(':')?.0;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).ok()?;
    let tcp = tokio::net::TcpStream::connect(endpoint).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    // etcd, happy, waits for our HTTP/2 preface and says nothing; unhappy, it sends an alert.
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
        Err(_) => None,
        Ok(Ok(0)) => Some("etcd closed the connection right after the TLS handshake".into()),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
    }
}

fn client_config(tls: &EtcdTls) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let cert = cert.map_err(|e| format!("kv.cacertfile {}: {e}", tls.ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("kv.cacertfile {}: {e}", tls.ca_file.display()))?;
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    let mut config = match &tls.client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let certs = CertificateDer::pem_slice_iter(&c.cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("kv.certfile {}: {e}", c.cert_file.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&c.key_pem)
                .map_err(|e| format!("kv.keyfile {}: {e}", c.key_file.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("kv.certfile/kv.keyfile: {e}"))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
