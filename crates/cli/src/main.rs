//! The `loraloom` binary: `serve` starts the HTTP server on one base model; `bench` measures.

mod bench;
mod budget;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dashmap::DashMap;
use loraloom_api::state::Session;
use loraloom_api::{parse_keys, router, AppState, Auth};
use loraloom_engine::{
    Backend, BaseModel, Engine, EngineConfig, Limits, ModelWorker, Registry, SqliteStore, Store,
};
use loraloom_model::StepGraphs;

/// Name under which the embedded default model is served.
const DEFAULT_MODEL_NAME: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
/// Directory (under `<data-dir>/models`) the default model is converted into by `make run`.
const DEFAULT_MODEL_DIR: &str = "SmolLM2-135M-Instruct";

/// Multi-tenant LoRA fine-tuning server speaking the Tinker API.
#[derive(Parser)]
#[command(name = "loraloom", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Tinker API over HTTP.
    Serve(Box<ServeArgs>),
    /// Measure throughput (JSON lines; `scripts/bench` adds the baselines and ratios).
    Bench(Box<BenchArgs>),
}

/// Flags of `bench`.
#[derive(Args)]
struct BenchArgs {
    /// Checkpoint directory.
    #[arg(long, env = "LORALOOM_MODEL")]
    model: PathBuf,
    /// What to measure: roofline, forward, train, decode, decode_staggered, decode_phases,
    /// seeded_crowd, optim, engine, long (comma-separated; `long` reports the process's peak
    /// memory, so run it alone).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "roofline,forward,train,decode,engine"
    )]
    what: Vec<String>,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Tenant counts of the engine benchmark.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    tenants: Vec<usize>,
    /// Steps per tenant in the engine benchmark.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Where the model runs: auto (a GPU when libtorch sees one), cpu, cuda or cuda:N.
    #[arg(long, env = "LORALOOM_DEVICE", default_value = "auto")]
    device: String,
    /// The base model's compute dtype: auto (f32 on the CPU, bf16 on a GPU), f32 or bf16.
    #[arg(long, env = "LORALOOM_DTYPE", default_value = "auto")]
    dtype: String,
    /// A checkpoint's MXFP4 weights: auto, packed or dequantize (as for `serve`).
    #[arg(long, env = "LORALOOM_MXFP4", default_value = "auto")]
    mxfp4: String,
    /// Sampling temperature of the `decode` benchmark (0: greedy; RL samples at 1).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Datums x tokens of the `train` benchmark's batch (many short datums show what each datum
    /// costs beyond its tokens). Several, comma-separated, are measured one after the other in
    /// one process: each line's `first_seconds` is what its first step cost, so a shape's
    /// one-time cost (e.g. a GPU kernel's plan for a new shape) shows after the first shape.
    #[arg(long, value_delimiter = ',', default_value = "4x128", value_parser = parse_shape)]
    train_shape: Vec<(usize, usize)>,
    /// Decode steps of the `decode` benchmark: `off`, `cuda` (as `serve --step-graphs`; each
    /// line is then also checked against steps issued one by one) or `emulate` (the recording
    /// path without a graph, on any device: a dry run of `cuda`).
    #[arg(long, default_value = "off", value_parser = parse_step_graphs)]
    step_graphs: StepGraphs,
    /// Rows (sequences of one adapter) of the `decode_phases` benchmark, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64",
          value_parser = clap::value_parser!(i64).range(1..=4096))]
    decode_rows: Vec<i64>,
    /// Adapters the `train` benchmark's datums are split over (one fused pass and optimizer
    /// step, as the engine runs a batch of tenants); must divide the batch.
    #[arg(long, default_value_t = 1)]
    train_adapters: usize,
    /// Most tokens per sequence of the `decode_staggered` benchmark: of its n sequences,
    /// sequence i asks for `new_tokens × (n + i) / 2n` (from half of it to almost all).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(i64).range(1..))]
    new_tokens: i64,
    /// Tokens of the datum of the `long` benchmark.
    #[arg(long, default_value_t = 8192)]
    len: usize,
    /// Activation memory budget of the `long` benchmark (`auto` as for `serve`, or a size).
    #[arg(long, default_value = "auto")]
    memory_budget: String,
}

/// `--step-graphs` for `decoder`, logged: recorded steps keep the memory they used for as
/// long as they replay, so a model that dequantizes packed experts as it runs (a whole
/// layer's, in a batch of many rows) decodes eagerly instead.
fn step_graphs_for(graphs: StepGraphs, decoder: &loraloom_model::Decoder) -> StepGraphs {
    if graphs == StepGraphs::Cuda && decoder.dequantized_weight_bytes() > 0 {
        tracing::warn!(
            "decode steps issued one by one: --step-graphs cuda would keep each recorded step's \
             dequantized MXFP4 experts ({}) for as long as it replays (see --mxfp4)",
            loraloom_model::human_bytes(decoder.dequantized_weight_bytes())
        );
        return StepGraphs::Off;
    }
    log_step_graphs(graphs, decoder.device());
    graphs
}

/// Says at start what `--step-graphs` will do on `device`.
fn log_step_graphs(graphs: StepGraphs, device: loraloom_model::Device) {
    match graphs {
        StepGraphs::Cuda if !device.is_cuda() => {
            tracing::info!("decode steps issued one by one: --step-graphs cuda needs a CUDA device")
        }
        StepGraphs::Cuda if !loraloom_model::step_graph::can_record() => tracing::warn!(
            "decode steps issued one by one: this build has no CUDA graphs \
             (libtorch without CUDA, or CUDA's headers were missing at build time)"
        ),
        StepGraphs::Cuda => tracing::info!("decode steps recorded as CUDA graphs"),
        _ => {}
    }
}

