//! Exported weights (`save_weights_external`): a PEFT adapter directory a client downloads,
//! optionally encrypted file by file to `age` recipients (`<file>.age`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use crate::error::{EngineError, Result};

/// Most recipients one export may be encrypted to (the SDK documents ten).
pub const MAX_RECIPIENTS: usize = 10;

/// Parses `age` recipients: native `age1...` keys or SSH public keys (`ssh-ed25519 ...`,
/// `ssh-rsa ...`). Errors name the offending entry.
pub fn parse_recipients(given: &[String]) -> Result<Vec<Box<dyn age::Recipient + Send>>> {
    const FIELD: &str = "age_encryption_recipients";
    if given.len() > MAX_RECIPIENTS {
        return Err(EngineError::invalid(
            FIELD,
            format!("at most {MAX_RECIPIENTS} recipients, got {}", given.len()),
        ));
    }
    given
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let text = text.trim();
            let parsed: std::result::Result<Box<dyn age::Recipient + Send>, String> =
                if text.starts_with("age1") {
                    age::x25519::Recipient::from_str(text)
                        .map(|r| Box::new(r) as Box<dyn age::Recipient + Send>)
                        .map_err(str::to_string)
                } else {
                    age::ssh::Recipient::from_str(text)
                        .map(|r| Box::new(r) as Box<dyn age::Recipient + Send>)
                        .map_err(|e| format!("{e:?}"))
                };
            parsed.map_err(|e| {
                EngineError::invalid(
                    format!("{FIELD}[{i}]"),
                    format!("not an age (age1...) or SSH public key: {e}"),
                )
            })
        })
        .collect()
}

/// Saves `request` to `dir` with every file encrypted to `recipients`: written and encrypted in
/// a staging directory (`.NAME.tmp-TAG-NANOS`, which a restart tidies), then renamed into place,
/// replacing an earlier export of the name.
pub fn save_encrypted(
    request: &loraloom_model::checkpoint::SaveRequest,
    dir: &Path,
    recipients: &[Box<dyn age::Recipient + Send>],
) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Internal(format!("placing an export: {e}"));
    if dir.file_name().is_none() {
        return Err(EngineError::Internal("an export has no name".into()));
    }
    let staging = loraloom_model::checkpoint::unique_sibling(dir, "tmp");
    let placed = (|| {
        loraloom_model::checkpoint::save(request, &staging)?;
        encrypt_dir(&staging, recipients)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::rename(&staging, dir).map_err(io)?;
        if let Some(parent) = dir.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    })();
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    placed
}

/// Encrypts every file of `dir` to `recipients` as `<file>.age` (written under a temporary
/// name, synced, renamed), then removes the plaintext.
pub fn encrypt_dir(dir: &Path, recipients: &[Box<dyn age::Recipient + Send>]) -> Result<()> {
    let io = |e: std::io::Error| EngineError::Internal(format!("encrypting an export: {e}"));
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    files.sort();
    for plain in files {
        let name = plain
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| EngineError::Internal("an export file name is not UTF-8".into()))?;
        let sealed = dir.join(format!("{name}.age"));
        let staging = dir.join(format!(".{name}.age.tmp"));
        let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r.as_ref() as _))
            .map_err(|e| EngineError::Internal(format!("age: {e}")))?;
        let out = File::create(&staging).map_err(io)?;
        let mut writer = encryptor.wrap_output(BufWriter::new(out)).map_err(io)?;
        std::io::copy(
            &mut BufReader::new(File::open(&plain).map_err(io)?),
            &mut writer,
        )
        .map_err(io)?;
        let mut out = writer.finish().map_err(io)?;
        out.flush().map_err(io)?;
        out.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&staging, &sealed).map_err(io)?;
        std::fs::remove_file(&plain).map_err(io)?;
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_sealed_to_the_recipient_and_only_it_opens_them() {
        let dir = std::env::temp_dir().join(format!("loraloom-export-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), b"{\"r\": 4}").unwrap();
        let identity = age::x25519::Identity::generate();
        let recipients = parse_recipients(&[identity.to_public().to_string()]).unwrap();
        encrypt_dir(&dir, &recipients).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["adapter_config.json.age"]);
        let sealed = std::fs::read(dir.join("adapter_config.json.age")).unwrap();
        let opened = age::decrypt(&identity, &sealed).unwrap();
        assert_eq!(opened, b"{\"r\": 4}");
        let other = age::x25519::Identity::generate();
        assert!(age::decrypt(&other, &sealed).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_recipients_are_named() {
        let Err(err) = parse_recipients(&["age1qqq".into()]) else {
            panic!("a bad key was accepted");
        };
        assert!(
            matches!(&err, EngineError::InvalidInput { field, .. } if field == "age_encryption_recipients[0]"),
            "{err:?}"
        );
        let many = vec![age::x25519::Identity::generate().to_public().to_string(); 11];
        assert!(parse_recipients(&many).is_err());
    }
}
