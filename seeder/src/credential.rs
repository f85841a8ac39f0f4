//! The campaign's zero-touch federation issuer (reference spec §6) as the seeder holds it: the CA
//! signing key from `<campaign dir>/federation/<campaign>-ca.priv`, its id and trust domain. The
//! wire format (mint, verify by the receiver's rules) is `hiveseed_proto::credential`, shared with
//! the agent.

pub use hiveseed_proto::credential::*;

use ed25519_dalek::SigningKey;
use hiveseed_proto::manifest::FederationIssuer;
use hiveseed_proto::{Campaign, Ed25519PublicKey, FedId, IssuerId, TrustDomain};

use crate::campaign::CampaignDir;

/// The issuer id of a campaign's federation CA: `<campaign>-ca` (spec §1.3 `FED_ISSUER_ID`).
pub fn issuer_id(campaign: &Campaign) -> IssuerId {
    CampaignDir::federation_issuer_id(campaign.as_str())
        .parse()
        .expect("a campaign label plus -ca is an issuer id")
}

/// The trust domain credentials of a campaign are scoped to: `<campaign>.fleet` (spec §1.3
/// `FED_TRUST_DOMAIN`).
pub fn trust_domain(campaign: &Campaign) -> TrustDomain {
    format!("{campaign}.fleet")
        .parse()
        .expect("a campaign label plus .fleet is a trust domain")
}

/// The signing half of the campaign's federation CA. Never serialized, never printed.
pub struct Issuer {
    key: SigningKey,
    public: FederationIssuer,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    pub fn new(key: SigningKey, campaign: &Campaign) -> Self {
        let public = FederationIssuer {
            id: issuer_id(campaign),
            trust_domain: trust_domain(campaign),
            public_key: key.verifying_key().into(),
        };
        Self { key, public }
    }

    /// What nodes trust: id, domain, public key (the render context's `federation`).
    pub fn public(&self) -> &FederationIssuer {
        &self.public
    }

    /// A credential for `fed_id`'s key, valid from `now - CLOCK_SKEW_SECS` to `now + ttl_secs`.
    pub fn mint(
        &self,
        fed_id: &FedId,
        subject: Ed25519PublicKey,
        now: i64,
        ttl_secs: i64,
    ) -> Result<(String, Claims), CredentialError> {
        mint(
            &self.key,
            self.public.id.as_str(),
            self.public.trust_domain.as_str(),
            fed_id.as_str(),
            subject.to_bytes(),
            now,
            ttl_secs,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_names_follow_the_reference_campaign() {
        let c: Campaign = "do-1461".parse().unwrap();
        assert_eq!(issuer_id(&c).as_str(), "do-1461-ca");
        assert_eq!(trust_domain(&c).as_str(), "do-1461.fleet");
        let long: Campaign = "x".repeat(63).parse().unwrap();
        assert_eq!(issuer_id(&long).as_str().len(), 66);
    }

    #[test]
    fn minted_credentials_verify_under_the_public_half_and_debug_hides_the_key() {
        let issuer = Issuer::new(SigningKey::from_bytes(&[7; 32]), &"t1".parse().unwrap());
        let node = SigningKey::from_bytes(&[9; 32]);
        let fed_id: FedId = "t1/r1/t1-peer-r1-01".parse().unwrap();
        let (text, claims) = issuer
            .mint(&fed_id, node.verifying_key().into(), 1_800_000_000, 3600)
            .unwrap();
        let p = issuer.public();
        let got = verify(
            &text,
            &[(p.id.as_str(), p.public_key.verifying_key())],
            Some(p.trust_domain.as_str()),
            1_800_000_000,
        )
        .unwrap();
        assert_eq!(got, claims);
        assert_eq!(got.subject_agent_id, fed_id.as_str());
    }
}