/// `off`, `cuda` or `emulate` ([`StepGraphs`]).
fn parse_step_graphs(s: &str) -> Result<StepGraphs, String> {
    match s {
        "off" => Ok(StepGraphs::Off),
        "cuda" => Ok(StepGraphs::Cuda),
        "emulate" => Ok(StepGraphs::Emulate),
        _ => Err(format!("`{s}`: expected off, cuda or emulate")),
    }
}

/// `BATCHxLEN` (e.g. `4x128`), both positive.
fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (batch, len) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}`: expected BATCHxLEN, e.g. 4x128"))?;
    let positive = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{v}` is not a positive integer"))
    };
    Ok((positive(batch)?, positive(len)?))
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    // The main thread never runs libtorch work: the load and each measurement run on a thread
    // of their own (see `bench::isolated`).
    let device = loraloom_model::parse_device(&args.device)?;
    let kind = loraloom_model::parse_dtype(&args.dtype)?;
    let (mxfp4, _) = budget::mxfp4(&args.mxfp4, device)?;
    let base = bench::isolated(|| bench::load(&args.model, device, kind, mxfp4))?;
    bench::describe(&base);
    let iters = args.iters;
    for what in &args.what {
        let d = base.decoder().shallow_clone();
        match what.as_str() {
            "roofline" => bench::isolated(|| bench::roofline(iters))?,
            "forward" => bench::isolated(move || bench::forward(&d, 4, 128, iters))?,
            "train" => {
                let shapes = args.train_shape.clone();
                let adapters = args.train_adapters;
                bench::isolated(move || {
                    shapes
                        .iter()
                        .try_for_each(|&(batch, len)| bench::train(&d, batch, len, adapters, iters))
                })?
            }
            "decode" => {
                let how = bench::DecodeHow {
                    new_tokens: 32,
                    iters,
                    temperature: args.temperature,
                    graphs: args.step_graphs,
                    staggered: false,
                };
                bench::isolated(move || {
                    bench::decode(&d, 1, 0, false, how)?;
                    bench::decode(&d, 8, 1, false, how)?;
                    bench::decode(&d, 8, 8, false, how)?;
                    bench::decode(&d, 32, 8, true, how)?;
                    // Issue 11's GPU goal: 64 sequences over 16 adapters against 64 of one
                    // adapter (both one request per sequence, so both prefill 64 prompts).
                    bench::decode(&d, 64, 1, true, how)?;
                    bench::decode(&d, 64, 16, true, how)
                })?
            }
            "decode_staggered" => {
                // An RL group: 32 sequences of one adapter, one request each, ending at
                // different steps, so rows leave the decode batch one by one.
                let how = bench::DecodeHow {
                    new_tokens: args.new_tokens,
                    iters,
                    temperature: args.temperature,
                    graphs: args.step_graphs,
                    staggered: true,
                };
                bench::isolated(move || bench::decode(&d, 32, 1, true, how))?
            }
            "seeded_crowd" => {
                // Issue 11: a seeded request draws the same tokens alone and in a crowd.
                let new_tokens = args.new_tokens;
                bench::isolated(move || bench::seeded_crowd(&d, 32, 8, new_tokens))?
            }
            "optim" => bench::isolated(move || bench::optim(&d, &[1, 16, 64], iters))?,
            "decode_phases" => {
                let rows = args.decode_rows.clone();
                bench::isolated(move || {
                    rows.iter()
                        .try_for_each(|&rows| bench::decode_phases(&d, rows, 32, iters))
                })?
            }
            "long" => {
                let (budget, _) = budget::resolve(&args.memory_budget, d.device(), 1)?;
                let len = args.len;
                bench::isolated(move || bench::long_datum(&d, len, budget))?
            }
            "engine" => {
                for &n in &args.tenants {
                    bench::engine(base.info(), &d, n, 128, args.steps)?;
                }
            }
            other => anyhow::bail!("unknown benchmark `{other}`"),
        }
    }
    Ok(())
}

