//! Memory limits resolved from the machine: the activation budget of one training pass
//! (`--memory-budget`), the keys and values of a decode loop (`--max-kv-tokens`) and the
//! resident adapters of all tenants and of one (`--max-resident-bytes`,
//! `--max-resident-bytes-per-tenant`): by default shares of the memory free once the model is
//! loaded that add up to it.

use loraloom_model::{human_bytes, parse_bytes, Device, Mxfp4Policy};

/// The share of the memory free after the model loaded that training passes may use together;
/// with the decode caches' ([`KV_SHARE`]) and the resident adapters' ([`RESIDENT_SHARE`]) the
/// shares add up to what was free.
const AUTO_SHARE: f64 = 0.5;

/// Used when the free memory cannot be read.
const FALLBACK: u64 = 4 << 30;

/// Resolves `--memory-budget` (`auto` or a size such as `8G`) into bytes per pass, with a
/// line saying where the figure came from. `auto` divides half of the memory free now (RAM on
/// the CPU, the GPU's own memory on a GPU) among the `workers`, which can run passes at once.
pub fn resolve(choice: &str, device: Device, workers: usize) -> anyhow::Result<(u64, String)> {
    if choice.trim() != "auto" {
        let bytes = parse_bytes(choice).map_err(|e| anyhow::anyhow!("--memory-budget: {e}"))?;
        return Ok((bytes, format!("{} per pass (set)", human_bytes(bytes))));
    }
    let (free, source) = free_memory(device);
    Ok(match free {
        Some(free) => {
            let bytes = (free as f64 * AUTO_SHARE) as u64 / workers.max(1) as u64;
            (
                bytes,
                format!(
                    "{} per pass (auto: half of {} {source}, over {workers} worker(s))",
                    human_bytes(bytes),
                    human_bytes(free)
                ),
            )
        }
        None => (
            FALLBACK,
            format!(
                "{} per pass (auto: {source} could not be read; set --memory-budget)",
                human_bytes(FALLBACK)
            ),
        ),
    })
}

/// Resolves `--mxfp4` (`auto`, `packed` or `dequantize`) into how a checkpoint's MXFP4 weights
/// (GPT-OSS's experts) load, with a line saying why. `auto` keeps them packed when dequantized
/// they would take more than half of the memory free now (RAM on the CPU, the GPU's own memory
/// on a GPU): gpt-oss-120b on one 80 GB GPU, or gpt-oss-20b on a 24 GB one.
pub fn mxfp4(choice: &str, device: Device) -> anyhow::Result<(Mxfp4Policy, String)> {
    Ok(match choice.trim() {
        "packed" => (Mxfp4Policy::Packed, "packed (set)".into()),
        "dequantize" => (Mxfp4Policy::Dequantize, "dequantized at load (set)".into()),
        "auto" => {
            let (free, what) = free_or(device, FALLBACK * 2);
            let limit = (free as f64 * AUTO_SHARE) as u64;
            (
                Mxfp4Policy::PackedAbove(limit),
                format!(
                    "auto: packed if dequantized they would take more than {}, half of {what}",
                    human_bytes(limit)
                ),
            )
        }
        other => anyhow::bail!("--mxfp4: `{other}` is not auto, packed or dequantize"),
    })
}

/// The share of the memory free after the model loaded that resident adapters (all tenants'
/// runs and sampling sessions) may hold together.
const RESIDENT_SHARE: f64 = 0.25;

/// Resolves a byte limit `flag` given as `auto` (`auto()` gives the bytes and where they came
/// from), `0` (no limit) or a size such as `4G`, into bytes with a line saying where the
/// figure came from.
pub fn byte_limit(
    flag: &str,
    choice: &str,
    auto: impl FnOnce() -> (u64, String),
) -> anyhow::Result<(u64, String)> {
    Ok(match choice.trim() {
        "0" => (0, "no limit".into()),
        "auto" => {
            let (bytes, source) = auto();
            (bytes, format!("{} (auto: {source})", human_bytes(bytes)))
        }
        size => {
            let bytes = parse_bytes(size).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
            (bytes, format!("{} (set)", human_bytes(bytes)))
        }
    })
}

