//! Short-lived access tokens that clients exchange their API key for (`POST /api/v1/auth/token`,
//! what the SDK does when the client config says `pjwt_auth_enabled`): JSON Web Tokens signed
//! with HMAC-SHA256 under a key only the server holds (kept in the data directory, so tokens
//! outlive a restart). A request then carries the token instead of the key, so the long-lived
//! key crosses the wire about every half hour per client (the SDK renews at half a token's
//! life) instead of with every request. A token names its tenant and the key it was issued for
//! ([`Claims::kid`]): it stops working when that key is revoked, not only when it expires. Its
//! claims also answer the SDK's `RestClient.whoami()`, which reads them without a request.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How long a token is valid; the SDK renews it at about half of this.
pub const TOKEN_LIFETIME_SECS: u64 = 3600;

/// Who issued a token (its `iss` claim).
const ISSUER: &str = "loraloom";

/// The token's header, the only one this server issues or accepts.
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The issuer, [`ISSUER`].
    pub iss: String,
    /// The tenant (the SDK's `whoami` user).
    pub sub: String,
    /// The tenant again, as its organization (a tenant is its own; `whoami`'s
    /// `tml:organization:<org_id>`).
    pub org_id: String,
    /// The tenant again, where `whoami` and `auth/apikey/me` give an email.
    pub email: String,
    /// The public id of the API key it was issued for (see [`crate::auth::KeyIdentity`]).
    pub kid: u64,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Expires at (unix seconds).
    pub exp: u64,
}

/// Why a token was refused (the client should exchange its key for a new one).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this server signed, or altered since.
    #[error("the access token is not valid")]
    Invalid,
    /// Past its expiry.
    #[error("the access token has expired")]
    Expired,
}

/// Issues and checks tokens.
pub struct TokenSigner {
    key: Vec<u8>,
}

impl TokenSigner {
    /// A signer with `key`.
    pub fn new(key: Vec<u8>) -> Self {
        TokenSigner { key }
    }

    /// The signer whose key is in `dir/access-token.key`, created when absent.
    pub fn in_dir(dir: &Path) -> std::io::Result<Self> {
        crate::downloads::secret_in_dir(dir, "access-token.key").map(TokenSigner::new)
    }

    fn mac(&self, signed: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(signed);
        mac
    }

    /// A token for `tenant`'s key of public id `kid`, issued at `now` (unix seconds).
    pub fn issue(&self, tenant: &str, kid: u64, now: u64) -> String {
        let claims = Claims {
            iss: ISSUER.into(),
            sub: tenant.into(),
            org_id: tenant.into(),
            email: tenant.into(),
            kid,
            iat: now,
            exp: now + TOKEN_LIFETIME_SECS,
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialise");
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self.mac(signed.as_bytes()).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// The claims of `token` when this server signed it, unaltered, with the one header it
    /// issues, and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        let (signed, signature) = token.rsplit_once('.').ok_or(TokenError::Invalid)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Invalid)?;
        self.mac(signed.as_bytes())
            .verify_slice(&signature)
            .map_err(|_| TokenError::Invalid)?;
        // Signed by this server, so the rest is what it wrote; checked all the same.
        let (header, payload) = signed.split_once('.').ok_or(TokenError::Invalid)?;
        if URL_SAFE_NO_PAD.decode(header).ok().as_deref() != Some(HEADER.as_bytes()) {
            return Err(TokenError::Invalid);
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(TokenError::Invalid)?;
        if claims.iss != ISSUER {
            return Err(TokenError::Invalid);
        }
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Whether a credential is a token rather than an API key (a JWT's base64 header starts so).
pub fn looks_like_token(credential: &str) -> bool {
    credential.starts_with("eyJ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_tenant_and_key_until_it_expires_and_cannot_be_altered_or_forged() {
        let signer = TokenSigner::new(vec![7; 32]);
        let token = signer.issue("alice", 42, 1000);
        assert!(looks_like_token(&token));
        let claims = signer.verify(&token, 1000).unwrap();
        assert_eq!((claims.sub.as_str(), claims.kid), ("alice", 42));
        assert_eq!(claims.exp - claims.iat, TOKEN_LIFETIME_SECS);
        assert_eq!(
            signer.verify(&token, 1000 + TOKEN_LIFETIME_SECS - 1),
            Ok(claims.clone())
        );
        assert_eq!(
            signer.verify(&token, 1000 + TOKEN_LIFETIME_SECS),
            Err(TokenError::Expired)
        );
        // Another server's key.
        assert_eq!(
            TokenSigner::new(vec![8; 32]).verify(&token, 1000),
            Err(TokenError::Invalid)
        );
        // Another tenant or a later expiry in the payload breaks the signature.
        let parts: Vec<&str> = token.split('.').collect();
        for forged in [
            Claims {
                sub: "bob".into(),
                ..claims.clone()
            },
            Claims {
                exp: u64::MAX,
                ..claims.clone()
            },
        ] {
            let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
            let token = format!("{}.{payload}.{}", parts[0], parts[2]);
            assert_eq!(signer.verify(&token, 1000), Err(TokenError::Invalid));
        }
        // An unsigned token ("alg": "none") is refused.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert_eq!(signer.verify(&none, 1000), Err(TokenError::Invalid));
        for junk in ["", "eyJ", "a.b", "a.b.c", &format!("{token}x")] {
            assert_eq!(signer.verify(junk, 1000), Err(TokenError::Invalid));
        }
    }
}
