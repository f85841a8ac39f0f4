//! The seeder's HTTP API. `app()` returns the router so tests can drive it in-process; the TLS
//! listener in `tls` puts each connection's verified client certificate into the request.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `POST /v1/join/{node}?token=` | server TLS, join token | enroll: CSR + facts → identity certificate + first manifest |
//! | `GET /v1/bootstrap/{sha256}` | server TLS | the `bootstrap` binary for cloud-init |
//! | `GET /v1/manifest?wait=` | node identity | own signed manifest; `If-None-Match` long-poll |
//! | `POST /v1/certs` | node identity | service certificate from a CSR; names from accepted facts |
//! | `POST /v1/identity` | node identity | renew the node's own identity certificate |
//! | `POST /v1/credential` | node identity | zero-touch federation credential for the node's own key |
//! | `GET /v1/artifacts/{sha256}` | node identity | an artifact the node's manifest names |
//! | `POST /v1/status` | node identity | a status report |
//! | `GET /v1/ready/{node}/{gate}` | node identity | whether another node reached a readiness gate |
//! | `GET /v1/status` | operator certificate | the fleet view (JSON) |

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hiveseed_proto::api::{
    AttestRequest, AttestResponse, CertRequest, CertResponse, CredentialRequest,
    CredentialResponse, EnrollRequest, EnrollResponse, ErrorKind, Readiness,
};
use hiveseed_proto::manifest::CertificatePurpose;
use hiveseed_proto::status::{Phase, StatusReport};
use hiveseed_proto::{FedId, JoinToken, NodeName, Sha256};
use serde::Deserialize;

use crate::campaign::CampaignDir;
use crate::digitalocean::DoError;
use crate::error::{ApiResult, Error};
use crate::pki::{LeafSpec, LeafUsage};
use crate::state::{fingerprint, Change, ReenrollPolicy, Seeder};
use crate::store::{CertRecord, Enrolled, Enrollment, ReportFate, TokenUse};
use crate::tls::{ConnCloser, ConnInfo};

/// Bodies: 64 KiB for everything but status reports.
const BODY_LIMIT: usize = 64 * 1024;
const REPORT_LIMIT: usize = 1024 * 1024;
/// The longest long-poll a client may ask for.
const MAX_WAIT_SECS: u64 = 300;

pub fn app(seeder: Arc<Seeder>) -> Router {
    let reports = Router::new()
        .route("/v1/status", post(post_status).get(get_fleet_status))
        .layer(DefaultBodyLimit::max(REPORT_LIMIT));
    Router::new()
        .route("/v1/join/{node}", post(enroll))
        .route("/v1/bootstrap/{sha}", get(bootstrap_binary))
        .route("/v1/manifest", get(get_manifest))
        .route("/v1/certs", post(post_cert))
        .route("/v1/identity", post(renew_identity))
        .route("/v1/credential", post(post_credential))
        .route("/v1/attest", post(post_attest))
        .route("/v1/artifacts/{sha}", get(get_artifact))
        .route("/v1/ready/{node}/{gate}", get(get_ready))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .merge(reports)
        .fallback(|| async { Error::new(ErrorKind::NotFound, "no such route") })
        // After every route: it applies to the method routers registered so far.
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            Error::new(
                ErrorKind::MethodNotAllowed,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        .with_state(seeder)
}

// ---- extractors ----

fn conn(parts: &Parts) -> ApiResult<ConnInfo> {
    parts
        .extensions
        .get::<ConnInfo>()
        .cloned()
        .ok_or_else(|| Error::internal("request without connection info"))
}

/// The fingerprint of the connection's (CA-verified) client certificate; 401 without one.
fn client_fpr(parts: &Parts) -> ApiResult<String> {
    let der = conn(parts)?.client_cert.ok_or_else(|| {
        Error::new(
            ErrorKind::Unauthenticated,
            "a client certificate is required",
        )
    })?;
    Ok(fingerprint(&der))
}

/// A node calling with its identity certificate (verified chain, known, not revoked).
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node: NodeName,
    pub fpr: String,
}

impl FromRequestParts<Arc<Seeder>> for NodeIdentity {
    type Rejection = Error;