/// Flags of `serve`. No `Debug`: it carries API keys.
#[derive(Args)]
struct ServeArgs {
    /// Address to bind.
    #[arg(long, env = "LORALOOM_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0 picks a free one).
    #[arg(long, env = "LORALOOM_PORT", default_value_t = 8000)]
    port: u16,
    /// `default` for the embedded SmolLM2-135M-Instruct, or a Hugging Face checkpoint directory
    /// (config.json, *.safetensors, tokenizer.json).
    #[arg(long, env = "LORALOOM_MODEL", default_value = "default")]
    model: String,
    /// Where the model runs: auto (the first GPU when libtorch sees one, else the CPU), cpu,
    /// cuda or cuda:N. On a GPU the base model runs in bf16 unless `--dtype` says otherwise;
    /// adapters and optimizer state stay f32.
    #[arg(long, env = "LORALOOM_DEVICE", default_value = "auto")]
    device: String,
    /// The base model's compute dtype: auto (f32 on the CPU, bf16 on a GPU), f32 or bf16
    /// (halves the model's and the decode caches' memory; on the CPU, fast only where the
    /// processor has bf16 matrix instructions). Adapters and optimizer state stay f32.
    #[arg(long, env = "LORALOOM_DTYPE", default_value = "auto")]
    dtype: String,
    /// A checkpoint's MXFP4 weights (GPT-OSS's experts): packed (4.25 bits a weight, each
    /// layer dequantizing the experts it multiplies by as it runs), dequantize (into the
    /// model's dtype at load: 16 bits a weight in bf16, faster), or auto (packed when
    /// dequantized they would take more than half of the free memory).
    #[arg(long, env = "LORALOOM_MXFP4", default_value = "auto")]
    mxfp4: String,
    /// Name clients use as `base_model` (defaults to the model's directory name).
    #[arg(long, env = "LORALOOM_MODEL_NAME")]
    model_name: Option<String>,
    /// What the SDK's `get_tokenizer()` loads (`get_info`'s `tokenizer_id`). Defaults to the
    /// model's directory, which it loads with no network on this machine; give a Hugging Face
    /// name for clients on other machines.
    #[arg(long, env = "LORALOOM_TOKENIZER_ID")]
    tokenizer_id: Option<String>,
    /// The base of the URLs handed to clients (download links of exported weights), e.g.
    /// `https://loom.example.com` behind a proxy. Defaults to the host a request came in by.
    #[arg(long, env = "LORALOOM_PUBLIC_URL")]
    public_url: Option<String>,
    /// Where models, checkpoints and the database live.
    #[arg(long, env = "LORALOOM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// An API key as `tenant=tml-...` (repeatable; comma-separated in the env variable).
    /// Without any key, loraloom runs single-tenant on loopback and accepts any `tml-` key.
    #[arg(
        long = "api-key",
        env = "LORALOOM_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// A file of API keys, one `tenant=tml-...` (or `tenant tml-...`) per line.
    #[arg(long, env = "LORALOOM_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// A tenant's scheduling weight as `tenant=W` (1 to 1000; repeatable, comma-separated in the
    /// env variable; others weigh 1): a tenant of weight W gets W turns for each turn of a
    /// tenant of weight 1, to start a batch and to join one, when the budget cannot take all.
    #[arg(
        long = "tenant-weight",
        env = "LORALOOM_TENANT_WEIGHTS",
        value_delimiter = ','
    )]
    tenant_weights: Vec<String>,
    /// Training runs one tenant may hold (0 = unlimited).
    #[arg(long, env = "LORALOOM_MAX_RUNS_PER_TENANT", default_value_t = 64)]
    max_runs_per_tenant: usize,
    /// Training runs the server may hold in total (0 = unlimited).
    #[arg(long, env = "LORALOOM_MAX_RUNS", default_value_t = 1024)]
    max_runs: usize,
    /// Sampled sequences one tenant may have recorded for `stable_reinforce`
    /// (`record_stability_info`); beyond it the least recently used are forgotten (checked every
    /// minute). Each is kept a day after it was sampled or last trained on.
    #[arg(
        long,
        env = "LORALOOM_MAX_RECORDED_SAMPLES_PER_TENANT",
        default_value_t = 50_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_recorded_samples_per_tenant: u64,
    /// Runs whose weights stay in memory (0 = all); least recently used idle runs beyond this
    /// are written to their snapshot and reloaded by their next job.
    #[arg(long, env = "LORALOOM_MAX_RESIDENT_RUNS", default_value_t = 0)]
    max_resident_runs: usize,
    /// Sampling sessions whose checkpoint weights stay loaded (0 = all); least recently used
    /// idle ones beyond this are dropped and reloaded by their next sample.
    #[arg(long, env = "LORALOOM_MAX_RESIDENT_SAMPLERS", default_value_t = 32)]
    max_resident_samplers: usize,
    /// Bytes of adapters all tenants together may keep in memory, runs and sampling sessions
    /// (each run holds weights, gradients and two Adam moments): `auto` (a quarter of the
    /// memory free once the model is loaded, RAM or the GPU's: with training passes' half and
    /// decode caches' quarter, the shares add up to what was free), a size such as `16G`, or 0
    /// (no limit). After each batch, idle ones beyond it are evicted (runs to their snapshot,
    /// reloaded by their next job), the least recently used of the tenant holding the most
    /// first; a run larger than it alone is refused at creation.
    #[arg(long, env = "LORALOOM_MAX_RESIDENT_BYTES", default_value = "auto")]
    max_resident_bytes: String,
    /// Bytes of adapters one tenant may keep in memory, runs and sampling sessions together:
    /// `auto` (as `--max-resident-bytes`), a size such as `4G`, or 0 (no limit). After each
    /// batch the tenant's least recently used idle ones beyond it are evicted; a run larger
    /// than it alone is refused at creation.
    #[arg(
        long,
        env = "LORALOOM_MAX_RESIDENT_BYTES_PER_TENANT",
        default_value = "auto"
    )]
    max_resident_bytes_per_tenant: String,
    /// Worker threads running model work (1 is best on CPU).
    #[arg(long, env = "LORALOOM_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Token budget of one fused batch.
    #[arg(long, env = "LORALOOM_MAX_BATCH_TOKENS", default_value_t = 8192)]
    max_batch_tokens: usize,
    /// Largest forward_backward / forward request in tokens (all its datums together); larger
    /// requests are refused (split them into several calls). The SDK is told it through the
    /// client config and splits larger batches itself.
    #[arg(long, env = "LORALOOM_MAX_REQUEST_TOKENS", default_value_t = 32768)]
    max_request_tokens: usize,
    /// Activation memory one training or scoring pass may hold: `auto` (half of the memory
    /// free once the model is loaded, RAM or the GPU's, over the workers) or a size such as
    /// `8G`. Larger batches run in micro-batches (same gradients), a datum too long for it runs
    /// with activation checkpointing, and one too long even so is refused with a 400.
    #[arg(long, env = "LORALOOM_MEMORY_BUDGET", default_value = "auto")]
    memory_budget: String,
    /// Jobs one tenant may have queued.
    #[arg(long, env = "LORALOOM_MAX_QUEUED_PER_TENANT", default_value_t = 256)]
    max_queued_per_tenant: usize,
    /// Jobs all tenants may have queued together.
    #[arg(long, env = "LORALOOM_MAX_QUEUED", default_value_t = 4096)]
    max_queued: usize,
    /// How long (ms) a batch smaller than the recent batches of its kind, or a training batch
    /// while runs of the last one have not sent their next job, may wait for the rest of the
    /// tenants stepping with it, so that they share one batch (0 = never wait).
    #[arg(long, env = "LORALOOM_BATCH_FILL_WAIT_MS", default_value_t = 10)]
    batch_fill_wait_ms: u64,
    /// Keys and values (tokens) a worker's decode loop may hold: its sequences x the longest
    /// prompt + max_tokens among them (a batch's cache pads rows to its longest), and the prefix
    /// cache's kept sequences, which give way to requests. `auto` (a quarter of the memory free
    /// once the model is loaded, RAM or the GPU's, over the workers, halved for the copy a join
    /// or leave makes) or a number; requests beyond it wait in their queue. A larger request
    /// still runs, once the loop is empty.
    #[arg(long, env = "LORALOOM_MAX_KV_TOKENS", default_value = "auto")]
    max_kv_tokens: String,
    /// Decode steps as CUDA graphs: `cuda` records a decode batch's step once it keeps its
    /// sequences for two steps and replays it (one launch) until they change, on a CUDA device
    /// (elsewhere ignored); `off` issues every step operation by operation.
    #[arg(long, env = "LORALOOM_STEP_GRAPHS", default_value = "off", value_parser = parse_step_graphs)]
    step_graphs: StepGraphs,
    /// Tokens of finished sequences whose keys and values a worker keeps (its prefix cache, least
    /// recently used out first) so that a later prompt of the same tenant and sampler that
    /// starts with one (the next turn of a conversation, a shared system prompt) copies them
    /// instead of computing them; the start-up log gives their size. 0 keeps none.
    #[arg(long, env = "LORALOOM_PREFIX_CACHE_TOKENS", default_value_t = 16384)]
    prefix_cache_tokens: usize,
    /// Client sessions (`create_session`, one per SDK ServiceClient) one tenant may hold (0 = no
    /// limit). Creating one more forgets the tenant's oldest sessions that hold no training run,
    /// sampling session or checkpoint; when every one holds something it is refused (403).
    #[arg(
        long,
        env = "LORALOOM_MAX_SESSIONS_PER_TENANT",
        default_value_t = 10_000
    )]
    max_sessions_per_tenant: usize,
    /// Seconds a session's client may go without a heartbeat (the SDK sends one every 10 s),
    /// while none of its runs runs a job, before its runs count as abandoned: a tenant at
    /// `--max-runs-per-tenant`, or the server at `--max-runs`, then unloads abandoned runs (and
    /// runs of sessions their client finished, `ServiceClient.close`), least recently used
    /// first, to make room for a new one; their checkpoints stay. 0: only finished sessions'
    /// runs are unloaded.
    #[arg(long, env = "LORALOOM_SESSION_TIMEOUT_SECS", default_value_t = 600)]
    session_timeout_secs: u64,
    /// Sampling sessions one tenant may hold (0 = no limit). Registering one more removes the
    /// tenant's least recently used sessions unused for 60 s (with the checkpoints
    /// `save_weights_and_get_sampling_client` saved for them alone).
    #[arg(long, env = "LORALOOM_MAX_SAMPLERS_PER_TENANT", default_value_t = 1024)]
    max_samplers_per_tenant: usize,
    /// Shortest `ttl_seconds` a checkpoint may be given (the SDK documents one hour; expired
    /// checkpoints are deleted within about 5 s).
    #[arg(long, env = "LORALOOM_MIN_CHECKPOINT_TTL_SECS", default_value_t = 3600)]
    min_checkpoint_ttl_secs: u64,
    /// Listed checkpoints one tenant may hold (0 = no limit).
    #[arg(
        long,
        env = "LORALOOM_MAX_CHECKPOINTS_PER_TENANT",
        default_value_t = 1000
    )]
    max_checkpoints_per_tenant: usize,
    /// Bytes of checkpoints one tenant may hold: `auto` (half of the data directory's free disk
    /// space at start), a size such as `20G`, or 0 (no limit).
    #[arg(
        long,
        env = "LORALOOM_MAX_CHECKPOINT_BYTES_PER_TENANT",
        default_value = "auto"
    )]
    max_checkpoint_bytes_per_tenant: String,
    /// Longest a sampling request may decode (0 = no limit); beyond, it is stopped between two
    /// tokens and fails `time_limit`.
    #[arg(long, env = "LORALOOM_MAX_SAMPLE_SECS", default_value_t = 600)]
    max_sample_secs: u64,
    /// Jobs waiting longer than this fail.
    #[arg(long, env = "LORALOOM_QUEUE_TIMEOUT_SECS", default_value_t = 600)]
    queue_timeout_secs: u64,
    /// How long finished results are kept.
    #[arg(long, env = "LORALOOM_FUTURE_TTL_SECS", default_value_t = 3600)]
    future_ttl_secs: u64,
    /// Seconds with no work in flight after which the memory freed by the last burst (a
    /// training step's activations, a decode batch's caches) is given back to the system; the
    /// C allocator keeps it otherwise (0 = keep it).
    #[arg(
        long,
        env = "LORALOOM_RELEASE_MEMORY_AFTER_IDLE_SECS",
        default_value_t = 10.0
    )]
    release_memory_after_idle_secs: f64,
    /// How long one retrieve_future waits before answering "try again" (the SDK times out at 45 s).
    #[arg(long, env = "LORALOOM_LONG_POLL_SECS", default_value_t = 20)]
    long_poll_secs: u64,
    /// Have SDK sampling clients learn that their requests finished from one long poll each
    /// (`/api/v1/retrieve_futures`, the client config's `sample_use_retrieve_futures`) instead
    /// of one long poll per request: one connection per client instead of one per request in
    /// flight, and each result forgotten as soon as its client has fetched it, not a TTL later.
    /// Off by default: tinker 0.38 then spends ~50% more client CPU per sample (BENCHMARKS.md),
    /// and does not bound its requests in flight, so a client with more than
    /// `--max-queued-per-tenant` of them meets 429s (it resends them a second later) where it
    /// would otherwise wait in the SDK.
    #[arg(long, env = "LORALOOM_SAMPLE_POLLER", default_value_t = false, action = clap::ArgAction::Set)]
    sample_poller: bool,
    /// Have SDK clients exchange their API key for an hour-long access token
    /// (`/api/v1/auth/token`, the client config's `pjwt_auth_enabled`) and send the token
    /// instead of the key, so that the key crosses the wire about every half hour per client
    /// instead of with every request. A token works while the key it was issued for is accepted. `false`: clients send
    /// their key with every request.
    #[arg(long, env = "LORALOOM_ACCESS_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    access_tokens: bool,
    /// At SIGTERM or Ctrl-C, how long the jobs already queued or running may go on before the
    /// rest are left to the restarted server in the job journal (a second signal ends the wait
    /// at once); without the journal (`--step-snapshots false`) they fail with "server
    /// restarted".
    #[arg(long, env = "LORALOOM_DRAIN_SECS", default_value_t = 20)]
    drain_secs: u64,
    /// Write each run's state to disk after every optimizer step, before acknowledging it, and
    /// journal every job, so a crash loses no acknowledged step, job or gradient (`false`: the
    /// state only on graceful shutdown, no journal).
    #[arg(long, env = "LORALOOM_STEP_SNAPSHOTS", default_value_t = true, action = clap::ArgAction::Set)]
    step_snapshots: bool,
    /// Seconds a client has to send a request's complete headers; also the longest a kept-alive
    /// connection may stay idle between requests.
    #[arg(long, env = "LORALOOM_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    header_timeout_secs: u64,
    /// Seconds a request body may take to arrive (408 after).
    #[arg(long, env = "LORALOOM_BODY_TIMEOUT_SECS", default_value_t = 60)]
    body_timeout_secs: u64,
    /// Open connections at most (0 = the open files limit less 256); at the cap, the oldest
    /// connection with no request in progress is closed for each new one.
    #[arg(long, env = "LORALOOM_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// Serve `/metrics` without an API key (then without any tenant's series). By default it
    /// needs a key and its per-tenant series show only the caller's tenant.
    #[arg(long, env = "LORALOOM_PUBLIC_METRICS")]
    public_metrics: bool,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "LORALOOM_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
}

