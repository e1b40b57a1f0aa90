//! The lab's own PKI for `lab up --secure-store`: a CA, etcd's server certificate and one
//! client certificate per daemon host, made in-process (rcgen) so the lab needs no openssl
//! command and nothing outside its own directory.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("making {what}: {source}")]
    Cert { what: String, source: rcgen::Error },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files [`make`] wrote.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server: CertFiles,
    /// One per client name, in the order given.
    pub clients: Vec<(String, CertFiles)>,
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Cert {
        what: what.to_string(),
        source,
    }
}

/// Writes `text` to `path` with `mode`, replacing nothing: a leftover file means someone
/// else's key could be in use.
fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

/// Writes a secret (a key or a password) readable by its owner only.
pub fn write_secret(path: &Path, text: &str) -> Result<(), PkiError> {
    write_file(path, text, 0o600)
}

/// Makes `dir` (mode 0700, must not exist) and in it `ca.pem`, `etcd.pem`/`etcd-key.pem`
/// (SAN IPs `server_ips` and 127.0.0.1) and `NAME.pem`/`NAME-key.pem` per client (its CN
/// is NAME). Keys are 0600.
pub fn make(dir: &Path, server_ips: &[Ipv4Addr], clients: &[&str]) -> Result<Pki, PkiError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "vxnet lab CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(cert_err("the CA key"))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(cert_err("the CA"))?;
    let ca_path = dir.join("ca.pem");
    write_file(&ca_path, &ca.pem(), 0o644)?;

    let leaf = |name: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.subject_alt_names = sans;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(cert_err(name))?;
        let cert = p.signed_by(&key, &ca).map_err(cert_err(name))?;
        let files = CertFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        write_file(&files.cert, &cert.pem(), 0o644)?;
        write_secret(&files.key, &key.serialize_pem())?;
        Ok::<_, PkiError>(files)
    };
    let mut ips: Vec<SanType> = server_ips
        .iter()
        .map(|a| SanType::IpAddress(IpAddr::V4(*a)))
        .collect();
    ips.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let server = leaf("etcd", ips, ExtendedKeyUsagePurpose::ServerAuth)?;
    let clients = clients
        .iter()
        .map(|c| {
            Ok((
                c.to_string(),
                leaf(c, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?,
            ))
        })
        .collect::<Result<_, PkiError>>()?;
    Ok(Pki {
        dir: dir.to_path_buf(),
        ca: ca_path,
        server,
        clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn makes_pem_files_with_private_keys() {
        let base = std::env::temp_dir().join(format!("vxnet-pki-{}", rand::random::<u32>()));
        std::fs::create_dir(&base).unwrap();
        let dir = base.join("pki");
        let pki = make(&dir, &[Ipv4Addr::new(192, 0, 2, 5)], &["vm2", "vm3"]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&pki.server.key), 0o600);
        assert_eq!(pki.clients.len(), 2);
        for (_, c) in &pki.clients {
            assert_eq!(mode(&c.key), 0o600);
            let pem = std::fs::read_to_string(&c.cert).unwrap();
            assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        }
        // A second run must not overwrite the keys.
        assert!(make(&dir, &[], &[]).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
