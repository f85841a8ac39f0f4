//! The agent's HTTPS client of the seeder. Trusts only the campaign CA from join.toml (never the
//! system roots, never on first use) and, of the certificates it signs, only one that also names
//! the seeder ([`SEEDER_CERT_NAME`]): the campaign CA signs node certificates too, and none of those
//! may pass for the seeder. Presents the node's identity certificate on mTLS routes and binds its
//! source address to the node's public IPv4, which the seeder checks at enrollment.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use hiveseed_proto::api::SEEDER_CERT_NAME;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use hiveseed_proto::api::{
    ApiError, AttestRequest, AttestResponse, CertRequest, CertResponse, CredentialRequest,
    CredentialResponse, EnrollRequest, EnrollResponse, ErrorKind, Readiness,
};
use hiveseed_proto::manifest::CertificatePurpose;
use hiveseed_proto::status::StatusReport;
use hiveseed_proto::{Manifest, NodeName, Sha256, SignedEnvelope};

use crate::resources::{
    ArtifactFetcher, BoxFuture, CertSigner, CredentialIssuer, FetchError, NodeReadiness,
    ReadinessError, SignError,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The seeder could not be reached or did not answer: retry with backoff.
    #[error("seeder unreachable: {0}")]
    Unreachable(String),
    /// The seeder answered with an error body.
    #[error("seeder refused ({status}): {kind:?}: {message}")]
    Refused {
        status: u16,
        kind: ErrorKind,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("seeder answered something unexpected: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
            ClientError::Refused { kind, .. } => kind.retryable(),
            ClientError::Protocol(_) => false,
        }
    }

    /// How long the seeder asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The result of a manifest long-poll.
#[derive(Debug)]
pub enum ManifestPoll {
    Changed {
        envelope: SignedEnvelope<Manifest>,
        etag: Option<String>,
    },
    NotModified,
}

#[derive(Clone)]
pub struct SeederClient {
    base: String,
    anonymous: reqwest::Client,
    mtls: Option<reqwest::Client>,
    ca_pem: String,
    source: Option<Ipv4Addr>,
}

impl std::fmt::Debug for SeederClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeederClient")
            .field("base", &self.base)
            .field("mtls", &self.mtls.is_some())
            .finish_non_exhaustive()
    }
}

/// The agent's check of the seeder's certificate: a chain to the campaign CA that names the host
/// dialled (webpki), and that also names [`SEEDER_CERT_NAME`], which the seeder never issues to a
/// node. Both checks are webpki's own name matching.
#[derive(Debug)]
pub struct SeederVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    seeder: ServerName<'static>,
}

impl SeederVerifier {
    pub fn new(ca_pem: &str) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| ClientError::Protocol(format!("campaign CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Protocol(format!("campaign CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Protocol(
                "campaign CA: no certificate in the PEM".into(),
            ));
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| ClientError::Protocol(format!("campaign CA: {e}")))?;
        let seeder = ServerName::try_from(SEEDER_CERT_NAME)
            .map_err(|e| ClientError::Protocol(format!("{SEEDER_CERT_NAME}: {e}")))?;
        Ok(Self { webpki, seeder })
    }
}

impl ServerCertVerifier for SeederVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.seeder, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS to the seeder: [`SeederVerifier`], and the node's identity (key PEM, then chain PEM) when
/// given. Key material never reaches an error message.
fn tls_config(
    ca_pem: &str,
    identity_pem: Option<&str>,
) -> Result<rustls::ClientConfig, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Protocol(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SeederVerifier::new(ca_pem)?));
    let mut config = match identity_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Protocol(format!("identity chain: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|_| ClientError::Protocol("identity: no PEM private key".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Protocol(format!("identity: {e}")))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn builder(
    ca_pem: &str,
    source: Option<Ipv4Addr>,
    identity_pem: Option<&str>,
) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut b = reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca_pem, identity_pem)?)
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90));
    if let Some(ip) = source {
        b = b.local_address(IpAddr::V4(ip));
    }
    Ok(b)
}