/// The model directory and public name `serve` should use.
fn resolve_model(args: &ServeArgs) -> anyhow::Result<(PathBuf, String)> {
    if args.model == "default" {
        let dir = args.data_dir.join("models").join(DEFAULT_MODEL_DIR);
        if !dir.join("config.json").exists() {
            anyhow::bail!(
                "the default model is not prepared in {}; run `make run` (or `.venv/bin/python scripts/prepare_default_model.py {}`)",
                dir.display(),
                dir.display()
            );
        }
        let name = args
            .model_name
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL_NAME.to_string());
        return Ok((dir, name));
    }
    let dir = PathBuf::from(&args.model);
    let name = args.model_name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.model.clone())
    });
    Ok((dir, name))
}

/// `--tenant-weight` entries (`tenant=W`, W from 1 to 1000) by tenant.
fn parse_tenant_weights(entries: &[String]) -> anyhow::Result<HashMap<String, u32>> {
    entries
        .iter()
        .map(|entry| {
            let bad = || {
                anyhow::anyhow!(
                    "--tenant-weight `{entry}`: expected tenant=W with W from 1 to 1000"
                )
            };
            let (tenant, weight) = entry.split_once('=').ok_or_else(bad)?;
            let weight: u32 = weight.trim().parse().map_err(|_| bad())?;
            if tenant.trim().is_empty() || !(1..=1000).contains(&weight) {
                return Err(bad());
            }
            Ok((tenant.trim().to_string(), weight))
        })
        .collect()
}

