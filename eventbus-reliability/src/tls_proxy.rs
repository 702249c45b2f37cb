//! A TLS-terminating proxy in front of a plaintext broker, on loopback: clients speak TLS to
//! it, it speaks plain TCP to the broker. tansu 0.6.0 accepts `--cert`/`--key` but never uses
//! them (its listener stays plaintext), so the Kafka security checks put this in front of it,
//! on the port tansu advertises, as a TLS-terminating load balancer would be.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// A running TLS proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct TlsProxy {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    handshakes: Arc<AtomicU64>,
    accept: AbortHandle,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> std::io::Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(io_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(io_err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(io_err)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(io_err)? {
                roots.add(c.map_err(io_err)?).map_err(io_err)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(io_err)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(certs, key).map_err(io_err)
}

impl TlsProxy {
    /// Listen on loopback `port` with certificate `cert`/`key` (PEM) and forward the decrypted
    /// stream to `upstream`. With `client_ca`, clients must present a certificate it signed.
    pub async fn start_on(
        port: u16,
        upstream: SocketAddr,
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> std::io::Result<TlsProxy> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(cert, key, client_ca)?));
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let handshakes = Arc::new(AtomicU64::new(0));
        let (acc, hs) = (Arc::clone(&accepted), Arc::clone(&handshakes));
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::Relaxed);
                let (acceptor, hs) = (acceptor.clone(), Arc::clone(&hs));
                tokio::spawn(async move {
                    // A failed handshake just closes the connection: nothing reaches upstream.
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    hs.fetch_add(1, Ordering::Relaxed);
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        })
        .abort_handle();
        Ok(TlsProxy {
            addr,
            accepted,
            handshakes,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed so far (a refused client never completes one).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