async fn refused(resp: reqwest::Response) -> ClientError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&body) {
        Ok(e) => ClientError::Refused {
            status,
            kind: e.kind,
            message: e.message,
            retry_after,
        },
        Err(_) if status >= 500 => ClientError::Unreachable(format!("HTTP {status}")),
        Err(_) => ClientError::Protocol(format!("HTTP {status} without an error body")),
    }
}

fn unreachable(e: reqwest::Error) -> ClientError {
    ClientError::Unreachable(e.without_url().to_string())
}

impl SeederClient {
    /// No I/O: builds the HTTP clients only.
    pub fn new(
        base: &str,
        ca_pem: &str,
        source: Option<Ipv4Addr>,
        identity_pem: Option<&str>,
    ) -> Result<Self, ClientError> {
        let anonymous = builder(ca_pem, source, None)?
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut c = Self {
            base: base.trim_end_matches('/').to_owned(),
            anonymous,
            mtls: None,
            ca_pem: ca_pem.to_owned(),
            source,
        };
        if let Some(id) = identity_pem {
            c.set_identity(id)?;
        }
        Ok(c)
    }

    /// Key PEM followed by the certificate chain PEM.
    pub fn set_identity(&mut self, identity_pem: &str) -> Result<(), ClientError> {
        self.mtls = Some(
            builder(&self.ca_pem, self.source, Some(identity_pem))?
                .build()
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
        );
        Ok(())
    }

    fn mtls(&self) -> Result<&reqwest::Client, ClientError> {
        self.mtls
            .as_ref()
            .ok_or_else(|| ClientError::Protocol("not enrolled: no identity certificate".into()))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Enrolls through the join URL (which carries the token) with a CSR and the node's facts.
    pub async fn enroll(
        &self,
        join_url: &str,
        req: &EnrollRequest,
    ) -> Result<EnrollResponse, ClientError> {
        let resp = self
            .anonymous
            .post(join_url)
            .json(req)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.without_url().to_string()))
    }

    /// Long-polls the node's manifest: returns at once when it differs from `etag`, else waits up
    /// to `wait` for a change.
    pub async fn manifest(
        &self,
        etag: Option<&str>,
        wait: Duration,
    ) -> Result<ManifestPoll, ClientError> {
        let mut req = self
            .mtls()?
            .get(self.url(&format!("/v1/manifest?wait={}", wait.as_secs())))
            .timeout(wait + Duration::from_secs(30));
        if let Some(e) = etag {
            req = req.header("if-none-match", e);
        }
        let resp = req.send().await.map_err(unreachable)?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(ManifestPoll::NotModified);
        }
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let envelope = resp
            .json()
            .await
            .map_err(|e| ClientError::Protocol(format!("manifest body: {}", e.without_url())))?;
        Ok(ManifestPoll::Changed { envelope, etag })
    }

    pub async fn report(&self, report: &StatusReport) -> Result<(), ClientError> {
        // The answer says whether it was new or a resend; both are delivered.
        let _: serde_json::Value = self
            .post_mtls("/v1/status", report, Duration::from_secs(20))
            .await?;
        Ok(())
    }

    /// POSTs JSON over mTLS and decodes a JSON answer; refusals carry the seeder's error body.
    async fn post_mtls<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<R, ClientError> {
        let resp = self
            .mtls()?
            .post(self.url(path))
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.without_url().to_string()))
    }

    pub async fn certificate(
        &self,
        purpose: CertificatePurpose,
        csr_pem: &str,
    ) -> Result<String, ClientError> {
        let body = CertRequest {
            purpose,
            csr_pem: csr_pem.to_owned(),
        };
        let r: CertResponse = self
            .post_mtls("/v1/certs", &body, Duration::from_secs(30))
            .await?;
        Ok(r.cert_chain_pem)
    }

    /// A zero-touch federation credential for the node's own key (only its public half is sent).
    pub async fn credential(
        &self,
        req: &CredentialRequest,
    ) -> Result<CredentialResponse, ClientError> {
        self.post_mtls("/v1/credential", req, Duration::from_secs(30))
            .await
    }

    /// Renews the node's own identity certificate.
    pub async fn renew_identity(&self, csr_pem: &str) -> Result<String, ClientError> {
        let body = serde_json::json!({ "csr_pem": csr_pem });
        let r: CertResponse = self
            .post_mtls("/v1/identity", &body, Duration::from_secs(30))
            .await?;
        Ok(r.cert_chain_pem)
    }

    /// Streams an artifact into `out` as it arrives (no whole artifact in memory); refuses a
    /// response that announces another size. The caller verifies the digest.
    pub async fn artifact(
        &self,
        sha256: &Sha256,
        size: u64,
        out: &mut (dyn std::io::Write + Send),
    ) -> Result<(), ClientError> {
        let mut resp = self
            .mtls()?
            .get(self.url(&format!("/v1/artifacts/{sha256}")))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        if let Some(len) = resp.content_length().filter(|l| *l != size) {
            return Err(ClientError::Protocol(format!(
                "artifact {sha256}: the seeder sends {len} bytes, the manifest names {size}"
            )));
        }
        while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
            out.write_all(&chunk).map_err(|e| {
                ClientError::Protocol(format!("artifact {sha256}: writing the download: {e}"))
            })?;
        }
        Ok(())
    }

    pub async fn ready(&self, node: &NodeName, gate: &str) -> Result<Readiness, ClientError> {
        let resp = self
            .mtls()?
            .get(self.url(&format!("/v1/ready/{node}/{gate}")))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            return Err(refused(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.without_url().to_string()))
    }
}