    /// Every refusal past the TLS handshake (no certificate, unknown, revoked, not an identity,
    /// removed from the fleet) is recorded and logged like a refused enrollment.
    async fn from_request_parts(parts: &mut Parts, s: &Arc<Seeder>) -> ApiResult<Self> {
        let source = conn(parts)?.remote.ip();
        let fpr = client_fpr(parts).map_err(|e| s.refuse(source, "no_client_cert", None, e))?;
        let rec = s.cert_info(&fpr)?.ok_or_else(|| {
            s.refuse(
                source,
                "unknown_cert",
                None,
                Error::new(ErrorKind::Unauthenticated, "unknown client certificate"),
            )
        })?;
        let refuse = |kind: &'static str, e: Error| s.refuse(source, kind, Some(&rec.node), e);
        if rec.revoked {
            return Err(refuse(
                "revoked_cert",
                Error::new(ErrorKind::Revoked, "this certificate has been revoked"),
            ));
        }
        if rec.purpose != "identity" {
            return Err(refuse(
                "not_identity_cert",
                Error::new(
                    ErrorKind::Forbidden,
                    "only a node's identity certificate may call the seeder",
                ),
            ));
        }
        if s.inputs().fleet.node(&rec.node).is_none() {
            return Err(refuse(
                "not_in_fleet",
                Error::new(ErrorKind::Forbidden, "node is no longer in the fleet"),
            ));
        }
        Ok(NodeIdentity {
            node: rec.node,
            fpr,
        })
    }
}

/// The operator, by the client certificate `seeder init` made.
#[derive(Debug)]
pub struct Operator;

impl FromRequestParts<Arc<Seeder>> for Operator {
    type Rejection = Error;

    /// A refusal is recorded and logged like a node's (kind `not_operator`, the node named when
    /// the certificate is a node's).
    async fn from_request_parts(parts: &mut Parts, s: &Arc<Seeder>) -> ApiResult<Self> {
        let source = conn(parts)?.remote.ip();
        let fpr = client_fpr(parts).map_err(|e| s.refuse(source, "no_client_cert", None, e))?;
        match &s.operator_fpr {
            Some(op) if *op == fpr => Ok(Operator),
            _ => {
                let node = s.cert_info(&fpr).ok().flatten().map(|c| c.node);
                Err(s.refuse(
                    source,
                    "not_operator",
                    node.as_ref(),
                    Error::new(ErrorKind::Forbidden, "the operator certificate is required"),
                ))
            }
        }
    }
}

/// JSON body whose rejections are answered in the API's error format.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> ApiResult<Self> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(e))
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(Error::new(ErrorKind::TooLarge, "request body is too large"))
            }
            Err(e) => Err(Error::new(ErrorKind::BadRequest, e.body_text())),
        }
    }
}

/// Path parameters whose rejections are answered in the API's error format.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(e) if e.status().is_server_error() => Err(Error::internal(e.body_text())),
            Err(e) => Err(Error::new(ErrorKind::BadRequest, e.body_text())),
        }
    }
}

/// A query string whose rejections are answered in the API's error format.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| Error::new(ErrorKind::BadRequest, e.body_text()))
    }
}

fn parse_node(s: &str) -> ApiResult<NodeName> {
    s.parse()
        .map_err(|e: hiveseed_proto::NameError| Error::new(ErrorKind::BadRequest, e.to_string()))
}

fn parse_sha(s: &str) -> ApiResult<Sha256> {
    s.parse()
        .map_err(|e: hiveseed_proto::NameError| Error::new(ErrorKind::BadRequest, e.to_string()))
}

// ---- enrollment ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenQuery {
    token: String,
}

