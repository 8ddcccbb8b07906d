//! API keys → tenants. Keys are compared, never logged or stored anywhere else. The keys can be
//! replaced while the server runs ([`Auth::replace`]: a keys file edited, or SIGHUP). A client
//! may also present a short-lived token it exchanged its key for ([`crate::tokens`]); a token
//! is accepted while the key it was issued for is.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use axum::http::HeaderMap;
use loraloom_engine::registry::unix_now;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::tokens::{looks_like_token, TokenSigner};

/// How requests are authenticated.
pub struct Auth {
    /// The keys in force; empty in single-tenant mode. Replaced whole by [`Auth::replace`]: a
    /// request reads one version (the read lock is held only to clone the `Arc`).
    keys: RwLock<Arc<Keys>>,
    /// Started with no keys: any `tml-` key is the one tenant, for the server's whole life.
    single_tenant: bool,
    /// Issues and checks access tokens; `None`: only API keys are accepted.
    tokens: Option<TokenSigner>,
}

/// The keys in force, by key and by public id.
#[derive(Default)]
struct Keys {
    /// Key → tenant.
    tenants: HashMap<String, String>,
    /// Public id ([`key_id`]) → tenant: what an access token is checked against.
    ids: HashMap<u64, String>,
}

impl Keys {
    fn new(tenants: HashMap<String, String>) -> Self {
        let ids = tenants
            .iter()
            .map(|(key, tenant)| (key_id(key), tenant.clone()))
            .collect();
        Keys { tenants, ids }
    }
}

/// A stable public id of `key`: the first 48 bits of its SHA-256 (an integer, as the SDK stores
/// it; exact in JSON).
fn key_id(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut id = [0u8; 8];
    id[2..].copy_from_slice(&digest[..6]);
    u64::from_be_bytes(id)
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys().tenants.len())
            .finish_non_exhaustive()
    }
}

/// What [`Auth::replace`] changed, for the log (names of tenants, never keys).
#[derive(Debug, Default, PartialEq)]
pub struct KeysChange {
    /// Keys now accepted that were not before.
    pub keys_added: usize,
    /// Keys no longer accepted.
    pub keys_removed: usize,
    /// Tenants that had no key before.
    pub tenants_added: Vec<String>,
    /// Tenants left with no key (their runs and checkpoints stay, out of reach until a key of
    /// theirs comes back).
    pub tenants_removed: Vec<String>,
}

/// The tenant every key maps to in single-tenant mode.
pub const SINGLE_TENANT: &str = "default";

impl Auth {
    /// Keys (`tml-...`) mapped to tenant names; empty means single-tenant mode.
    pub fn new(keys: HashMap<String, String>) -> Self {
        Auth {
            single_tenant: keys.is_empty(),
            keys: RwLock::new(Arc::new(Keys::new(keys))),
            tokens: None,
        }
    }

    /// Also accepts access tokens that `signer` issued ([`Auth::issue_token`]).
    pub fn with_tokens(self, signer: TokenSigner) -> Self {
        Auth {
            tokens: Some(signer),
            ..self
        }
    }

