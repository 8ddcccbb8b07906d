//! The `loraloom` binary: `serve` starts the HTTP server on one base model.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use loraloom_api::{router, AppState};
use loraloom_engine::BaseModel;

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
    Serve(ServeArgs),
}

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
    /// Name clients use as `base_model` (defaults to the model's directory name).
    #[arg(long, env = "LORALOOM_MODEL_NAME")]
    model_name: Option<String>,
    /// Where models, checkpoints and the database live.
    #[arg(long, env = "LORALOOM_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
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

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (dir, name) = resolve_model(&args)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let load_dir = dir.clone();
    let base = tokio::task::spawn_blocking(move || BaseModel::load(&name, &load_dir))
        .await?
        .with_context(|| format!("loading model from {}", dir.display()))?;
    tracing::info!(model = %base.info().name, "{}", base.info().summary);
    let state = AppState {
        base: Arc::new(base.info().clone()),
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("bad --host/--port {}:{}", args.host, args.port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "loraloom listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    }
}