/// The keys of the flags and of the keys file, with the file's text as read (what
/// [`follow_keys_file`] compares later reads with).
fn load_auth(args: &ServeArgs) -> anyhow::Result<(Auth, Option<String>)> {
    let text = match &args.api_keys_file {
        Some(file) => Some(
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
        ),
        None => None,
    };
    let keys = key_entries(&args.api_keys, text.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let mut auth = Auth::new(keys);
    if args.access_tokens {
        let signer = loraloom_api::tokens::TokenSigner::in_dir(&args.data_dir)
            .context("the access-token key in the data directory")?;
        auth = auth.with_tokens(signer);
    }
    Ok((auth, text))
}

/// The keys of the `--api-key` flags and of the keys file's text. A file that holds no key is
/// refused when it is reloaded ([`follow_keys_file`]): with keys from flags alone, every tenant
/// of the file would be locked out.
fn key_entries(flags: &[String], file: Option<&str>) -> Result<HashMap<String, String>, String> {
    let lines = file.into_iter().flat_map(str::lines);
    parse_keys(flags.iter().map(String::as_str).chain(lines)).map_err(|e| format!("API keys: {e}"))
}

/// How often the keys file is read for changes.
const KEYS_FILE_POLL: Duration = Duration::from_secs(2);

/// Keeps `auth` in step with the keys file `file` (with the `--api-key` flags `flags`), read
/// every [`KEYS_FILE_POLL`]: a change is applied once two reads in a row agree on it (so a file
/// caught half written, which would lock its missing tenants out, is not), and at once on SIGHUP.
/// A file that does not parse, or holds no key, is logged and the keys in force stay.
/// `loaded` is the text the server started with.
/// Audits the keys now in force against those of the last call (or of the last run, at start):
/// each key added or revoked gets an entry in its tenant's audit log, by public id.
fn audit_keys(auth: &Auth, store: &dyn Store, applied_by: &str) {
    if auth.is_single_tenant() {
        return;
    }
    let details = serde_json::json!({ "actor": "operator", "applied_by": applied_by });
    match store.replace_api_keys(
        &auth.key_ids(),
        loraloom_engine::registry::unix_now(),
        &details,
    ) {
        Ok(0) => {}
        Ok(changes) => tracing::info!(changes, "API key changes audited"),
        Err(error) => tracing::error!(%error, "cannot audit the API keys in force"),
    }
}

async fn follow_keys_file(
    auth: Arc<Auth>,
    store: Arc<dyn Store>,
    flags: Vec<String>,
    file: PathBuf,
    loaded: String,
    mut hup: tokio::signal::unix::Signal,
) {
    let mut last_read = loaded.clone();
    let mut applied = loaded;
    let mut unreadable = false;
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            () = tokio::time::sleep(KEYS_FILE_POLL) => false,
        };
        let text = match tokio::fs::read_to_string(&file).await {
            Ok(text) => {
                unreadable = false;
                text
            }
            Err(error) => {
                if forced || !unreadable {
                    tracing::error!(file = %file.display(), %error, "cannot read the API keys file; the keys in force stay");
                }
                unreadable = true;
                continue;
            }
        };
        let settled = last_read == text;
        last_read = text.clone();
        let changed = applied != text;
        let apply = forced || (changed && settled);
        if !apply {
            continue;
        }
        let outcome = match key_entries(&[], Some(&text)) {
            Ok(keys) if keys.is_empty() => Err(
                "the file holds no key: every tenant of the file would be locked out".to_string(),
            ),
            Ok(_) => key_entries(&flags, Some(&text)).and_then(|keys| auth.replace(keys)),
            Err(e) => Err(e),
        };
        applied = text;
        match outcome {
            Ok(change) => {
                tracing::info!(
                    keys_added = change.keys_added,
                    keys_removed = change.keys_removed,
                    tenants_added = ?change.tenants_added,
                    tenants_removed = ?change.tenants_removed,
                    "API keys reloaded"
                );
                audit_keys(&auth, store.as_ref(), "keys file reloaded");
            }
            Err(error) => tracing::error!(
                file = %file.display(),
                %error,
                "API keys not reloaded; the keys in force stay"
            ),
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // SIGHUP reloads the keys file (below); until then, and without a file, it is logged, never
    // the signal's default (which would kill the server with no snapshot).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let (auth, keys_text) = load_auth(&args)?;
    let auth = Arc::new(auth);
    let tenant_weights = parse_tenant_weights(&args.tenant_weights)?;
    if let Some(unknown) = tenant_weights.keys().find(|t| !auth.knows_tenant(t)) {
        anyhow::bail!("--tenant-weight names `{unknown}`, which no API key belongs to");
    }
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("bad --host/--port {}:{}", args.host, args.port))?;
    if auth.is_single_tenant() {
        if !addr.ip().is_loopback() {
            anyhow::bail!("no API keys configured: refusing to serve on non-loopback {addr} (add --api-key or --api-keys-file)");
        }
        tracing::warn!(
            "no API keys configured: single-tenant mode on loopback, any `tml-` key is accepted"
        );
    }
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    let release_memory_after_idle = match args.release_memory_after_idle_secs {
        0.0 => None,
        secs => Some(Duration::try_from_secs_f64(secs).map_err(|_| {
            anyhow::anyhow!(
                "--release-memory-after-idle-secs must be a number of seconds from 0 to 2^64 (got {secs})"
            )
        })?),
    };
    let (dir, name) = resolve_model(&args)?;
    let tokenizer_id = match &args.tokenizer_id {
        Some(id) => id.clone(),
        None => std::fs::canonicalize(&dir)
            .unwrap_or_else(|_| dir.clone())
            .to_string_lossy()
            .into_owned(),
    };
    let device = loraloom_model::parse_device(&args.device).context("--device")?;
    let kind = loraloom_model::parse_dtype(&args.dtype).context("--dtype")?;
    let (mxfp4, mxfp4_source) = budget::mxfp4(&args.mxfp4, device)?;
    tracing::info!(
        device = %loraloom_model::device_name(device),
        requested = %args.device,
        dtype = %args.dtype,
        gpus_visible = tch::Cuda::device_count(),
        "model device"
    );
    tracing::info!("MXFP4 weights, if any: {mxfp4_source}");
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    // Loaded on a thread that then ends, so that the workers are the only threads holding
    // libtorch's OpenMP pools (see CONCURRENCY.md: a lingering pool slows every worker).
    let load_dir = dir.clone();
    let loader = std::thread::Builder::new()
        .name("loraloom-load".into())
        .spawn(move || BaseModel::load(&name, &load_dir, device, kind, mxfp4))?;
    let base = tokio::task::spawn_blocking(move || loader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the model loader panicked"))?
        .with_context(|| format!("loading model from {}", dir.display()))?;
    tracing::info!(model = %base.info().name, "{}", base.info().summary);
    let device = loraloom_model::device_name(base.decoder().device());
    let tokenizer = base.tokenizer().clone();
    let end_tokens = loraloom_model::chat_template::end_tokens(
        &dir,
        &base.info().config.eos_token_ids,
        &tokenizer,
    );
    // A template that does not parse leaves the chat route refusing, not the server down.
    let chat_template = match loraloom_model::ChatTemplate::from_dir(&dir) {
        Ok(template) => template.map(Arc::new),
        Err(error) => {
            tracing::warn!(%error, "the model's chat template is not usable: /oai/api/v1/chat/completions refuses");
            None
        }
    };
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&args.data_dir).context("opening the store")?);
    let registry = Arc::new(
        Registry::durable(args.data_dir.clone(), store.clone()).context("reading the store")?,
    );
    // Keys changed while the server was down are audited now.
    audit_keys(&auth, store.as_ref(), "server start");
    let (memory_budget, budget_source) =
        budget::resolve(&args.memory_budget, base.decoder().device(), args.workers)?;
    tracing::info!("memory budget: {budget_source}");
    let step_graphs = step_graphs_for(args.step_graphs, base.decoder());
    let kv_bytes_per_token = base.decoder().kv_bytes_per_token();
    let (max_kv_tokens, kv_source) = budget::kv_tokens(
        &args.max_kv_tokens,
        base.decoder().device(),
        args.workers,
        kv_bytes_per_token,
    )?;
    tracing::info!("keys and values per worker's decode loop: {kv_source}");
    tracing::info!(
        "prefix cache: up to {} tokens of finished sequences per worker ({}), within that",
        args.prefix_cache_tokens,
        loraloom_model::human_bytes(args.prefix_cache_tokens as u64 * kv_bytes_per_token)
    );
    registry.set_max_samplers_per_tenant(args.max_samplers_per_tenant);
    let (resident_limit, resident_source) =
        budget::resident(&args.max_resident_bytes, base.decoder().device())?;
    tracing::info!("resident adapters, all tenants: {resident_source}");
    registry.set_max_resident_bytes(resident_limit);
    let (tenant_limit, tenant_source) =
        budget::tenant_resident(&args.max_resident_bytes_per_tenant, resident_limit)?;
    tracing::info!("resident adapters per tenant: {tenant_source}");
    registry.set_max_resident_bytes_per_tenant(tenant_limit);
    let (checkpoint_bytes, checkpoint_source) = budget::byte_limit(
        "--max-checkpoint-bytes-per-tenant",
        &args.max_checkpoint_bytes_per_tenant,
        || {
            let free = free_disk_bytes(&args.data_dir);
            (
                free / 2,
                format!("half of {} free disk", loraloom_model::human_bytes(free)),
            )
        },
    )?;
    tracing::info!("checkpoint bytes per tenant: {checkpoint_source}");
    tracing::info!(
        max_checkpoints_per_tenant = args.max_checkpoints_per_tenant,
        max_checkpoint_bytes_per_tenant = checkpoint_bytes,
        max_samplers_per_tenant = args.max_samplers_per_tenant,
        max_sessions_per_tenant = args.max_sessions_per_tenant,
        ?tenant_weights,
        "tenant quotas"
    );
    let backends: Vec<Box<dyn Backend>> = (0..args.workers)
        .map(|_| {
            Box::new(
                ModelWorker::new(
                    base.decoder().shallow_clone(),
                    registry.clone(),
                    Some(base.tokenizer().clone()),
                )
                .with_step_snapshots(args.step_snapshots)
                .with_max_resident(args.max_resident_runs)
                .with_max_resident_samplers(args.max_resident_samplers)
                .with_memory_budget(memory_budget)
                .with_step_graphs(step_graphs)
                .with_prefix_cache(args.prefix_cache_tokens)
                .with_kv_budget(max_kv_tokens),
            ) as Box<dyn Backend>
        })
        .collect();
    // Before the engine starts, so that no job's histogram sample is dropped.
    loraloom_api::stats::install_recorder();
    let config = EngineConfig {
        limits: Limits {
            per_tenant: args.max_queued_per_tenant,
            total: args.max_queued,
            max_batch_tokens: args.max_batch_tokens,
            max_request_tokens: args.max_request_tokens,
            memory_budget,
            queue_timeout: Duration::from_secs(args.queue_timeout_secs),
            batch_fill_wait: Duration::from_millis(args.batch_fill_wait_ms),
            max_kv_tokens,
            tenant_weights: tenant_weights.clone(),
            max_sample_time: Duration::from_secs(args.max_sample_secs),
            max_checkpoints_per_tenant: args.max_checkpoints_per_tenant,
            min_checkpoint_ttl: Duration::from_secs(args.min_checkpoint_ttl_secs),
            max_checkpoint_bytes_per_tenant: checkpoint_bytes,
        },
        future_ttl: Duration::from_secs(args.future_ttl_secs),
        base: base.info().clone(),
        max_runs_per_tenant: args.max_runs_per_tenant,
        max_runs: args.max_runs,
        max_recorded_samples_per_tenant: args.max_recorded_samples_per_tenant as usize,
        release_memory_after_idle,
        journal: args.step_snapshots,
    };
    // Saves that a crash interrupted leave staging directories (checkpoints and run snapshots
    // sit at most six levels under the data directory): cleaned up before any job runs again.
    let stale = loraloom_model::checkpoint::remove_stale(&args.data_dir, 6)
        .context("removing what interrupted saves left")?;
    if stale > 0 {
        tracing::info!(stale, "removed directories left by interrupted saves");
    }
    let engine = Engine::start(config, registry, backends);
    drop(base);
    let restarted = engine.restore().context("restoring state")?;
    let sessions = DashMap::new();
    for row in store.sessions().context("reading sessions")? {
        sessions.insert(
            row.id,
            // A row this version cannot read keeps its owner and time, not its details.
            Session::new(
                row.tenant,
                row.created,
                serde_json::from_str(&row.details_json).unwrap_or_default(),
            ),
        );
    }
    tracing::info!(
        runs = engine.stats().models,
        sessions = sessions.len(),
        interrupted_jobs = restarted,
        "state restored"
    );
    let state = AppState {
        engine: engine.clone(),
        auth: auth.clone(),
        sessions: Arc::new(sessions),
        long_poll: Duration::from_secs(args.long_poll_secs),
        sample_poller: args.sample_poller,
        max_body_bytes: args.max_body_bytes,
        body_timeout: Duration::from_secs(args.body_timeout_secs),
        max_sessions_per_tenant: args.max_sessions_per_tenant,
        session_timeout: (args.session_timeout_secs > 0)
            .then(|| Duration::from_secs(args.session_timeout_secs)),
        public_metrics: args.public_metrics,
        device,
        tokenizer_id,
        tokenizer,
        chat_template,
        end_tokens,
        downloads: Arc::new(
            loraloom_api::downloads::Signer::in_dir(&args.data_dir)
                .context("the download-URL key in the data directory")?,
        ),
        public_url: args.public_url.clone(),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let files = raise_open_files_limit();
    let max_connections = match args.max_connections {
        0 => (files.saturating_sub(FILES_KEPT_FOR_OTHER_USES) as usize).max(16),
        n => n,
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        workers = args.workers,
        max_connections,
        open_files_limit = files,
        "loraloom listening"
    );
    let options = loraloom_api::ServeOptions {
        header_timeout: Duration::from_secs(args.header_timeout_secs.max(1)),
        max_connections,
        // Long polls answer within `long_poll`; a little more for requests being answered.
        shutdown_grace: Duration::from_secs(args.long_poll_secs + 10),
    };
    match (&args.api_keys_file, keys_text) {
        (Some(file), Some(text)) if !auth.is_single_tenant() => {
            tokio::spawn(follow_keys_file(
                auth.clone(),
                store.clone(),
                args.api_keys.clone(),
                file.clone(),
                text,
                hup,
            ));
        }
        _ => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::warn!("SIGHUP: nothing to reload (API keys are reloaded from --api-keys-file, in a server started with keys)");
                }
            });
        }
    }
    // The first signal stops the listener and starts the engine's drain, side by side: requests
    // in progress (long polls among them) are answered while queued jobs finish; a second
    // signal ends the drain at once.
    let mut signals = Signals::new()?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let drain = Duration::from_secs(args.drain_secs);
    let stopping = tokio::spawn(async move {
        signals.next().await;
        tracing::info!(
            drain_secs = drain.as_secs(),
            "stopping: queued and running jobs may finish (a second signal ends the wait)"
        );
        let _ = stop_http.send(());
        let drained = engine.clone();
        let mut stopped = tokio::task::spawn_blocking(move || drained.shutdown(drain));
        tokio::select! {
            done = &mut stopped => return done,
            () = signals.next() => {
                tracing::warn!("second signal: failing the jobs left");
                engine.end_drain();
            }
        }
        stopped.await
    });
    let http = async {
        let _ = http_stopped.await;
    };
    loraloom_api::serve(listener, router(state), options, http).await;
    stopping.await??;
    tracing::info!("stopped");
    Ok(())
}