    /// Whether clients may exchange their key for an access token.
    pub fn issues_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// The keys now in force.
    fn keys(&self) -> Arc<Keys> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the keys: requests from now on are checked against `keys` (requests and jobs
    /// already admitted go on). Refused, keeping the keys in force, in single-tenant mode (a
    /// server started without keys serves its one tenant on loopback; restart it with keys)
    /// and when `keys` is empty (which would lock every tenant out, or look like a file caught
    /// half written).
    pub fn replace(&self, keys: HashMap<String, String>) -> Result<KeysChange, String> {
        if self.single_tenant {
            return Err(
                "the server was started without API keys (single-tenant mode); restart it with --api-key or --api-keys-file".into(),
            );
        }
        if keys.is_empty() {
            return Err(
                "no API keys: every tenant would be locked out; the keys in force stay".into(),
            );
        }
        let mut slot = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let old = &slot.tenants;
        let tenants = |k: &HashMap<String, String>| k.values().cloned().collect::<BTreeSet<_>>();
        let (before, after) = (tenants(old), tenants(&keys));
        let change = KeysChange {
            keys_added: keys.keys().filter(|k| !old.contains_key(*k)).count(),
            keys_removed: old.keys().filter(|k| !keys.contains_key(*k)).count(),
            tenants_added: after.difference(&before).cloned().collect(),
            tenants_removed: before.difference(&after).cloned().collect(),
        };
        *slot = Arc::new(Keys::new(keys));
        Ok(change)
    }

    /// Whether `tenant` is a configured tenant (every name is, in single-tenant mode, where the
    /// only tenant is [`SINGLE_TENANT`]).
    pub fn knows_tenant(&self, tenant: &str) -> bool {
        if self.single_tenant {
            tenant == SINGLE_TENANT
        } else {
            self.keys().tenants.values().any(|t| t == tenant)
        }
    }

    /// The public id and tenant of every key in force (none in single-tenant mode).
    pub fn key_ids(&self) -> Vec<(u64, String)> {
        self.keys()
            .ids
            .iter()
            .map(|(id, tenant)| (*id, tenant.clone()))
            .collect()
    }

    /// Whether any `tml-` key is accepted (no keys configured).
    pub fn is_single_tenant(&self) -> bool {
        self.single_tenant
    }

    /// The tenant of a request, from its `X-API-Key` header (an API key or an access token).
    pub fn tenant(&self, headers: &HeaderMap) -> ApiResult<String> {
        let credential = presented_key(headers)?;
        match &self.tokens {
            Some(signer) if looks_like_token(credential) => self
                .token_identity(signer, credential)
                .map(|who| who.tenant),
            // Every request asks: the key's id (a SHA-256) is computed only where wanted.
            _ => self.tenant_of_key(credential),
        }
    }

    /// The tenant and public id of the key a request presents, itself or through an access
    /// token issued for it (`tinker auth login` checks a pasted key this way before storing it).
    pub fn identify(&self, headers: &HeaderMap) -> ApiResult<KeyIdentity> {
        let credential = presented_key(headers)?;
        match &self.tokens {
            Some(signer) if looks_like_token(credential) => self.token_identity(signer, credential),
            _ => Ok(KeyIdentity {
                tenant: self.tenant_of_key(credential)?,
                key_id: key_id(credential),
            }),
        }
    }

    /// Who access token `token` stands for: refused unless `signer` issued it, it has not
    /// expired, and the key it was issued for is still in force for its tenant.
    fn token_identity(&self, signer: &TokenSigner, token: &str) -> ApiResult<KeyIdentity> {
        let claims = signer
            .verify(token, unix_now() as u64)
            .map_err(|e| ApiError::InvalidToken(e.to_string()))?;
        let in_force = self.single_tenant && claims.sub == SINGLE_TENANT
            || self.keys().ids.get(&claims.kid) == Some(&claims.sub);
        if !in_force {
            return Err(ApiError::InvalidToken(
                "the API key this access token was issued for is no longer accepted".into(),
            ));
        }
        Ok(KeyIdentity {
            tenant: claims.sub,
            key_id: claims.kid,
        })
    }

    /// [`Auth::identify`] for an API key only: what `tinker auth login` checks before storing
    /// a pasted credential (a token would be stored, then refused by the next exchange) and
    /// what an access token is issued for.
    pub fn identify_key(&self, headers: &HeaderMap) -> ApiResult<KeyIdentity> {
        let key = presented_key(headers)?;
        if looks_like_token(key) {
            return Err(ApiError::Unauthorized(
                "this is an access token, which stands in for an API key for an hour; present the key (`tml-...`)"
                    .into(),
            ));
        }
        Ok(KeyIdentity {
            tenant: self.tenant_of_key(key)?,
            key_id: key_id(key),
        })
    }

    /// An access token for the API key a request presents (`POST /api/v1/auth/token`). Only a
    /// key is exchanged: a token cannot renew itself, so a stolen one ends with its lifetime.
    pub fn issue_token(&self, headers: &HeaderMap) -> ApiResult<String> {
        let signer = self.tokens.as_ref().ok_or_else(|| {
            ApiError::Forbidden(
                "this server does not issue access tokens (--access-tokens false); send the API key"
                    .into(),
            )
        })?;
        let who = self.identify_key(headers)?;
        Ok(signer.issue(&who.tenant, who.key_id, unix_now() as u64))
    }

    fn tenant_of_key(&self, key: &str) -> ApiResult<String> {
        if self.single_tenant {
            if key.starts_with("tml-") {
                return Ok(SINGLE_TENANT.to_string());
            }
            return Err(ApiError::Unauthorized(
                "API keys must start with `tml-`".into(),
            ));
        }
        self.keys()
            .tenants
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::Unauthorized("unknown API key".into()))
    }
}

/// Who a key belongs to, as `GET /api/v1/auth/apikey/me` tells its holder.
#[derive(Debug, PartialEq)]
pub struct KeyIdentity {
    /// The key's tenant.
    pub tenant: String,
    /// A stable public id of the key: the first 48 bits of its SHA-256 (an integer, as the
    /// SDK stores it; exact in JSON).
    pub key_id: u64,
}