/// Every refusal before the identity is issued is recorded and logged through
/// [`Seeder::refuse`]; the body is read only once the token has verified.
async fn enroll(
    State(s): State<Arc<Seeder>>,
    path: Result<ApiPath<String>, Error>,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    parts: ConnParts,
    body: Result<ApiJson<EnrollRequest>, Error>,
) -> ApiResult<axum::Json<EnrollResponse>> {
    let remote = parts.0.remote;
    let named: Option<NodeName> = path.as_ref().ok().and_then(|p| p.0.parse().ok());
    let refuse = |kind: &'static str, e: Error| s.refuse(remote.ip(), kind, named.as_ref(), e);
    if !s.limiter.allow(remote.ip(), Instant::now()) {
        return Err(refuse(
            "rate_limited",
            Error::new(ErrorKind::RateLimited, "too many enrollments; retry later"),
        ));
    }
    let node = path
        .and_then(|ApiPath(node)| parse_node(&node))
        .map_err(|e| refuse("bad_node_name", e))?;
    // The rejection's text is not repeated: it could quote the query, and the query is the token.
    let Query(TokenQuery { token }) = query.map_err(|_| {
        refuse(
            "token_missing",
            Error::new(
                ErrorKind::BadToken,
                "the join URL needs exactly one query parameter, token",
            ),
        )
    })?;
    let inputs = s.inputs();
    let fleet = &inputs.fleet;
    let now = s.now();
    let claims = JoinToken::from_text(token)
        .verify(&s.signing.verifying_key(), &fleet.campaign, &node, now)
        .map_err(|e| refuse(e.tag(), Error::new(ErrorKind::BadToken, e.to_string())))?;
    let spec = fleet.node(&node).ok_or_else(|| {
        refuse(
            "not_in_fleet",
            Error::new(
                ErrorKind::BadToken,
                format!("node {node} is not in the fleet"),
            ),
        )
    })?;
    if spec.role != claims.role || spec.region != claims.region {
        return Err(refuse(
            "token_role_mismatch",
            Error::new(
                ErrorKind::BadToken,
                format!(
                    "token says {}/{} but the fleet has {node} as {}/{}",
                    claims.role, claims.region, spec.role, spec.region
                ),
            ),
        ));
    }
    let ApiJson(req) = body.map_err(|e| refuse("bad_body", e))?;
    // Single use: a consumed token is refused for any other key, whatever the request claims.
    let key_fpr = crate::pki::csr_key_fpr(&req.csr_pem)
        .map_err(|e| refuse("bad_csr", Error::new(ErrorKind::BadCsr, e.to_string())))?;
    let used = s.store.token_use(&node, &claims.nonce)?;
    if let Some(u) = used.as_ref().filter(|u| u.key_fpr != key_fpr) {
        return Err(refuse("token_used", token_used(u)));
    }
    if req.facts.region != spec.region {
        return Err(refuse(
            "region_mismatch",
            Error::new(
                ErrorKind::BadRequest,
                format!(
                    "facts.region is {}, the fleet has {node} in {}",
                    req.facts.region, spec.region
                ),
            ),
        ));
    }
    if s.policy.check_source && remote.ip() != std::net::IpAddr::V4(req.facts.public_ipv4) {
        return Err(refuse(
            "source_mismatch",
            Error::new(
                ErrorKind::SourceMismatch,
                format!(
                    "request came from {} but facts.public_ipv4 is {}",
                    remote.ip(),
                    req.facts.public_ipv4
                ),
            ),
        ));
    }
    if let Some(u) = used {
        if fleet.attestation.is_some() {
            same_droplet(&s, &u, req.facts.droplet_id)
                .map_err(|e| refuse("attestation_failed", e))?;
        }
        return stored_enrollment(&s, &u, remote.ip()).await;
    }
    if let Some(a) = &fleet.attestation {
        attest_droplet(&s, a, &node, &claims.nonce, &req.facts, remote.ip()).await?;
    }
    // From the address check until the enrollment is stored, one enrollment at a time.
    let claiming = s.enroll_lock.lock().await;
    if fleet.attestation.is_some() {
        droplet_unbound(&s, fleet, &node, req.facts.droplet_id)
            .map_err(|e| refuse("attestation_failed", e))?;
    }
    check_addresses(
        &s,
        fleet,
        &node,
        req.facts.private_ipv4,
        req.facts.public_ipv4,
    )?;
    let (cert_pem, cert_der, _) =
        s.ca.sign_csr(
            &req.csr_pem,
            &LeafSpec {
                common_name: node.to_string(),
                sans: vec![],
                usage: LeafUsage::Client,
                not_before: std::time::UNIX_EPOCH + Duration::from_secs(now),
                lifetime: Duration::from_secs(fleet.ttl.certificate_secs),
            },
        )
        .map_err(|e| refuse("bad_csr", Error::new(ErrorKind::BadCsr, e.to_string())))?;
    let previous = s.store.enrollment(&node)?;
    if let Some(prev) = &previous {
        if prev.key_fpr != key_fpr && s.policy.reenroll == ReenrollPolicy::Refuse {
            return Err(refuse(
                "reenroll_refused",
                Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{node} is already enrolled with another key and policy refuses re-enrollment"
                    ),
                ),
            ));
        }
    }
    let fpr = fingerprint(&cert_der);
    let enrollment = Enrollment {
        node: node.clone(),
        droplet_id: req.facts.droplet_id,
        public_ip: req.facts.public_ipv4,
        private_ip: req.facts.private_ipv4,
        identity_fpr: fpr.clone(),
        key_fpr,
        token_nonce: claims.nonce.clone(),
        enrolled_at: now,
    };
    let revoked = match s.store.enroll(
        &enrollment,
        &CertRecord {
            fpr,
            node: node.clone(),
            purpose: "identity".into(),
            pem: cert_pem.clone(),
            issued_at: now,
            not_after: now + fleet.ttl.certificate_secs,
            revoked_at: None,
        },
    )? {
        Enrolled::Stored(revoked) => revoked,
        // Consumed since the look-up above (a concurrent request, another seeder process): the
        // certificate just signed is dropped, neither stored nor returned.
        Enrolled::TokenUsed(u) => {
            drop(claiming);
            if u.key_fpr != enrollment.key_fpr {
                return Err(refuse("token_used", token_used(&u)));
            }
            if fleet.attestation.is_some() {
                same_droplet(&s, &u, req.facts.droplet_id)
                    .map_err(|e| refuse("attestation_failed", e))?;
            }
            return stored_enrollment(&s, &u, remote.ip()).await;
        }
    };
    let message = match (&previous, revoked.len()) {
        (None, _) => format!("enrolled from {} (droplet {})", remote.ip(), req.facts.droplet_id),
        (Some(_), n) => format!(
            "re-enrolled from {} (droplet {}); superseded the old identity, revoked {n} certificate(s)",
            remote.ip(),
            req.facts.droplet_id
        ),
    };
    s.store.event(
        now,
        Some(&node),
        if previous.is_some() {
            "superseded"
        } else {
            "enrolled"
        },
        &message,
    )?;
    tracing::info!(node = %node, source = %remote.ip(), superseded = previous.is_some(), "enrolled");
    s.note_revoked(&revoked);
    s.note_enrollment(&enrollment);
    drop(claiming);
    s.rerender(
        Change::Enrolled(node.clone()),
        &format!("enrollment of {node}"),
    )
    .await?;
    let m = s
        .manifest(&node)
        .ok_or_else(|| Error::internal(format!("no manifest rendered for {node}")))?;
    Ok(axum::Json(EnrollResponse {
        cert_chain_pem: format!("{cert_pem}{}", s.ca.cert_pem),
        manifest: serde_json::from_str(&m.stored.envelope)?,
    }))
}