/// Resolves `--max-resident-bytes` ([`byte_limit`]); `auto` is a quarter of the memory free
/// now (RAM, or the GPU's memory on a GPU, where adapters live).
pub fn resident(choice: &str, device: Device) -> anyhow::Result<(u64, String)> {
    byte_limit("--max-resident-bytes", choice, || {
        let (free, source) = free_memory(device);
        let free = free.unwrap_or(FALLBACK * 2);
        let bytes = (free as f64 * RESIDENT_SHARE) as u64;
        (
            bytes,
            format!("a quarter of {} {source}", human_bytes(free)),
        )
    })
}

/// Resolves `--max-resident-bytes-per-tenant` ([`byte_limit`]); `auto` is `overall`, what
/// `--max-resident-bytes` resolved to: one tenant may fill the adapters' share, and when
/// several hold adapters, eviction takes from the one holding the most.
pub fn tenant_resident(choice: &str, overall: u64) -> anyhow::Result<(u64, String)> {
    byte_limit("--max-resident-bytes-per-tenant", choice, || {
        (overall, "as --max-resident-bytes".into())
    })
}

/// The share of the memory free after the model loaded that decode caches (and kept prefixes)
/// may hold together.
const KV_SHARE: f64 = 0.25;

/// Bytes allowed per token of the budget, in tokens' bytes: a join or a leave copies a decode
/// batch's cache into new buffers while the old ones still exist, so the loop briefly holds
/// its keys and values twice.
const KV_COPIES: u64 = 2;

/// Resolves `--max-kv-tokens` (`auto` or a number of tokens) into the tokens each worker's
/// decode loop may hold, with a line saying where the figure came from. `auto` divides a
/// quarter of the memory free now among the `workers`, at `bytes_per_token` bytes a token
/// and [`KV_COPIES`] times that for the copy a join or a leave makes.
pub fn kv_tokens(
    choice: &str,
    device: Device,
    workers: usize,
    bytes_per_token: u64,
) -> anyhow::Result<(usize, String)> {
    let per_token = bytes_per_token.max(1);
    let describe = |tokens: usize, how: String| {
        let bytes = tokens as u64 * per_token;
        format!("{tokens} tokens ({}; {how})", human_bytes(bytes))
    };
    if choice.trim() != "auto" {
        let tokens: usize = choice
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("--max-kv-tokens: {choice:?}: {e}"))?;
        return Ok((tokens, describe(tokens, "set".into())));
    }
    let (free, what) = free_or(device, FALLBACK);
    let share = (free as f64 * KV_SHARE) as u64 / workers.max(1) as u64;
    let tokens = (share / (per_token * KV_COPIES)).max(MIN_KV_TOKENS as u64) as usize;
    let how = format!("auto: a quarter of {what} over {workers} worker(s), halved for copies");
    Ok((tokens, describe(tokens, how)))
}

/// Fewest tokens `auto` gives a decode loop, however little memory is free.
const MIN_KV_TOKENS: usize = 4096;

/// The memory free now where the model runs, and what it is.
fn free_memory(device: Device) -> (Option<u64>, &'static str) {
    match device {
        Device::Cuda(index) => (gpu_free(index), "the GPU's free memory"),
        _ => (ram_available(), "available RAM"),
    }
}