/// The key a request presents: `X-API-Key`, or `Authorization: Bearer`.
pub(crate) fn presented_key(headers: &HeaderMap) -> ApiResult<&str> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .ok_or_else(|| ApiError::Unauthorized("missing X-API-Key header".into()))
}

/// Parses `tenant=tml-key` pairs (from flags) and lines of a keys file (`tenant tml-key` or
/// `tenant=tml-key`; a `#` at the start of a line or after a space starts a comment, a `#`
/// inside a key is part of it). Rejects keys without the SDK's `tml-` prefix and duplicates.
/// Errors name the entry by number only: a line with its fields swapped would otherwise put a
/// key in the message, which is logged.
pub fn parse_keys<'a>(
    entries: impl IntoIterator<Item = &'a str>,
) -> Result<HashMap<String, String>, String> {
    let mut keys = HashMap::new();
    for (n, raw) in entries.into_iter().enumerate() {
        let line = without_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        let (tenant, key) = line
            .split_once('=')
            .or_else(|| line.split_once(char::is_whitespace))
            .map(|(t, k)| (t.trim(), k.trim()))
            .ok_or_else(|| format!("entry {}: expected `tenant=tml-key`", n + 1))?;
        if tenant.is_empty() {
            return Err(format!("entry {}: empty tenant name", n + 1));
        }
        if tenant.starts_with("tml-") {
            return Err(format!(
                "entry {}: the tenant name comes first (`tenant=tml-key`)",
                n + 1
            ));
        }
        if !key.starts_with("tml-") || key.len() < 8 {
            return Err(format!(
                "entry {}: keys must start with `tml-` and be at least 8 characters",
                n + 1
            ));
        }
        if keys.insert(key.to_string(), tenant.to_string()).is_some() {
            return Err(format!("entry {}: key used twice", n + 1));
        }
    }
    Ok(keys)
}