/// Residency attestation (`[attestation]`): DigitalOcean's record of droplet `facts.droplet_id`
/// must be this node's droplet (name, the connection's source among its public addresses, private
/// address, region, the campaign's tag), made after the join token was minted. A mismatch is
/// refused `attestation_failed` (permanent); a look-up that cannot be made is refused
/// `attestation_unavailable` (retryable). Either is recorded as a refusal.
async fn attest_droplet(
    s: &Seeder,
    a: &crate::fleet::Attestation,
    node: &NodeName,
    nonce: &str,
    facts: &hiveseed_proto::api::NodeFacts,
    source: std::net::IpAddr,
) -> ApiResult<()> {
    let failed = |message: String| {
        s.refuse(
            source,
            "attestation_failed",
            Some(node),
            Error::new(ErrorKind::AttestationFailed, message),
        )
    };
    let unavailable = |message: String| {
        s.refuse(
            source,
            "attestation_unavailable",
            Some(node),
            Error::new(
                ErrorKind::AttestationUnavailable,
                format!("residency attestation is unavailable: {message}; retry later"),
            ),
        )
    };
    let Some(minted_at) = s.store.token_minted_at(node, nonce)? else {
        return Err(failed(format!(
            "the join token for {node} has no recorded mint time (it is not the latest one minted \
             for the node, or was minted before mint times were recorded); seeder tfvars mints a \
             fresh one"
        )));
    };
    let token = s.dir.read_do_api_token().map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "residency attestation cannot read the DigitalOcean API token");
        unavailable("the seeder cannot read its DigitalOcean API token (see its log)".into())
    })?;
    let droplet = match s
        .digitalocean
        .droplet(&a.api_url, &token, facts.droplet_id)
        .await
    {
        Ok(d) => d,
        Err(e @ DoError::NotFound { .. }) => {
            return Err(failed(format!("facts.droplet_id: {e}")));
        }
        Err(e @ DoError::TokenRefused { .. }) => {
            tracing::error!(error = %e, api = %a.api_url, "residency attestation: the DigitalOcean API refuses the seeder's token; every enrollment waits until secrets/do-api-token is fixed");
            return Err(unavailable(e.to_string()));
        }
        Err(e @ (DoError::Unavailable { .. } | DoError::Protocol { .. })) => {
            tracing::warn!(error = %e, api = %a.api_url, "residency attestation: DigitalOcean API look-up failed");
            return Err(unavailable(e.to_string()));
        }
    };
    let expected = crate::digitalocean::Expected {
        node: node.as_str(),
        source,
        private_ipv4: facts.private_ipv4,
        region: facts.region.as_str(),
        tag: &a.tag,
        minted_at,
    };
    if let Some(m) = droplet.mismatch(&expected) {
        return Err(failed(m));
    }
    Ok(())
}

