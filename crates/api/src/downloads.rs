//! Signed download URLs of exported weights (`get_external_weights_urls`): a URL names one file
//! of one tenant's checkpoint and an expiry, signed with HMAC-SHA256 under a key only the server
//! holds, so whoever has the URL may fetch that file (the SDK fetches it without credentials)
//! until it expires, and nothing else. The key is kept in the data directory, so URLs outlive a
//! restart.

use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ApiError;

/// How long a signed URL is valid.
pub const URL_LIFETIME_SECS: u64 = 3600;

/// What a signed URL grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    /// The tenant owning the checkpoint.
    pub tenant: String,
    /// The checkpoint's `tinker://` path.
    pub path: String,
    /// One file of it.
    pub file: String,
    /// Unix seconds after which the URL is refused.
    pub expires: u64,
}

/// Signs and checks download tokens.
pub struct Signer {
    key: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The secret in `dir/name`, created (32 random bytes, owner-only, written whole or not at all)
/// when absent. One that cannot be read is an error, never replaced: whatever it signed would
/// stop being accepted.
pub(crate) fn secret_in_dir(dir: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let file = dir.join(name);
    match std::fs::read(&file) {
        Ok(key) if key.len() >= 32 => return Ok(key),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Ok(_) | Err(_) => {}
    }
    std::fs::create_dir_all(dir)?;
    let key: Vec<u8> = (0..2)
        .flat_map(|_| uuid::Uuid::new_v4().into_bytes())
        .collect();
    let staging = dir.join(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut out = options.open(&staging)?;
        out.write_all(&key)?;
        out.sync_all()?;
    }
    std::fs::rename(&staging, &file)?;
    Ok(key)
}

impl Signer {
    /// A signer with `key`.
    pub fn new(key: Vec<u8>) -> Self {
        Signer { key }
    }

    /// The signer whose key is in `dir/download-url.key`, created when absent.
    pub fn in_dir(dir: &Path) -> std::io::Result<Self> {
        secret_in_dir(dir, "download-url.key").map(Signer::new)
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(payload);
        mac
    }

    /// The token of `grant`: its JSON, hex-encoded, a dot, the signature.
    pub fn sign(&self, grant: &Grant) -> String {
        let payload = serde_json::to_vec(grant).expect("a grant serialises");
        let signature = self.mac(&payload).finalize().into_bytes();
        format!("{}.{}", hex(&payload), hex(&signature))
    }

    /// The grant of `token` when its signature holds and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, ApiError> {
        let refused = || ApiError::Forbidden("this download link is not valid".into());
        let (payload, signature) = token.split_once('.').ok_or_else(refused)?;
        let payload = unhex(payload).ok_or_else(refused)?;
        let signature = unhex(signature).ok_or_else(refused)?;
        self.mac(&payload)
            .verify_slice(&signature)
            .map_err(|_| refused())?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|_| refused())?;
        if now > grant.expires {
            return Err(ApiError::Forbidden(
                "this download link has expired; ask for new ones (get_external_weights_urls)"
                    .into(),
            ));
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_grants_its_file_until_it_expires_and_cannot_be_altered() {
        let signer = Signer::new(vec![7; 32]);
        let grant = Grant {
            tenant: "alice".into(),
            path: "tinker://s:train:0/external_weights/final".into(),
            file: "adapter_model.safetensors".into(),
            expires: 1000,
        };
        let token = signer.sign(&grant);
        assert_eq!(signer.verify(&token, 999).unwrap(), grant);
        assert!(signer.verify(&token, 1001).is_err());
        let other = Signer::new(vec![8; 32]);
        assert!(other.verify(&token, 999).is_err());
        // Another tenant, file or expiry in the payload breaks the signature.
        let (_, signature) = token.split_once('.').unwrap();
        for forged in [
            Grant {
                tenant: "bob".into(),
                ..grant.clone()
            },
            Grant {
                file: "optimizer.safetensors".into(),
                ..grant.clone()
            },
            Grant {
                expires: u64::MAX,
                ..grant.clone()
            },
        ] {
            let payload = hex(&serde_json::to_vec(&forged).unwrap());
            assert!(signer
                .verify(&format!("{payload}.{signature}"), 999)
                .is_err());
        }
        assert!(signer.verify("nonsense", 0).is_err());
    }

    #[test]
    fn the_key_is_kept_across_restarts() {
        let dir = std::env::temp_dir().join(format!("loraloom-signer-{}", uuid::Uuid::new_v4()));
        let grant = Grant {
            tenant: "t".into(),
            path: "p".into(),
            file: "f".into(),
            expires: 10,
        };
        let token = Signer::in_dir(&dir).unwrap().sign(&grant);
        assert_eq!(
            Signer::in_dir(&dir).unwrap().verify(&token, 5).unwrap(),
            grant
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