impl ArtifactFetcher for SeederClient {
    fn fetch<'a>(
        &'a self,
        sha256: &'a Sha256,
        size: u64,
        out: &'a mut (dyn std::io::Write + Send),
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(async move {
            self.artifact(sha256, size, out)
                .await
                .map_err(|e| FetchError {
                    retryable: e.retryable(),
                    message: e.to_string(),
                })
        })
    }
}

impl CertSigner for SeederClient {
    fn sign<'a>(
        &'a self,
        purpose: CertificatePurpose,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<String, SignError>> {
        Box::pin(async move {
            self.certificate(purpose, csr_pem)
                .await
                .map_err(|e| SignError {
                    retryable: e.retryable(),
                    message: e.to_string(),
                })
        })
    }
}

impl CredentialIssuer for SeederClient {
    fn issue<'a>(
        &'a self,
        req: &'a CredentialRequest,
    ) -> BoxFuture<'a, Result<CredentialResponse, SignError>> {
        Box::pin(async move {
            self.credential(req).await.map_err(|e| SignError {
                retryable: e.retryable(),
                message: e.to_string(),
            })
        })
    }

    fn attest<'a>(
        &'a self,
        req: &'a AttestRequest,
    ) -> BoxFuture<'a, Result<AttestResponse, SignError>> {
        Box::pin(async move {
            self.post_mtls("/v1/attest", req, Duration::from_secs(30))
                .await
                .map_err(|e: ClientError| SignError {
                    retryable: e.retryable(),
                    message: e.to_string(),
                })
        })
    }
}

impl NodeReadiness for SeederClient {
    fn is_ready<'a>(
        &'a self,
        node: &'a NodeName,
        gate: &'a str,
    ) -> BoxFuture<'a, Result<bool, ReadinessError>> {
        Box::pin(async move {
            self.ready(node, gate)
                .await
                .map(|r| r.ready)
                .map_err(|e| ReadinessError {
                    message: e.to_string(),
                })
        })
    }
}