/// With attestation, a droplet enrolls one node: another node whose enrollment stands (in the
/// fleet, identity not revoked) bound to `droplet_id` refuses this one.
fn droplet_unbound(
    s: &Seeder,
    fleet: &crate::fleet::Fleet,
    node: &NodeName,
    droplet_id: u64,
) -> ApiResult<()> {
    for e in s.store.enrollments_with_droplet(droplet_id, node)? {
        let standing = fleet.node(&e.node).is_some()
            && s.cert_info(&e.identity_fpr)?.is_some_and(|c| !c.revoked);
        if standing {
            return Err(Error::new(
                ErrorKind::AttestationFailed,
                format!(
                    "facts.droplet_id {droplet_id} is bound to enrolled node {}",
                    e.node
                ),
            ));
        }
    }
    Ok(())
}

/// With attestation, a retry by the key that used the token must come from the droplet that
/// enrolled with it: re-enrollment from another droplet needs a fresh token.
fn same_droplet(s: &Seeder, u: &TokenUse, droplet_id: u64) -> ApiResult<()> {
    match s.store.enrollment(&u.node)? {
        Some(e) if e.token_nonce == u.nonce && e.droplet_id != droplet_id => Err(Error::new(
            ErrorKind::AttestationFailed,
            format!(
                "facts.droplet_id {droplet_id} is not droplet {}, which enrolled {} with this join token; another droplet needs a fresh token",
                e.droplet_id, u.node
            ),
        )),
        _ => Ok(()),
    }
}

/// The refusal of a consumed token: when it was used, never the token or a key.
fn token_used(u: &TokenUse) -> Error {
    let at = crate::attest::rfc3339(u.used_at as i64).unwrap_or_else(|| u.used_at.to_string());
    Error::new(
        ErrorKind::BadToken,
        format!(
            "join token for {} was used at {at}, by another key; a replaced droplet needs a fresh token (seeder tfvars, terraform apply -replace)",
            u.node
        ),
    )
}

/// A retry by the key that consumed the token (the agent may have died, or the seeder, between
/// the commit and the reply): the identity certificate issued then and the node's current
/// manifest, issuing, revoking and storing nothing. Once that certificate was renewed,
/// superseded or revoked, the node had it, and the token is spent.
async fn stored_enrollment(
    s: &Arc<Seeder>,
    u: &TokenUse,
    source: std::net::IpAddr,
) -> ApiResult<axum::Json<EnrollResponse>> {
    let node = &u.node;
    let cert = s
        .store
        .cert(&u.cert_fpr)?
        .filter(|c| c.revoked_at.is_none())
        .ok_or_else(|| {
            s.refuse(
                source,
                "token_used",
                Some(node),
                Error::new(
                    ErrorKind::BadToken,
                    format!(
                        "join token for {node} was used at {}; the identity issued then is no longer current",
                        crate::attest::rfc3339(u.used_at as i64)
                            .unwrap_or_else(|| u.used_at.to_string())
                    ),
                ),
            )
        })?;
    if s.manifest(node).is_none() {
        // The seeder died after the commit, before rendering: render now.
        s.rerender(
            Change::Enrolled(node.clone()),
            &format!("enrollment of {node}"),
        )
        .await?;
    }
    let m = s
        .manifest(node)
        .ok_or_else(|| Error::internal(format!("no manifest rendered for {node}")))?;
    tracing::info!(node = %node, source = %source, "enrollment retried by the same key; the stored enrollment is returned");
    Ok(axum::Json(EnrollResponse {
        cert_chain_pem: format!("{}{}", cert.pem, s.ca.cert_pem),
        manifest: serde_json::from_str(&m.stored.envelope)?,
    }))
}