/// Free bytes on the filesystem holding `dir` (0 when unknown: no limit then).
fn free_disk_bytes(dir: &std::path::Path) -> u64 {
    match rustix::fs::statvfs(dir) {
        Ok(st) => st.f_bavail.saturating_mul(st.f_frsize),
        Err(error) => {
            tracing::warn!(%error, "cannot read the free disk space; no checkpoint byte limit");
            0
        }
    }
}

/// File descriptors kept out of `--max-connections auto` for the database, checkpoints and
/// snapshots being written, and libraries.
const FILES_KEPT_FOR_OTHER_USES: u64 = 256;

/// Raises the soft limit on open files to the hard limit (often 1,024 soft against a much
/// larger hard limit) and returns the limit now in force.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum) {
        if current < hard {
            limit.current = Some(hard);
            match setrlimit(Resource::Nofile, limit) {
                Ok(()) => return hard,
                Err(error) => {
                    tracing::warn!(%error, current, hard, "could not raise the open files limit");
                    return current;
                }
            }
        }
    }
    limit.current.unwrap_or(65_536)
}

/// SIGTERM and SIGINT (Ctrl-C), each delivery one event.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Listens from now on (before this, a signal kills the process).
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// Asks libtorch to try cuDNN's attention kernel last, as it did before PyTorch 2.10 (unless
/// the environment already says otherwise). On Hopper and newer GPUs recent libtorch tries it
/// first, and it builds an execution plan for every new batch shape: 0.12-0.15 s per shape for
/// a forward and backward measured on an H200, by PyTorch itself as by loraloom, where a
/// multi-tenant server's shapes change with every mix of tenants and lengths (BENCHMARKS.md,
/// "Third GPU session"). Flash attention (no mask) and the memory-efficient kernel (with one)
/// serve the same calls without that.
///
/// libtorch reads the variable once, at its first attention call; `main` calls this first,
/// while the process has one thread (setting a variable races with threads reading them).
fn deprioritize_cudnn_attention() {
    const VAR: &str = "TORCH_CUDNN_SDPA_DEPRIORITIZED";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // Before any thread starts and before libtorch's first attention call.
    deprioritize_cudnn_attention();
    // LORALOOM_LOG_SPANS=1 also logs each span as it closes, with its busy and idle time: among
    // them one line per batch a worker ran (`batch{kind jobs tokens}`), where a round's time
    // went.
    let span_times =
        std::env::var_os("LORALOOM_LOG_SPANS").is_some_and(|v| v != "0" && !v.is_empty());
    tracing_subscriber::fmt()
        // Colour codes only for a terminal, not in log files.
        .with_ansi(std::io::stdout().is_terminal())
        .with_span_events(if span_times {
            tracing_subscriber::fmt::format::FmtSpan::CLOSE
        } else {
            tracing_subscriber::fmt::format::FmtSpan::NONE
        })
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Bench(args) => bench(*args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_weights_parse_and_bad_ones_name_the_flag() {
        let ok = parse_tenant_weights(&["gold=3".into(), " team b = 10".into()]).unwrap();
        assert_eq!(
            ok,
            HashMap::from([("gold".into(), 3), ("team b".into(), 10)])
        );
        for bad in ["gold", "gold=0", "gold=1001", "=2", "gold=x"] {
            let err = parse_tenant_weights(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains("--tenant-weight"), "{bad}: {err}");
        }
    }
}