/// The memory free now where the model runs, or `fallback` when it cannot be read, with a
/// phrase saying which.
fn free_or(device: Device, fallback: u64) -> (u64, String) {
    match free_memory(device) {
        (Some(free), source) => (free, format!("{} {source}", human_bytes(free))),
        (None, source) => (
            fallback,
            format!("{} ({source} could not be read)", human_bytes(fallback)),
        ),
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn ram_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Free memory of GPU `index` as `nvidia-smi` reports it (libtorch's bindings do not expose
/// `cudaMemGetInfo`), in bytes.
fn gpu_free(index: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.free",
            "--format=csv,noheader,nounits",
            "-i",
            &index.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxfp4_is_packed_dequantized_or_packed_above_half_of_free_memory() {
        assert_eq!(mxfp4("packed", Device::Cpu).unwrap().0, Mxfp4Policy::Packed);
        assert_eq!(
            mxfp4("dequantize", Device::Cpu).unwrap().0,
            Mxfp4Policy::Dequantize
        );
        let free = ram_available().unwrap();
        let Mxfp4Policy::PackedAbove(limit) = mxfp4("auto", Device::Cpu).unwrap().0 else {
            panic!("auto is a limit");
        };
        // MemAvailable moves between the two reads.
        assert!(limit.abs_diff(free / 2) <= free / 20, "{limit} vs {free}");
        let err = mxfp4("fp4", Device::Cpu).unwrap_err().to_string();
        assert!(err.starts_with("--mxfp4:"), "{err}");
    }

    #[test]
    fn sizes_and_auto_resolve() {
        let (bytes, why) = resolve("8G", Device::Cpu, 2).unwrap();
        assert_eq!(bytes, 8 << 30);
        assert!(why.contains("8.0 GiB"), "{why}");
        let (one, _) = resolve("auto", Device::Cpu, 1).unwrap();
        assert!(one > 0);
        assert!(resolve("lots", Device::Cpu, 1).is_err());
    }

    #[test]
    fn kv_tokens_are_a_number_or_a_quarter_of_free_memory_at_twice_the_bytes_of_a_token() {
        assert_eq!(kv_tokens("1000", Device::Cpu, 1, 64).unwrap().0, 1000);
        let err = kv_tokens("lots", Device::Cpu, 1, 64)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--max-kv-tokens:"), "{err}");
        let free = ram_available().unwrap();
        let (one, why) = kv_tokens("auto", Device::Cpu, 1, 1 << 10).unwrap();
        let want = (free / 4 / 2 / 1024) as usize;
        // MemAvailable moves between the two reads.
        assert!(
            one.abs_diff(want) <= want / 10 + 1,
            "{one} vs {want}: {why}"
        );
        let (two, _) = kv_tokens("auto", Device::Cpu, 2, 1 << 10).unwrap();
        assert!(
            two.abs_diff(want / 2) <= want / 10 + 1,
            "{two} vs {}",
            want / 2
        );
        // However large a token, a loop gets the floor.
        let (floor, _) = kv_tokens("auto", Device::Cpu, 1, 1 << 40).unwrap();
        assert_eq!(floor, MIN_KV_TOKENS);
    }

    #[test]
    fn byte_limits_are_auto_none_or_a_size_and_bad_ones_name_the_flag() {
        let auto = || (7, "seven".to_string());
        assert_eq!(byte_limit("--f", "0", auto).unwrap().0, 0);
        assert_eq!(byte_limit("--f", " auto ", auto).unwrap().0, 7);
        assert_eq!(byte_limit("--f", "4G", auto).unwrap().0, 4 << 30);
        let err = byte_limit("--f", "lots", auto).unwrap_err().to_string();
        assert!(err.starts_with("--f:"), "{err}");
    }

    #[test]
    fn resident_adapters_get_a_quarter_of_free_memory_and_a_tenant_all_of_it() {
        let free = ram_available().unwrap();
        let (all, why) = resident("auto", Device::Cpu).unwrap();
        // MemAvailable moves between the two reads.
        assert!(
            all.abs_diff(free / 4) <= free / 40,
            "{all} vs {}: {why}",
            free / 4
        );
        assert_eq!(tenant_resident("auto", all).unwrap().0, all);
        assert_eq!(tenant_resident("1G", all).unwrap().0, 1 << 30);
        let err = resident("lots", Device::Cpu).unwrap_err().to_string();
        assert!(err.starts_with("--max-resident-bytes:"), "{err}");
    }
}