/// The addresses a node claims, before any of them can reach a certificate: the private address
/// inside its region's VPC range, neither address the seeder's own (its URL host and extra names),
/// and neither the address of another enrolled node whose identity stands. The public address is
/// vouched for by the connection's source (`Policy::check_source`), not here.
fn check_addresses(
    s: &Seeder,
    fleet: &crate::fleet::Fleet,
    node: &NodeName,
    private: std::net::Ipv4Addr,
    public: std::net::Ipv4Addr,
) -> ApiResult<()> {
    let spec = fleet
        .node(node)
        .ok_or_else(|| Error::new(ErrorKind::Forbidden, "node is no longer in the fleet"))?;
    let vpc = fleet
        .vpc_ranges
        .get(&spec.region)
        .ok_or_else(|| Error::internal(format!("region {} has no VPC range", spec.region)))?;
    if !vpc.contains(private) {
        return Err(Error::new(
            ErrorKind::BadRequest,
            format!(
                "facts.private_ipv4 {private} is outside region {}'s VPC range {vpc}",
                spec.region
            ),
        ));
    }
    let seeder_ips: Vec<std::net::IpAddr> = std::iter::once(&fleet.seeder.host)
        .chain(&fleet.seeder_extra_sans)
        .filter_map(|h| h.parse().ok())
        .collect();
    for (field, ip) in [("private_ipv4", private), ("public_ipv4", public)] {
        if seeder_ips.contains(&std::net::IpAddr::V4(ip)) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!("facts.{field} {ip} is the seeder's own address"),
            ));
        }
    }
    for (field, ip) in [("private_ipv4", private), ("public_ipv4", public)] {
        for e in s.store.enrollments_with_address(ip, node)? {
            // A node removed from the fleet or revoked no longer holds its addresses.
            let standing = fleet.node(&e.node).is_some()
                && s.cert_info(&e.identity_fpr)?.is_some_and(|c| !c.revoked);
            if standing {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    format!(
                        "facts.{field} {ip} is an address of enrolled node {}",
                        e.node
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The connection info as an extractor.
#[derive(Debug)]
pub struct ConnParts(pub ConnInfo);

impl<S: Send + Sync> FromRequestParts<S> for ConnParts {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        Ok(ConnParts(conn(parts)?))
    }
}

async fn bootstrap_binary(
    State(s): State<Arc<Seeder>>,
    closer: Option<Extension<ConnCloser>>,
    ApiPath(sha): ApiPath<String>,
) -> ApiResult<Response> {
    let sha = parse_sha(&sha)?;
    let known = s
        .store
        .artifacts()?
        .into_iter()
        .any(|(name, a, _)| name == "bootstrap" && a == sha);
    if !known {
        return Err(Error::new(
            ErrorKind::NotFound,
            "no bootstrap binary with that sha256",
        ));
    }
    artifact_response(&s, &sha, closer).await
}

/// Streams a stored artifact from disk within a download slot; its digest was computed once, at
/// `artifact add`, and the file is checked against what `add` recorded (see `artifact`).
async fn artifact_response(
    s: &Seeder,
    sha: &Sha256,
    closer: Option<Extension<ConnCloser>>,
) -> ApiResult<Response> {
    let Some(slot) = s.downloads.try_slot() else {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} downloads are in progress, the most the seeder serves at once; retry later",
                s.downloads.settings.max_concurrent
            ),
        ));
    };
    let opened = crate::artifact::open(&s.dir.artifacts_dir(), sha)
        .await
        .map_err(|e| Error::internal(format!("{:#}", anyhow::Error::from(e))))?;
    let size = opened.size;
    let body = s.downloads.body(opened, slot, closer.map(|Extension(c)| c));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(size)),
        ],
        axum::body::Body::new(body),
    )
        .into_response())
}

// ---- node routes ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    #[serde(default)]
    wait: Option<u64>,
}

async fn get_manifest(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiQuery(q): ApiQuery<WaitQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let inm = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let wait = Duration::from_secs(q.wait.unwrap_or(0).min(MAX_WAIT_SECS));
    let mut rx = s.watch(&id.node);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Some(m) = s.manifest(&id.node) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                "no manifest has been rendered for this node yet",
            ));
        };
        let tag = m.etag.clone();
        if inm.as_deref() != Some(tag.as_str()) {
            return Ok((
                [
                    (
                        header::ETAG,
                        HeaderValue::from_str(&tag).map_err(Error::internal)?,
                    ),
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    ),
                ],
                m.stored.envelope.clone(),
            )
                .into_response());
        }
        // Unchanged: wait for a change or the deadline.
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => {
                return Ok((
                    StatusCode::NOT_MODIFIED,
                    [(
                        header::ETAG,
                        HeaderValue::from_str(&tag).map_err(Error::internal)?,
                    )],
                )
                    .into_response())
            }
        }
    }
}