/// `line` up to its comment: a `#` at the start or after whitespace.
fn without_comment(line: &str) -> &str {
    line.char_indices()
        .find(|&(i, c)| c == '#' && line[..i].chars().last().is_none_or(char::is_whitespace))
        .map_or(line, |(i, _)| &line[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", key.parse().unwrap());
        h
    }

    #[test]
    fn configured_keys_map_to_tenants() {
        let auth =
            Auth::new(parse_keys(["alice=tml-alice-1", "bob tml-bob-22", "# note"]).unwrap());
        assert_eq!(auth.tenant(&headers("tml-alice-1")).unwrap(), "alice");
        assert_eq!(auth.tenant(&headers("tml-bob-22")).unwrap(), "bob");
        assert!(auth.tenant(&headers("tml-mallory")).is_err());
        assert!(auth.tenant(&HeaderMap::new()).is_err());
        assert!(
            !format!("{auth:?}").contains("tml-"),
            "keys never appear in Debug"
        );
    }

    #[test]
    fn a_key_is_identified_by_its_tenant_and_a_stable_id_that_is_not_the_key() {
        let auth = Auth::new(parse_keys(["alice=tml-alice-1", "alice=tml-alice-2"]).unwrap());
        let first = auth.identify(&headers("tml-alice-1")).unwrap();
        let second = auth.identify(&headers("tml-alice-2")).unwrap();
        assert_eq!(
            (first.tenant.as_str(), second.tenant.as_str()),
            ("alice", "alice")
        );
        assert_ne!(first.key_id, second.key_id, "two keys of one tenant differ");
        assert_eq!(first, auth.identify(&headers("tml-alice-1")).unwrap());
        assert!(first.key_id < 1 << 48, "exact as a JSON number");
        assert!(auth.identify(&headers("tml-mallory")).is_err());
    }

    #[test]
    fn replaced_keys_take_effect_at_once_and_none_or_single_tenant_mode_are_refused() {
        let auth = Auth::new(parse_keys(["alice=tml-alice-1", "bob=tml-bob-22"]).unwrap());
        let change = auth
            .replace(parse_keys(["alice=tml-alice-2", "carol=tml-carol-3"]).unwrap())
            .unwrap();
        assert_eq!(
            change,
            KeysChange {
                keys_added: 2,
                keys_removed: 2,
                tenants_added: vec!["carol".into()],
                tenants_removed: vec!["bob".into()],
            }
        );
        assert!(auth.tenant(&headers("tml-alice-1")).is_err(), "rotated out");
        assert_eq!(auth.tenant(&headers("tml-alice-2")).unwrap(), "alice");
        assert!(auth.tenant(&headers("tml-bob-22")).is_err(), "revoked");
        assert_eq!(auth.tenant(&headers("tml-carol-3")).unwrap(), "carol");
        assert!(auth.knows_tenant("carol") && !auth.knows_tenant("bob"));
        // No keys at all would lock everyone out (or open the server): refused, nothing changes.
        assert!(auth.replace(HashMap::new()).is_err());
        assert_eq!(auth.tenant(&headers("tml-carol-3")).unwrap(), "carol");
        assert!(!auth.is_single_tenant());
        // A server started without keys stays in single-tenant mode.
        let single = Auth::new(HashMap::new());
        assert!(single
            .replace(parse_keys(["alice=tml-alice-1"]).unwrap())
            .is_err());
        assert_eq!(
            single.tenant(&headers("tml-anything")).unwrap(),
            SINGLE_TENANT
        );
    }

    #[test]
    fn an_access_token_is_its_keys_tenant_until_that_key_is_revoked_and_renews_only_with_a_key() {
        let signer = || TokenSigner::new(vec![9; 32]);
        let auth = Auth::new(parse_keys(["alice=tml-alice-1", "bob=tml-bob-22"]).unwrap())
            .with_tokens(signer());
        let token = auth.issue_token(&headers("tml-alice-1")).unwrap();
        assert_eq!(auth.tenant(&headers(&token)).unwrap(), "alice");
        assert_eq!(
            auth.identify(&headers(&token)).unwrap(),
            auth.identify(&headers("tml-alice-1")).unwrap(),
            "the same key, presented itself or through its token"
        );
        // A token is exchanged for with a key only, and an unknown key gets none.
        assert!(matches!(
            auth.issue_token(&headers(&token)),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(auth.issue_token(&headers("tml-mallory")).is_err());
        // Altered: refused as an invalid token (the SDK then exchanges its key again).
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        let altered = format!("{signed}.{flipped}{}", &signature[1..]);
        assert!(matches!(
            auth.tenant(&headers(&altered)),
            Err(ApiError::InvalidToken(_))
        ));
        // Alice's key rotated: tokens issued for the old one stop, the new one's work.
        auth.replace(parse_keys(["alice=tml-alice-2", "bob=tml-bob-22"]).unwrap())
            .unwrap();
        assert!(matches!(
            auth.tenant(&headers(&token)),
            Err(ApiError::InvalidToken(_))
        ));
        let renewed = auth.issue_token(&headers("tml-alice-2")).unwrap();
        assert_eq!(auth.tenant(&headers(&renewed)).unwrap(), "alice");
        // A server that issues no tokens takes one for an unknown key.
        let keys_only = Auth::new(parse_keys(["alice=tml-alice-2"]).unwrap());
        assert!(!keys_only.issues_tokens());
        assert!(matches!(
            keys_only.tenant(&headers(&renewed)),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(keys_only.issue_token(&headers("tml-alice-2")).is_err());
        // Single-tenant mode: any `tml-` key's token is the one tenant's.
        let single = Auth::new(HashMap::new()).with_tokens(signer());
        let token = single.issue_token(&headers("tml-anything")).unwrap();
        assert_eq!(single.tenant(&headers(&token)).unwrap(), SINGLE_TENANT);
    }

    #[test]
    fn single_tenant_mode_accepts_any_tml_key() {
        let auth = Auth::new(HashMap::new());
        assert_eq!(
            auth.tenant(&headers("tml-anything")).unwrap(),
            SINGLE_TENANT
        );
        assert!(auth.tenant(&headers("sk-nope")).is_err());
    }

    #[test]
    fn a_hash_inside_a_key_is_kept_and_comments_are_dropped() {
        let keys = parse_keys([
            "alice=tml-ab#cd12",
            "bob tml-bob-22 # Bob's key",
            "  # a comment line",
            "carol=tml-carol#1 #note",
        ])
        .unwrap();
        assert_eq!(keys.get("tml-ab#cd12").map(String::as_str), Some("alice"));
        assert_eq!(keys.get("tml-bob-22").map(String::as_str), Some("bob"));
        assert_eq!(keys.get("tml-carol#1").map(String::as_str), Some("carol"));
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn bad_key_entries_are_refused() {
        assert!(parse_keys(["alice=sk-123456"]).is_err());
        assert!(parse_keys(["alice=tml-aaaa1", "bob=tml-aaaa1"]).is_err());
        assert!(parse_keys(["nokey"]).is_err());
    }
}
