//! API keys → tenants. Keys are compared, never logged or stored anywhere else.

use std::collections::HashMap;
use std::fmt;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// How requests are authenticated.
#[derive(Clone)]
pub struct Auth {
    keys: HashMap<String, String>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("tenants", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The tenant every key maps to in single-tenant mode.
pub const SINGLE_TENANT: &str = "default";

impl Auth {
    /// Keys (`tml-...`) mapped to tenant names; empty means single-tenant mode.
    pub fn new(keys: HashMap<String, String>) -> Self {
        Auth { keys }
    }

    /// Whether `tenant` is a configured tenant (every name is, in single-tenant mode, where the
    /// only tenant is [`SINGLE_TENANT`]).
    pub fn knows_tenant(&self, tenant: &str) -> bool {
        if self.keys.is_empty() {
            tenant == SINGLE_TENANT
        } else {
            self.keys.values().any(|t| t == tenant)
        }
    }

    /// Whether any `tml-` key is accepted (no keys configured).
    pub fn is_single_tenant(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant of a request, from its `X-API-Key` header.
    pub fn tenant(&self, headers: &HeaderMap) -> ApiResult<String> {
        self.tenant_of(presented_key(headers)?)
    }

    /// The tenant and public id of the key a request presents (`tinker auth login` checks a
    /// pasted key this way before storing it).
    pub fn identify(&self, headers: &HeaderMap) -> ApiResult<KeyIdentity> {
        let key = presented_key(headers)?;
        let tenant = self.tenant_of(key)?;
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id[2..].copy_from_slice(&digest[..6]);
        Ok(KeyIdentity {
            tenant,
            key_id: u64::from_be_bytes(id),
        })
    }

    fn tenant_of(&self, key: &str) -> ApiResult<String> {
        if self.keys.is_empty() {
            if key.starts_with("tml-") {
                return Ok(SINGLE_TENANT.to_string());
            }
            return Err(ApiError::Unauthorized(
                "API keys must start with `tml-`".into(),
            ));
        }
        self.keys
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
        if !key.starts_with("tml-") || key.len() < 8 {
            return Err(format!("entry {} (tenant {tenant}): keys must start with `tml-` and be at least 8 characters", n + 1));
        }
        if keys.insert(key.to_string(), tenant.to_string()).is_some() {
            return Err(format!("entry {} (tenant {tenant}): key used twice", n + 1));
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