async fn post_cert(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiJson(req): ApiJson<CertRequest>,
) -> ApiResult<axum::Json<CertResponse>> {
    let e = s
        .store
        .enrollment(&id.node)?
        .ok_or_else(|| Error::new(ErrorKind::Forbidden, "node is not enrolled"))?;
    if !s.manifest_wants_certificate(&id.node, req.purpose)? {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!(
                "the manifest of {} has no certificate of purpose {}",
                id.node,
                serde_json::to_value(req.purpose)?
                    .as_str()
                    .unwrap_or("unknown")
            ),
        ));
    }
    let now = s.now();
    let inputs = s.inputs();
    let lifetime = inputs.fleet.ttl.certificate_secs;
    let name = id.node.to_string();
    if req.purpose != CertificatePurpose::Client {
        // Enrolled before these rules, or the fleet's ranges changed since: checked again.
        check_addresses(&s, &inputs.fleet, &id.node, e.private_ip, e.public_ip)?;
    }
    // Without the source check nothing vouches for the public address: no certificate names it.
    let public: Vec<String> = if s.policy.check_source {
        vec![e.public_ip.to_string()]
    } else {
        vec![]
    };
    let (purpose, usage, cn, sans) = match req.purpose {
        CertificatePurpose::Server => (
            "server",
            LeafUsage::Server,
            name.clone(),
            [public.clone(), vec![name.clone()]].concat(),
        ),
        CertificatePurpose::PgServer => (
            "pg_server",
            LeafUsage::Server,
            name.clone(),
            [vec![e.private_ip.to_string()], public, vec![name.clone()]].concat(),
        ),
        CertificatePurpose::Client => (
            "client",
            LeafUsage::Client,
            format!("{name}-client"),
            vec![],
        ),
    };
    let (pem, der, _) =
        s.ca.sign_csr(
            &req.csr_pem,
            &LeafSpec {
                common_name: cn,
                sans,
                usage,
                not_before: std::time::UNIX_EPOCH + Duration::from_secs(now),
                lifetime: Duration::from_secs(lifetime),
            },
        )
        .map_err(|e| Error::new(ErrorKind::BadCsr, e.to_string()))?;
    let fpr = fingerprint(&der);
    let superseded: Vec<String> = s
        .store
        .current_certs(purpose)?
        .into_iter()
        .filter(|c| c.node == id.node)
        .map(|c| c.fpr)
        .collect();
    s.store.replace_cert(&CertRecord {
        fpr: fpr.clone(),
        node: id.node.clone(),
        purpose: purpose.into(),
        pem: pem.clone(),
        issued_at: now,
        not_after: now + lifetime,
        revoked_at: None,
    })?;
    s.store.event(
        now,
        Some(&id.node),
        "certificate",
        &format!("issued a {purpose} certificate"),
    )?;
    s.note_revoked(&superseded);
    if req.purpose == CertificatePurpose::Client {
        // Mesh allowlists name client certificates: every peer's manifest changes.
        s.note_client_cert(&id.node, &fpr);
        s.rerender(
            Change::ClientCert(id.node.clone()),
            &format!("client certificate of {}", id.node),
        )
        .await?;
    }
    Ok(axum::Json(CertResponse {
        cert_chain_pem: format!("{pem}{}", s.ca.cert_pem),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityRequest {
    csr_pem: String,
}

async fn renew_identity(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> ApiResult<axum::Json<CertResponse>> {
    let now = s.now();
    let lifetime = s.inputs().fleet.ttl.certificate_secs;
    let (pem, der, _) =
        s.ca.sign_csr(
            &req.csr_pem,
            &LeafSpec {
                common_name: id.node.to_string(),
                sans: vec![],
                usage: LeafUsage::Client,
                not_before: std::time::UNIX_EPOCH + Duration::from_secs(now),
                lifetime: Duration::from_secs(lifetime),
            },
        )
        .map_err(|e| Error::new(ErrorKind::BadCsr, e.to_string()))?;
    let fpr = fingerprint(&der);
    s.store.replace_cert(&CertRecord {
        fpr: fpr.clone(),
        node: id.node.clone(),
        purpose: "identity".into(),
        pem: pem.clone(),
        issued_at: now,
        not_after: now + lifetime,
        revoked_at: None,
    })?;
    s.store.set_identity(&id.node, &fpr)?;
    s.note_revoked(std::slice::from_ref(&id.fpr));
    s.store.event(
        now,
        Some(&id.node),
        "renewed",
        "identity certificate renewed",
    )?;
    Ok(axum::Json(CertResponse {
        cert_chain_pem: format!("{pem}{}", s.ca.cert_pem),
    }))
}

/// Mints a federation credential for the calling node's own key. The subject comes from the
/// identity certificate, never from the body; only nodes whose manifest asks for a credential get
/// one. Nothing but an event is recorded: the credential is the node's to hold.
async fn post_credential(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiJson(req): ApiJson<CredentialRequest>,
) -> ApiResult<axum::Json<CredentialResponse>> {
    let inputs = s.inputs();
    let fleet = &inputs.fleet;
    let spec = fleet
        .node(&id.node)
        .ok_or_else(|| Error::new(ErrorKind::Forbidden, "node is no longer in the fleet"))?;
    let fed_id = FedId::new(&fleet.campaign, &spec.region, &spec.name);
    if req.fed_id != fed_id {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!(
                "{} is federation identity {fed_id}; it may not ask for a credential as {}",
                id.node, req.fed_id
            ),
        ));
    }
    if !s.manifest_wants_credential(&id.node, &fed_id)? {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!(
                "the manifest of {} has no federation_credential for {fed_id}",
                id.node
            ),
        ));
    }
    let now = s.now() as i64;
    let ttl = fleet.ttl.credential_secs as i64;
    let (credential, claims) = s
        .federation
        .mint(&fed_id, req.subject_pubkey, now, ttl)
        .map_err(|e| Error::new(ErrorKind::BadRequest, format!("subject_pubkey: {e}")))?;
    s.store.event(
        now as u64,
        Some(&id.node),
        "credential",
        &format!(
            "issued a federation credential for {fed_id} (key {}) until {}",
            req.subject_pubkey, claims.not_after
        ),
    )?;
    tracing::info!(node = %id.node, fed_id = %fed_id, not_after = claims.not_after, "federation credential issued");
    Ok(axum::Json(CredentialResponse {
        credential,
        not_after: claims.not_after,
    }))
}

/// Signs, as the campaign's operator agent and dated now, the attested write of a namespace
/// standard that the calling node's current manifest names (namespace, title, kind and content
/// digest all equal): the one write a node may have signed, so a node cannot borrow the
/// operator's identity for anything else. Only an event is recorded.
async fn post_attest(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiJson(req): ApiJson<AttestRequest>,
) -> ApiResult<axum::Json<AttestResponse>> {
    if !s.manifest_names_standard(&id.node, &req)? {
        return Err(Error::new(
            ErrorKind::Forbidden,
            format!(
                "the manifest of {} names no namespace standard {:?} titled {:?} of kind {:?} with \
                 that content",
                id.node, req.namespace, req.title, req.kind
            ),
        ));
    }
    let agent_id = CampaignDir::operator_agent_id(s.inputs().fleet.campaign.as_str());
    let now = s.now() as i64;
    let created_at = crate::attest::rfc3339(now)
        .ok_or_else(|| Error::new(ErrorKind::Internal, "the seeder's clock is out of range"))?;
    let signed = crate::attest::sign_request(&agent_id, &s.operator_agent, &req, created_at);
    s.store.event(
        now as u64,
        Some(&id.node),
        "attested",
        &format!(
            "signed the standard memory {:?} of namespace {:?} as {agent_id}",
            req.title, req.namespace
        ),
    )?;
    tracing::info!(node = %id.node, namespace = %req.namespace, "standard memory signed");
    Ok(axum::Json(signed))
}

async fn get_artifact(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    closer: Option<Extension<ConnCloser>>,
    ApiPath(sha): ApiPath<String>,
) -> ApiResult<Response> {
    let sha = parse_sha(&sha)?;
    if !s.manifest_references(&id.node, &sha)? {
        return Err(Error::new(
            ErrorKind::Forbidden,
            "this node's manifest does not name that artifact",
        ));
    }
    artifact_response(&s, &sha, closer).await
}

async fn post_status(
    State(s): State<Arc<Seeder>>,
    id: NodeIdentity,
    ApiJson(report): ApiJson<StatusReport>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    report
        .validate(&id.node)
        .map_err(|e| Error::new(ErrorKind::BadRequest, e.to_string()))?;
    let fate = s.store.put_report(&report, s.now())?;
    tracing::debug!(node = %id.node, seq = report.seq, phase = %report.phase.label(), "report");
    Ok(axum::Json(
        serde_json::json!({ "stored": fate == ReportFate::Stored }),
    ))
}

async fn get_ready(
    State(s): State<Arc<Seeder>>,
    _id: NodeIdentity,
    ApiPath((node, gate)): ApiPath<(String, String)>,
) -> ApiResult<axum::Json<Readiness>> {
    let node = parse_node(&node)?;
    if gate != "converged" {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("unknown readiness gate {gate:?}"),
        ));
    }
    if s.inputs().fleet.node(&node).is_none() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{node} is not in the fleet"),
        ));
    }
    let current = s.manifest(&node).map(|m| m.stored.generation);
    let (ready, phase) = match s.store.latest_report(&node)? {
        Some((r, _)) => (
            r.phase == Phase::Converged && r.generation.is_some() && r.generation == current,
            r.phase.label(),
        ),
        None => (false, "not reported".into()),
    };
    Ok(axum::Json(Readiness {
        node,
        gate,
        ready,
        phase,
    }))
}

async fn get_fleet_status(
    State(s): State<Arc<Seeder>>,
    _op: Operator,
) -> ApiResult<axum::Json<crate::report::FleetView>> {
    let inputs = s.inputs();
    Ok(axum::Json(crate::report::fleet_view(
        &s.store,
        &inputs.fleet,
        s.now(),
    )?))
}
