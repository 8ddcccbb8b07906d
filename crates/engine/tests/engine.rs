//! The engine end to end: ordering, fusion equality, failure isolation, backpressure,
//! timeouts and cancellation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loraloom_engine::job::Job;
use loraloom_engine::{
    Backend, BaseModelInfo, CheckpointKind, Engine, EngineConfig, EngineError, FutureState, Limits,
    ModelKey, ModelWorker, Output, QueueKey, Registry, Result, SamplerKey, SqliteStore, Store,
    Work,
};
use loraloom_model::{
    forward_backward, AdamParams, AdamState, Datum, Decoder, Field, LoraAdapter, LoraSpec, LossFn,
    LossInputs, ModelConfig, PassCost, SamplingParams, StepGraphs, StepStats, Stop, TrainRequest,
    NO_LIMIT,
};
use tch::{Device, Kind};

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"model_type":"llama","hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":128,"max_position_embeddings":128}"#,
    )
    .unwrap()
}

fn info(config: ModelConfig) -> BaseModelInfo {
    BaseModelInfo {
        name: "tiny".into(),
        max_context_length: config.max_position_embeddings,
        vocab_size: config.vocab_size,
        summary: "tiny".into(),
        weight_bytes: 0,
        dtype: "f32".into(),
        pass_cost: PassCost::new(&config, Kind::Float),
        config,
    }
}

/// The configuration of an engine over a fake backend: the tiny model's shape, no run limits.
fn fake_config(limits: Limits) -> EngineConfig {
    EngineConfig {
        limits,
        future_ttl: Duration::from_secs(60),
        base: info(tiny_config()),
        max_runs_per_tenant: 0,
        max_runs: 0,
        max_recorded_samples_per_tenant: 1000,
        release_memory_after_idle: None,
        journal: false,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loraloom-engine-{tag}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn spec(rank: i64, seed: u64) -> LoraSpec {
    LoraSpec {
        rank,
        alpha: 32.0,
        seed,
        train_attn: true,
        train_mlp: true,
        train_unembed: false,
    }
}

fn key(tenant: &str, id: &str) -> ModelKey {
    ModelKey {
        tenant: tenant.into(),
        model_id: id.into(),
    }
}

/// One successful optimizer step per job (what the fake backends answer).
fn stepped(jobs: &[Job]) -> Vec<Result<Output>> {
    jobs.iter()
        .map(|_| {
            Ok(Output::OptimStep(StepStats {
                grad_norm: 0.0,
                step: 1,
            }))
        })
        .collect()
}

/// A backend that only records batch sizes; `poison` jobs (beta1 == 0.5) panic the batch.
struct Fake {
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Backend for Fake {
    fn run(&mut self, jobs: &[Job]) -> Vec<Result<Output>> {
        let poisoned = jobs
            .iter()
            .any(|j| matches!(&j.work, Work::OptimStep { params } if params.beta1 == 0.5));
        if poisoned {
            panic!("poisoned batch");
        }
        self.batches.lock().unwrap().push(jobs.len());
        stepped(jobs)
    }
}

fn fake_engine(limits: Limits, workers: usize) -> (Engine, Arc<Mutex<Vec<usize>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let backends: Vec<Box<dyn Backend>> = (0..workers)
        .map(|_| {
            Box::new(Fake {
                batches: batches.clone(),
            }) as Box<dyn Backend>
        })
        .collect();
    let config = fake_config(limits);
    let registry = Arc::new(Registry::new(temp_dir("fake")));
    (
        Engine::start_recording_order(config, registry, backends),
        batches,
    )
}

fn optim(lr: f64) -> Work {
    Work::OptimStep {
        params: AdamParams {
            learning_rate: lr,
            ..AdamParams::default()
        },
    }
}

fn wait(engine: &Engine, tenant: &str, id: &str) -> FutureState {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(engine.wait(tenant, id, Duration::from_secs(60)))
        .unwrap()
}

/// The output of tenant `t`'s request `id`, which must succeed.
fn done(engine: &Engine, id: &str) -> Output {
    match wait(engine, "t", id) {
        FutureState::Done(out) => out,
        other => panic!("{id}: {other:?}"),
    }
}

#[test]
fn every_runs_jobs_start_in_submission_order_under_concurrent_clients() {
    // Admission bounds are not under test here: a tenant holds up to 300 of the 1,000 jobs, and
    // on a loaded machine the workers may drain none of them before the last is submitted.
    let limits = Limits {
        per_tenant: 1000,
        total: 1000,
        ..Limits::default()
    };
    let (engine, batches) = fake_engine(limits, 3);
    let models: Vec<ModelKey> = (0..10)
        .map(|i| key(&format!("t{}", i % 4), &format!("m{i}")))
        .collect();
    for m in &models {
        engine
            .registry()
            .add_model(m.clone(), "tiny", spec(4, 0), serde_json::Value::Null)
            .unwrap();
    }
    let ids: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|t| {
                let engine = engine.clone();
                let models = models.clone();
                s.spawn(move || {
                    (0..50)
                        .map(|i| {
                            let m = &models[(t * 7 + i * 3) % 10];
                            let id = engine
                                .submit(QueueKey::Model(m.clone()), optim(1e-3))
                                .unwrap();
                            (m.tenant.clone(), id)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 1000);
    for (tenant, id) in &ids {
        assert!(matches!(wait(&engine, tenant, id), FutureState::Done(_)));
    }
    let log = engine.order_log();
    let mut total = 0;
    for m in &models {
        let q = QueueKey::Model(m.clone());
        assert_eq!(
            log.started[&q], log.admitted[&q],
            "run {} executed out of order",
            m.model_id
        );
        total += log.started[&q].len();
    }
    assert_eq!(total, 1000);
    let sizes = batches.lock().unwrap();
    assert_eq!(sizes.iter().sum::<usize>(), 1000);
    engine.shutdown(Duration::MAX);
}

#[test]
fn a_panicking_job_fails_alone_and_the_workers_go_on() {
    let (engine, _) = fake_engine(Limits::default(), 1);
    for i in 0..4 {
        engine
            .registry()
            .add_model(
                key("t", &format!("m{i}")),
                "tiny",
                spec(4, 0),
                serde_json::Value::Null,
            )
            .unwrap();
    }
    engine.set_paused(true);
    let ids: Vec<String> = (0..4)
        .map(|i| {
            let mut work = optim(1e-3);
            if let (2, Work::OptimStep { params }) = (i, &mut work) {
                params.beta1 = 0.5;
            }
            engine
                .submit(QueueKey::Model(key("t", &format!("m{i}"))), work)
                .unwrap()
        })
        .collect();
    engine.set_paused(false);
    for (i, id) in ids.iter().enumerate() {
        let state = wait(&engine, "t", id);
        if i == 2 {
            assert_eq!(
                state,
                FutureState::Failed(EngineError::Internal("the job panicked".into()))
            );
        } else {
            assert!(matches!(state, FutureState::Done(_)), "job {i}: {state:?}");
        }
    }
    // The worker survived.
    let id = engine
        .submit(QueueKey::Model(key("t", "m0")), optim(1e-3))
        .unwrap();
    assert!(matches!(wait(&engine, "t", &id), FutureState::Done(_)));
    engine.shutdown(Duration::MAX);
}

#[test]
fn full_queues_refuse_and_cancel_and_timeout_fail_futures() {
    let limits = Limits {
        per_tenant: 3,
        total: 100,
        queue_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (engine, _) = fake_engine(limits, 1);
    engine
        .registry()
        .add_model(key("a", "m"), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    engine
        .registry()
        .add_model(key("b", "m"), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    engine.set_paused(true);
    let qa = QueueKey::Model(key("a", "m"));
    let ids: Vec<String> = (0..3)
        .map(|_| engine.submit(qa.clone(), optim(1e-3)).unwrap())
        .collect();
    let futures_before = engine.futures().counts().values().sum::<usize>();
    for _ in 0..50 {
        let err = engine.submit(qa.clone(), optim(1e-3)).unwrap_err();
        assert_eq!(err.kind(), "overloaded");
    }
    assert_eq!(engine.stats().refused, 50, "each refusal is counted");
    assert_eq!(engine.max_queued_per_tenant(), 3);
    // Refused submissions leave no future behind (no client holds their ids).
    assert_eq!(
        engine.futures().counts().values().sum::<usize>(),
        futures_before
    );
    // Another tenant is not affected by a's full queue.
    let b = engine
        .submit(QueueKey::Model(key("b", "m")), optim(1e-3))
        .unwrap();
    // Cancellation of a queued job; other tenants cannot cancel (or see) it.
    assert_eq!(engine.cancel("b", &ids[0]).unwrap_err().kind(), "not_found");
    assert!(engine.cancel("a", &ids[0]).unwrap());
    assert_eq!(
        wait(&engine, "a", &ids[0]),
        FutureState::Failed(EngineError::Cancelled)
    );
    // The rest time out while paused.
    for id in &ids[1..] {
        match wait(&engine, "a", id) {
            FutureState::Failed(EngineError::TimedOut { limit_s, .. }) => {
                assert!((limit_s - 0.3).abs() < 1e-9)
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert!(matches!(
        wait(&engine, "b", &b),
        FutureState::Failed(EngineError::TimedOut { .. })
    ));
    engine.set_paused(false);
    let stats = engine.stats();
    assert_eq!(stats.failures_by_kind["timed_out"], 3);
    assert_eq!(stats.failures_by_kind["cancelled"], 1);
    engine.shutdown(Duration::MAX);
}

#[test]
fn unknown_runs_and_shutdown_are_clear_errors() {
    let (engine, _) = fake_engine(Limits::default(), 1);
    let err = engine
        .submit(QueueKey::Model(key("a", "nope")), optim(1e-3))
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::NotFound {
            what: "model".into(),
            id: "nope".into()
        }
    );
    engine
        .registry()
        .add_model(key("a", "m"), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    // b cannot use a's run.
    assert_eq!(
        engine
            .submit(QueueKey::Model(key("b", "m")), optim(1e-3))
            .unwrap_err()
            .kind(),
        "not_found"
    );
    engine.set_paused(true);
    let queued = engine
        .submit(QueueKey::Model(key("a", "m")), optim(1e-3))
        .unwrap();
    let e2 = engine.clone();
    let stopper = std::thread::spawn(move || e2.shutdown(Duration::ZERO));
    stopper.join().unwrap();
    assert_eq!(
        wait(&engine, "a", &queued),
        FutureState::Failed(EngineError::ServerRestarted)
    );
    assert_eq!(
        engine
            .submit(QueueKey::Model(key("a", "m")), optim(1e-3))
            .unwrap_err()
            .kind(),
        "shutting_down"
    );
}

/// A fake engine of one worker holding run `tenant`/`id`, its scheduler paused.
fn paused_engine_with_run(tenant: &str, id: &str) -> Engine {
    let (engine, _) = fake_engine(Limits::default(), 1);
    engine
        .registry()
        .add_model(key(tenant, id), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    engine.set_paused(true);
    engine
}

#[test]
fn a_shutdown_runs_the_queued_jobs_within_its_drain_and_fails_them_once_the_drain_ends() {
    let engine = paused_engine_with_run("a", "m");
    let queued: Vec<String> = (0..3)
        .map(|_| {
            engine
                .submit(QueueKey::Model(key("a", "m")), optim(1e-3))
                .unwrap()
        })
        .collect();
    // A drain with time to spare runs every queued job (the pause is lifted), in order.
    engine.shutdown(Duration::from_secs(60));
    for id in &queued {
        assert!(
            matches!(wait(&engine, "a", id), FutureState::Done(_)),
            "{id} ran during the drain"
        );
    }
    assert_eq!(
        engine
            .submit(QueueKey::Model(key("a", "m")), optim(1e-3))
            .unwrap_err()
            .kind(),
        "shutting_down"
    );

    // A drain ended early (a second signal) fails what is still queued, even a drain that
    // would have waited forever.
    let engine = paused_engine_with_run("a", "m");
    let queued = engine
        .submit(QueueKey::Model(key("a", "m")), optim(1e-3))
        .unwrap();
    engine.end_drain();
    engine.shutdown(Duration::MAX);
    assert_eq!(
        wait(&engine, "a", &queued),
        FutureState::Failed(EngineError::ServerRestarted)
    );
}

// ---- with the real model -------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The tiny checkpoint's model on the CPU, in f32.
fn tiny_decoder() -> Decoder {
    Decoder::load(&tiny_checkpoint(), Device::Cpu, Some(Kind::Float)).unwrap()
}

fn tiny_checkpoint() -> PathBuf {
    let dir = temp_dir("tiny");
    let python = std::env::var_os("LORALOOM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let status = std::process::Command::new(python)
        .arg(repo_root().join("tests/oracles/tiny_models.py"))
        .args(["make", "llama"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

fn data(seed: i64) -> Vec<Datum> {
    (0..2)
        .map(|i| {
            let toks: Vec<i64> = (0..9).map(|j| (seed * 13 + i * 5 + j * 7) % 128).collect();
            Datum {
                input_tokens: toks[..8].to_vec(),
                loss_inputs: LossInputs {
                    target_tokens: toks[1..].to_vec(),
                    weights: Some(vec![1.0; 8]),
                    logprobs: None,
                    advantages: None,
                    sequence_ratio_mask: None,
                    recorded: None,
                    targets_per_position: None,
                },
                custom: None,
            }
        })
        .collect()
}

/// An engine with one libtorch worker over a tiny random llama, and the decoder itself.
fn model_engine() -> (Engine, Decoder) {
    model_engine_with(0, 0)
}

/// Like [`model_engine`], keeping at most `max_resident` runs and `max_samplers` sampling
/// sessions' weights in memory.
fn model_engine_with(max_resident: usize, max_samplers: usize) -> (Engine, Decoder) {
    model_engine_of(|worker| {
        worker
            .with_max_resident(max_resident)
            .with_max_resident_samplers(max_samplers)
    })
}

/// Like [`model_engine`], with its worker configured by `configure`.
fn model_engine_of(configure: impl FnOnce(ModelWorker) -> ModelWorker) -> (Engine, Decoder) {
    let decoder = tiny_decoder();
    let registry = Arc::new(Registry::new(temp_dir("reg")));
    let worker = configure(ModelWorker::new(
        decoder.shallow_clone(),
        registry.clone(),
        None,
    ));
    let config = EngineConfig {
        limits: Limits::default(),
        future_ttl: Duration::from_secs(60),
        base: info(decoder.config().clone()),
        max_runs_per_tenant: 0,
        max_runs: 0,
        max_recorded_samples_per_tenant: 1000,
        // Released as soon as the worker idles, so every test on this engine runs through it.
        release_memory_after_idle: Some(Duration::ZERO),
        journal: false,
    };
    (
        Engine::start(config, registry, vec![Box::new(worker)]),
        decoder,
    )
}

#[test]
fn four_tenants_batched_train_exactly_like_each_alone() {
    let (engine, decoder) = model_engine();
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let tenants: Vec<ModelKey> = (0..4).map(|i| key(&format!("tenant{i}"), "run")).collect();
    engine.set_paused(true);
    for (i, k) in tenants.iter().enumerate() {
        engine
            .create_model(
                k.clone(),
                spec(2 + i as i64, i as u64),
                serde_json::Value::Null,
                None,
            )
            .unwrap();
    }
    let mut last = HashMap::new();
    for _ in 0..3 {
        for (i, k) in tenants.iter().enumerate() {
            let q = QueueKey::Model(k.clone());
            let fb = Work::ForwardBackward {
                data: data(i as i64),
                loss: LossFn::CrossEntropy,
                backward: true,
            };
            engine.submit(q.clone(), fb).unwrap();
            last.insert(
                k.tenant.clone(),
                engine.submit(q, Work::OptimStep { params: hp }).unwrap(),
            );
        }
    }
    engine.set_paused(false);
    for (tenant, id) in &last {
        assert!(matches!(wait(&engine, tenant, id), FutureState::Done(_)));
    }
    assert!(
        engine.stats().max_batch >= 4,
        "the four tenants' jobs were fused: {:?}",
        engine.stats()
    );

    for (i, k) in tenants.iter().enumerate() {
        let alone =
            LoraAdapter::new(spec(2 + i as i64, i as u64), decoder.config(), Device::Cpu).unwrap();
        let mut opt = AdamState::new(&alone).unwrap();
        let d = data(i as i64);
        for _ in 0..3 {
            let req = TrainRequest {
                adapter: Some(&alone),
                loss: LossFn::CrossEntropy,
                data: &d,
            };
            forward_backward(&decoder, &[req], true, NO_LIMIT).unwrap();
            opt.step(&alone, &hp).unwrap();
        }
        let entry = engine.registry().model(&k.tenant, "run").unwrap();
        let state = entry.lock();
        let trained = state.adapter.as_ref().unwrap();
        {
            let p = trained.row().view(Field::Params).unwrap();
            let q = alone.row().view(Field::Params).unwrap();
            let diff = (&p - &q).abs().max().double_value(&[]);
            let scale = q.abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "tenant {i}: weights differ by {diff}"
            );
        }
    }
    engine.shutdown(Duration::MAX);
}

#[test]
fn one_tenants_bad_datum_in_a_fused_batch_fails_only_its_job() {
    let (engine, _decoder) = model_engine();
    let (good, bad) = (key("good", "run"), key("bad", "run"));
    let c1 = engine
        .create_model(good.clone(), spec(4, 1), serde_json::Value::Null, None)
        .unwrap();
    let c2 = engine
        .create_model(bad.clone(), spec(4, 2), serde_json::Value::Null, None)
        .unwrap();
    wait(&engine, "good", &c1);
    wait(&engine, "bad", &c2);
    let mut poisoned = data(1);
    poisoned[1].loss_inputs.target_tokens[3] = 4096;
    let fb = |d| Work::ForwardBackward {
        data: d,
        loss: LossFn::CrossEntropy,
        backward: true,
    };
    // A datum that can never run is refused at submission, naming the field.
    match engine.submit(QueueKey::Model(bad.clone()), fb(poisoned)) {
        Err(EngineError::InvalidInput { field, .. }) => {
            assert_eq!(field, "data[1].loss_fn_inputs.target_tokens")
        }
        other => panic!("{other:?}"),
    }
    // A job that fails only at run time (its run vanished while queued) fails alone inside a
    // fused batch; the other tenant's job in the same batch succeeds.
    engine.set_paused(true);
    let g = engine.submit(QueueKey::Model(good), fb(data(0))).unwrap();
    let b = engine.submit(QueueKey::Model(bad), fb(data(1))).unwrap();
    engine.registry().remove_model("bad", "run").unwrap();
    engine.set_paused(false);
    assert!(matches!(
        wait(&engine, "good", &g),
        FutureState::Done(Output::ForwardBackward(_))
    ));
    assert_eq!(
        wait(&engine, "bad", &b),
        FutureState::Failed(EngineError::NotFound {
            what: "model".into(),
            id: "run".into()
        })
    );
    assert_eq!(engine.stats().max_batch, 2, "both jobs shared one batch");
    engine.shutdown(Duration::MAX);
}

/// Admission counts what a pass holds for the run's adapter besides activations: a datum that
/// would fit the memory budget alone, but not next to its adapter's copies, is refused.
#[test]
fn admission_leaves_the_adapters_held_bytes_out_of_the_budget() {
    let config = tiny_config();
    let cost = PassCost::new(&config, Kind::Float);
    let run_spec = spec(64, 0);
    let held = run_spec.held_elements(&config) * cost.element_bytes();
    let datum = &data(0)[..1];
    let least = cost.least_bytes(datum[0].input_tokens.len(), true);
    let submit = |budget: u64| {
        let (backend, _release, _) = FakeDecoder::new(Duration::ZERO);
        let registry = Arc::new(Registry::new(temp_dir("held")));
        registry
            .add_model(
                key("t", "run"),
                "tiny",
                run_spec.clone(),
                serde_json::Value::Null,
            )
            .unwrap();
        let limits = Limits {
            memory_budget: budget,
            ..Limits::default()
        };
        let engine = Engine::start(fake_config(limits), registry, vec![Box::new(backend)]);
        engine.set_paused(true);
        let submitted = engine.submit(
            QueueKey::Model(key("t", "run")),
            Work::ForwardBackward {
                data: datum.to_vec(),
                loss: LossFn::CrossEntropy,
                backward: true,
            },
        );
        engine.shutdown(Duration::ZERO);
        submitted
    };
    assert!(submit(least + held).is_ok());
    match submit(least + held - 1) {
        Err(EngineError::InvalidInput { field, .. }) => assert_eq!(field, "data[0].model_input"),
        other => panic!("{other:?}"),
    }
}

/// A durable engine over `data_dir` (step snapshots, the job journal) with one libtorch worker,
/// restored from what the directory holds, as the server starts.
fn durable_engine(data_dir: &Path, decoder: &Decoder) -> Engine {
    durable_engine_with(data_dir, decoder, true)
}

/// [`durable_engine`], with the job journal kept or not (a server before it).
fn durable_engine_with(data_dir: &Path, decoder: &Decoder, journal: bool) -> Engine {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data_dir).unwrap());
    let registry = Arc::new(Registry::durable(data_dir.to_path_buf(), store).unwrap());
    let worker =
        ModelWorker::new(decoder.shallow_clone(), registry.clone(), None).with_step_snapshots(true);
    let config = EngineConfig {
        base: info(decoder.config().clone()),
        journal,
        ..fake_config(Limits::default())
    };
    let engine = Engine::start(config, registry, vec![Box::new(worker)]);
    engine.restore().unwrap();
    engine
}

#[test]
fn a_crash_loses_no_job_and_no_gradients_a_run_was_told_of() {
    let decoder = tiny_decoder();
    let data_dir = temp_dir("crash");
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let k = key("t", "a");
    let q = QueueKey::Model(k.clone());
    let fb = |seed: i64| Work::ForwardBackward {
        data: data(seed),
        loss: LossFn::CrossEntropy,
        backward: true,
    };

    let engine = durable_engine(&data_dir, &decoder);
    let created = engine
        .create_model(k.clone(), spec(4, 3), serde_json::Value::Null, None)
        .unwrap();
    done(&engine, &created);
    let first = engine.submit(q.clone(), fb(1)).unwrap();
    done(
        &engine,
        &engine
            .submit(q.clone(), Work::OptimStep { params: hp })
            .unwrap(),
    );
    // Gradients acknowledged, then a step and another forward_backward queued.
    let pending = engine.submit(q.clone(), fb(2)).unwrap();
    let pending_out = done(&engine, &pending);
    engine.set_paused(true);
    let queued_step = engine
        .submit(q.clone(), Work::OptimStep { params: hp })
        .unwrap();
    let queued_fb = engine.submit(q.clone(), fb(3)).unwrap();
    // The crash: the process is gone with its memory (this engine's paused worker never runs
    // again), the data directory stays.
    std::mem::forget(engine);

    let engine = durable_engine(&data_dir, &decoder);
    let Output::OptimStep(stats) = done(&engine, &queued_step) else {
        panic!("the queued step's result")
    };
    assert_eq!(stats.step, 2);
    assert!(matches!(
        done(&engine, &queued_fb),
        Output::ForwardBackward(_)
    ));
    // Settled results are untouched; the rebuild of `pending`'s gradients left its result be.
    assert_eq!(done(&engine, &pending), pending_out);
    assert!(matches!(done(&engine, &first), Output::ForwardBackward(_)));
    done(
        &engine,
        &engine
            .submit(q.clone(), Work::OptimStep { params: hp })
            .unwrap(),
    );

    // The same three steps in one process.
    let alone = LoraAdapter::new(spec(4, 3), decoder.config(), Device::Cpu).unwrap();
    let mut opt = AdamState::new(&alone).unwrap();
    let accumulate = |seed: i64| {
        let d = data(seed);
        let req = TrainRequest {
            adapter: Some(&alone),
            loss: LossFn::CrossEntropy,
            data: &d,
        };
        forward_backward(&decoder, &[req], true, NO_LIMIT).unwrap();
    };
    for seed in 1..=3 {
        accumulate(seed);
        opt.step(&alone, &hp).unwrap();
    }
    let same_weights = |engine: &Engine| {
        let entry = engine.registry().model("t", "a").unwrap();
        let state = entry.lock();
        let trained = state.adapter.as_ref().expect("resident");
        let p = trained.row().view(Field::Params).unwrap();
        let want = alone.row().view(Field::Params).unwrap();
        assert_eq!((&p - &want).abs().max().double_value(&[]), 0.0);
    };
    same_weights(&engine);

    // Gradients pending at a graceful shutdown are in the run's snapshot; the run's first job
    // after the restart takes them out of it, and a crash after that rebuilds them from the
    // journal with those accumulated since.
    done(&engine, &engine.submit(q.clone(), fb(4)).unwrap());
    engine.shutdown(Duration::MAX);
    let engine = durable_engine(&data_dir, &decoder);
    done(&engine, &engine.submit(q.clone(), fb(5)).unwrap());
    engine.set_paused(true);
    let queued_step = engine
        .submit(q.clone(), Work::OptimStep { params: hp })
        .unwrap();
    std::mem::forget(engine);
    let engine = durable_engine(&data_dir, &decoder);
    done(&engine, &queued_step);
    accumulate(4);
    accumulate(5);
    opt.step(&alone, &hp).unwrap();
    same_weights(&engine);
    engine.shutdown(Duration::MAX);
}

#[test]
fn a_save_run_again_after_a_crash_that_followed_its_landing_answers_as_it_did() {
    // A crash after a save's checkpoint (and its sampling session) were recorded but before its
    // future settled leaves the save journaled and unsettled: the restart runs it again, and it
    // must find its own checkpoint, not fail "already exists". An inflight save must also move
    // the run's earlier inflight sessions, which the crash may have cut off.
    let decoder = tiny_decoder();
    let data_dir = temp_dir("crash-save");
    let k = key("t", "a");
    let q = QueueKey::Model(k.clone());
    let engine = durable_engine(&data_dir, &decoder);
    let created = engine
        .create_model(k.clone(), spec(4, 3), serde_json::Value::Null, None)
        .unwrap();
    done(&engine, &created);
    let saves = [
        Work::Save {
            name: "state".into(),
            kind: CheckpointKind::State,
            sampler: None,
            options: Default::default(),
        },
        Work::Save {
            name: "for-sampling".into(),
            kind: CheckpointKind::Sampler,
            sampler: Some(SamplerKey {
                tenant: "t".into(),
                sampler_id: "s".into(),
            }),
            options: Default::default(),
        },
    ];
    let inflight = |name: &str, sampler_id: &str| Work::Save {
        name: name.into(),
        kind: CheckpointKind::Sampler,
        sampler: Some(SamplerKey {
            tenant: "t".into(),
            sampler_id: sampler_id.into(),
        }),
        options: loraloom_engine::SaveOptions {
            inflight: true,
            ..Default::default()
        },
    };
    done(
        &engine,
        &engine
            .submit(q.clone(), inflight("inflight-1", "first"))
            .unwrap(),
    );
    let saves = [
        saves[0].clone(),
        saves[1].clone(),
        inflight("inflight-2", "second"),
    ];
    let mut answered = Vec::new();
    for save in &saves {
        let id = engine.submit(q.clone(), save.clone()).unwrap();
        let out = done(&engine, &id);
        answered.push((id, out));
    }
    // The state such a crash leaves: each save journaled again, its future unsettled.
    let store = SqliteStore::open(&data_dir).unwrap();
    for (save, (id, _)) in saves.iter().zip(&answered) {
        store
            .put_job(&loraloom_engine::journal::row(id, &q, save, None).unwrap())
            .unwrap();
        store
            .put_future(
                &loraloom_engine::store::FutureRow {
                    id: id.clone(),
                    tenant: "t".into(),
                    state: "queued".into(),
                    outcome_json: None,
                    finished: None,
                    feed_json: None,
                },
                &[],
            )
            .unwrap();
    }
    // The earlier inflight session, not yet moved onto the second inflight checkpoint.
    let Output::Saved { path: second, .. } = &answered[2].1 else {
        panic!("an inflight save's result")
    };
    store
        .put_sampler(&loraloom_engine::store::SamplerRow {
            tenant: "t".into(),
            sampler_id: "first".into(),
            checkpoint: Some(second.replace("inflight-2", "inflight-1")),
            base_model: "tiny".into(),
            inflight_of: Some("a".into()),
        })
        .unwrap();
    std::mem::forget(engine);

    let engine = durable_engine(&data_dir, &decoder);
    for (id, out) in &answered {
        assert_eq!(&done(&engine, id), out);
    }
    let source = |id: &str| engine.registry().sampler("t", id).unwrap().source.clone();
    let moved = loraloom_engine::SamplerSource::Checkpoint(second.clone());
    assert_eq!((source("first"), source("second")), (moved.clone(), moved));
    assert!(engine.registry().sampler("t", "s").is_ok());
    assert_eq!(
        engine.registry().checkpoint_usage("t").0,
        1,
        "the state only"
    );
    engine.shutdown(Duration::MAX);
}

#[test]
fn gradients_a_server_without_the_journal_saved_are_lost_at_a_crash_not_stepped_on_in_part() {
    // An upgrade: a server without the journal shuts down with gradients pending (in its
    // snapshot), the new one restores them and takes more, through a graceful restart too;
    // then a crash. The journal answers only for what it saw: the step is refused.
    let decoder = tiny_decoder();
    let data_dir = temp_dir("upgrade");
    let k = key("t", "a");
    let q = QueueKey::Model(k.clone());
    let fb = |seed: i64| Work::ForwardBackward {
        data: data(seed),
        loss: LossFn::CrossEntropy,
        backward: true,
    };
    let optim = Work::OptimStep {
        params: AdamParams::default(),
    };
    let old = durable_engine_with(&data_dir, &decoder, false);
    let created = old
        .create_model(k.clone(), spec(4, 3), serde_json::Value::Null, None)
        .unwrap();
    wait(&old, "t", &created);
    wait(&old, "t", &old.submit(q.clone(), fb(1)).unwrap());
    old.shutdown(Duration::MAX);

    let engine = durable_engine(&data_dir, &decoder);
    wait(&engine, "t", &engine.submit(q.clone(), fb(2)).unwrap());
    engine.shutdown(Duration::MAX);
    let engine = durable_engine(&data_dir, &decoder);
    wait(&engine, "t", &engine.submit(q.clone(), fb(3)).unwrap());
    std::mem::forget(engine);

    let engine = durable_engine(&data_dir, &decoder);
    assert_eq!(
        wait(
            &engine,
            "t",
            &engine.submit(q.clone(), optim.clone()).unwrap()
        ),
        FutureState::Failed(EngineError::GradientsLost)
    );
    // The refusal discarded them; training goes on.
    wait(&engine, "t", &engine.submit(q.clone(), fb(4)).unwrap());
    assert!(matches!(
        wait(&engine, "t", &engine.submit(q, optim).unwrap()),
        FutureState::Done(_)
    ));
    engine.shutdown(Duration::MAX);
}

#[test]
fn idle_runs_are_evicted_to_disk_and_reloaded_with_identical_weights() {
    let (engine, decoder) = model_engine_with(1, 0);
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let (a, b) = (key("t", "a"), key("t", "b"));
    let step = |k: &ModelKey, seed: i64| {
        let q = QueueKey::Model(k.clone());
        let fb = Work::ForwardBackward {
            data: data(seed),
            loss: LossFn::CrossEntropy,
            backward: true,
        };
        engine.submit(q.clone(), fb).unwrap();
        let id = engine.submit(q, Work::OptimStep { params: hp }).unwrap();
        assert!(matches!(
            wait(&engine, &k.tenant, &id),
            FutureState::Done(_)
        ));
    };
    for (k, seed) in [(&a, 1), (&b, 2)] {
        let id = engine
            .create_model(k.clone(), spec(4, seed), serde_json::Value::Null, None)
            .unwrap();
        wait(&engine, &k.tenant, &id);
    }
    step(&a, 0);
    step(&a, 0);
    step(&b, 1);
    {
        let entry = engine.registry().model("t", "a").unwrap();
        let state = entry.lock();
        assert!(
            state.adapter.is_none() && state.evicted,
            "a was evicted while b trained"
        );
    }
    step(&a, 0);

    // The same three steps without eviction.
    let alone = LoraAdapter::new(spec(4, 1), decoder.config(), Device::Cpu).unwrap();
    let mut opt = AdamState::new(&alone).unwrap();
    let d = data(0);
    for _ in 0..3 {
        let req = TrainRequest {
            adapter: Some(&alone),
            loss: LossFn::CrossEntropy,
            data: &d,
        };
        forward_backward(&decoder, &[req], true, NO_LIMIT).unwrap();
        opt.step(&alone, &hp).unwrap();
    }
    let entry = engine.registry().model("t", "a").unwrap();
    let state = entry.lock();
    let trained = state.adapter.as_ref().expect("a is resident again");
    let p = trained.row().view(Field::Params).unwrap();
    let q = alone.row().view(Field::Params).unwrap();
    assert_eq!((&p - &q).abs().max().double_value(&[]), 0.0);
    drop(state);
    engine.shutdown(Duration::MAX);
}

#[test]
fn a_step_that_makes_the_weights_non_finite_is_refused_and_rolled_back() {
    let (engine, _) = model_engine_of(|worker| worker.with_step_snapshots(true));
    let k = key("t", "a");
    let q = QueueKey::Model(k.clone());
    let id = engine
        .create_model(k.clone(), spec(4, 1), serde_json::Value::Null, None)
        .unwrap();
    wait(&engine, "t", &id);
    let run = |work: Work| {
        let id = engine.submit(q.clone(), work).unwrap();
        wait(&engine, "t", &id)
    };
    let fb = || Work::ForwardBackward {
        data: data(0),
        loss: LossFn::CrossEntropy,
        backward: true,
    };
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let params = || {
        let entry = engine.registry().model("t", "a").unwrap();
        let state = entry.lock();
        let adapter = state.adapter.as_ref().expect("resident");
        adapter.row().view(Field::Params).unwrap().copy()
    };
    assert!(matches!(run(fb()), FutureState::Done(_)));
    assert!(matches!(
        run(Work::OptimStep { params: hp }),
        FutureState::Done(_)
    ));
    let good = params();
    // Gradients are finite; a weight gone bad before the step makes the new weights non-finite.
    assert!(matches!(run(fb()), FutureState::Done(_)));
    {
        let entry = engine.registry().model("t", "a").unwrap();
        let state = entry.lock();
        let row = state
            .adapter
            .as_ref()
            .unwrap()
            .row()
            .view(Field::Params)
            .unwrap();
        let _ = row.get(0).fill_(f64::INFINITY);
    }
    match run(Work::OptimStep { params: hp }) {
        FutureState::Failed(EngineError::InvalidInput { field, reason }) => {
            assert_eq!(field, "adam_params");
            assert!(
                reason.contains("back at its state before the step"),
                "{reason}"
            );
        }
        other => panic!("expected the step refused, got {other:?}"),
    }
    // The next job reloads the state from before the refused step, and training goes on.
    assert!(matches!(run(fb()), FutureState::Done(_)));
    assert_eq!((params() - &good).abs().max().double_value(&[]), 0.0);
    assert!(matches!(
        run(Work::OptimStep { params: hp }),
        FutureState::Done(_)
    ));
    engine.shutdown(Duration::MAX);
}

/// Asserts that `refused` is a `LimitReached` whose message contains `flag`.
fn assert_limit_names<T: std::fmt::Debug>(refused: Result<T>, flag: &str) {
    match refused {
        Err(EngineError::LimitReached(why)) => assert!(why.contains(flag), "{why}"),
        other => panic!("expected LimitReached, got {other:?}"),
    }
}

/// Creates run `k` (rank 4) and waits for it.
fn create_run(engine: &Engine, k: &ModelKey) {
    let id = engine
        .create_model(k.clone(), spec(4, 1), serde_json::Value::Null, None)
        .unwrap();
    assert!(matches!(wait(engine, &k.tenant, &id), FutureState::Done(_)));
}

/// Whether run `k` holds its weights in memory.
fn is_resident(engine: &Engine, k: &ModelKey) -> bool {
    let entry = engine.registry().model(&k.tenant, &k.model_id).unwrap();
    let state = entry.lock();
    state.adapter.is_some()
}

#[test]
fn a_tenant_over_its_resident_bytes_loses_its_least_recent_idle_runs_and_no_other_tenants() {
    let (engine, decoder) = model_engine();
    let one = spec(4, 0).resident_bytes(decoder.config());
    engine.registry().set_max_resident_bytes_per_tenant(2 * one);
    let create = |k: &ModelKey| create_run(&engine, k);
    let step = |k: &ModelKey| {
        let q = QueueKey::Model(k.clone());
        let fb = Work::ForwardBackward {
            data: data(0),
            loss: LossFn::CrossEntropy,
            backward: true,
        };
        engine.submit(q.clone(), fb).unwrap();
        let hp = AdamParams::default();
        let id = engine.submit(q, Work::OptimStep { params: hp }).unwrap();
        assert!(matches!(
            wait(&engine, &k.tenant, &id),
            FutureState::Done(_)
        ));
    };
    let resident = |k: &ModelKey| is_resident(&engine, k);
    // The other tenant's run is the least recently used of all, and stays.
    let x = key("u", "x");
    create(&x);
    let (a, b, c) = (key("t", "a"), key("t", "b"), key("t", "c"));
    for k in [&a, &b, &c] {
        create(k);
    }
    assert!(!resident(&a) && resident(&b) && resident(&c) && resident(&x));
    step(&a);
    assert!(resident(&a) && !resident(&b) && resident(&c) && resident(&x));
    let usage = engine.usage("t");
    assert_eq!(
        (usage.resident_bytes, usage.resident_bytes_limit),
        (2 * one, 2 * one)
    );
    assert_eq!(engine.usage("u").resident_bytes, one);
    // A run larger than the limit alone is refused before anything is queued.
    let big = engine.create_model(key("t", "big"), spec(32, 0), serde_json::Value::Null, None);
    assert_limit_names(big, "--max-resident-bytes-per-tenant");
    engine.shutdown(Duration::MAX);
}

#[test]
fn over_the_servers_resident_bytes_the_tenant_holding_the_most_loses_its_least_recent_runs() {
    let (engine, decoder) = model_engine();
    let one = spec(4, 0).resident_bytes(decoder.config());
    engine.registry().set_max_resident_bytes(3 * one);
    let create = |k: &ModelKey| create_run(&engine, k);
    let resident = |k: &ModelKey| is_resident(&engine, k);
    let all = |keys: &[&ModelKey]| keys.iter().map(|k| resident(k)).collect::<Vec<_>>();
    // The other tenant's run is the least recently used of all, and stays: its tenant holds
    // one run where this one holds three.
    let x = key("u", "x");
    create(&x);
    let (a, b, c) = (key("t", "a"), key("t", "b"), key("t", "c"));
    for k in [&a, &b, &c] {
        create(k);
    }
    assert_eq!(all(&[&x, &a, &b, &c]), [true, false, true, true]);
    let stats = engine.stats();
    assert_eq!(
        (stats.resident_bytes, stats.resident_bytes_limit),
        (3 * one, 3 * one)
    );
    // Two more runs of `u`: each time both tenants then hold two, and the least recent of
    // all goes: x (before b), then b (before c and y).
    let (y, z) = (key("u", "y"), key("u", "z"));
    create(&y);
    assert_eq!(all(&[&x, &y, &b, &c]), [false, true, true, true]);
    create(&z);
    assert_eq!(all(&[&x, &y, &z, &b, &c]), [false, true, true, false, true]);
    // A run larger than all tenants may hold together is refused before anything is queued.
    let big = engine.create_model(key("t", "big"), spec(32, 0), serde_json::Value::Null, None);
    assert_limit_names(big, "--max-resident-bytes ");
    engine.shutdown(Duration::MAX);
}

/// `num_samples` draws of `max_tokens` tokens at temperature 1 from the prompt `[5, 6, 7]`,
/// seeded.
fn seeded_sample(num_samples: i64, max_tokens: i64, seed: u64) -> Work {
    Work::Sample {
        prompt: vec![5, 6, 7],
        num_samples,
        params: SamplingParams {
            max_tokens,
            temperature: 1.0,
            top_k: -1,
            top_p: 1.0,
            seed: Some(seed),
            stop: Stop::Never,
        },
        scoring: loraloom_model::Scoring::prompt_logprobs(false),
        record_stability: false,
        stream: false,
    }
}

#[test]
fn idle_sampling_sessions_drop_their_weights_and_reload_them_identically() {
    let (engine, _) = model_engine_with(0, 1);
    let run = key("t", "run");
    let id = engine
        .create_model(run.clone(), spec(4, 7), serde_json::Value::Null, None)
        .unwrap();
    wait(&engine, "t", &id);
    let session = |name: &str| SamplerKey {
        tenant: "t".into(),
        sampler_id: name.into(),
    };
    // a and b hold different trained weights (a fresh adapter would equal the base model).
    let q = QueueKey::Model(run.clone());
    for (seed, name) in [(1, "a"), (2, "b")] {
        let fb = Work::ForwardBackward {
            data: data(seed),
            loss: LossFn::CrossEntropy,
            backward: true,
        };
        engine.submit(q.clone(), fb).unwrap();
        engine.submit(q.clone(), optim(0.5)).unwrap();
        let save = Work::Save {
            name: name.into(),
            kind: CheckpointKind::Sampler,
            sampler: Some(session(name)),
            options: loraloom_engine::SaveOptions {
                overwrite: true,
                ..Default::default()
            },
        };
        let id = engine.submit(q.clone(), save).unwrap();
        assert!(matches!(wait(&engine, "t", &id), FutureState::Done(_)));
    }
    let sample = |name: &str| {
        let work = seeded_sample(2, 6, 11);
        let id = engine
            .submit(QueueKey::Sampler(session(name)), work)
            .unwrap();
        match wait(&engine, "t", &id) {
            FutureState::Done(Output::Sample(out)) => out
                .sequences
                .into_iter()
                .map(|s| (s.tokens, s.logprobs))
                .collect::<Vec<_>>(),
            other => panic!("sampling failed: {other:?}"),
        }
    };
    let loaded = |name: &str| {
        engine
            .registry()
            .sampler("t", name)
            .unwrap()
            .lock()
            .is_some()
    };
    let first = sample("a");
    assert!(loaded("a"));
    assert_ne!(sample("b"), first, "a and b sample differently");
    assert!(loaded("b") && !loaded("a"), "a was dropped when b loaded");
    assert_eq!(sample("a"), first, "a reloads the same weights");
    assert!(loaded("a") && !loaded("b"));
    engine.shutdown(Duration::MAX);
}

/// With `--step-graphs` a worker's decode loop records a steady batch's step and replays it
/// (emulated here: the CPU has no CUDA graphs), counts both in the engine's stats, and samples
/// what a loop issuing every step samples.
#[test]
fn recorded_decode_steps_are_counted_and_sample_as_eager_ones() {
    let sample = |graphs: StepGraphs| {
        let (engine, _) = model_engine_of(|worker| worker.with_step_graphs(graphs));
        let work = seeded_sample(3, 12, 5);
        let id = engine.submit(base_sampler(&engine, "base"), work).unwrap();
        let tokens = match wait(&engine, "t", &id) {
            FutureState::Done(Output::Sample(out)) => out
                .sequences
                .into_iter()
                .map(|s| s.tokens)
                .collect::<Vec<_>>(),
            other => panic!("sampling failed: {other:?}"),
        };
        let stats = engine.stats();
        engine.shutdown(Duration::MAX);
        (
            tokens,
            stats.decode_steps_recorded,
            stats.decode_steps_replayed,
        )
    };
    let (eager, recorded, replayed) = sample(StepGraphs::Off);
    assert_eq!((recorded, replayed), (0, 0));
    // 12 tokens: the first from the prefill, 11 decode steps: one eager, one recorded, nine
    // replayed (the sequences never change before the last).
    let (graphed, recorded, replayed) = sample(StepGraphs::Emulate);
    assert_eq!(graphed, eager);
    assert_eq!((recorded, replayed), (1, 9));
}

/// A backend with a decode loop: each sampling job makes one token per step until it has
/// `max_tokens`; jobs asking for [`HELD`] tokens decode until `release` is set.
struct FakeDecoder {
    live: Vec<(String, i64)>,
    release: Arc<std::sync::atomic::AtomicBool>,
    log: ExecutionLog,
    /// How long a batch of other work (training) takes.
    batch_takes: Duration,
}

impl FakeDecoder {
    /// A decode loop whose batches of other work take `batch_takes`, with its release flag and
    /// its execution log.
    fn new(batch_takes: Duration) -> (Self, Arc<std::sync::atomic::AtomicBool>, ExecutionLog) {
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log: ExecutionLog = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeDecoder {
            live: Vec::new(),
            release: release.clone(),
            log: log.clone(),
            batch_takes,
        };
        (backend, release, log)
    }
}

/// (what, job ids) in execution order: "admit", "step" or a batch's work name.
type ExecutionLog = Arc<Mutex<Vec<(String, Vec<String>)>>>;

const HELD: i64 = 100;

impl Backend for FakeDecoder {
    fn run(&mut self, jobs: &[Job]) -> Vec<Result<Output>> {
        let ids = jobs.iter().map(|j| j.id.clone()).collect();
        self.log
            .lock()
            .unwrap()
            .push((jobs[0].work.name().into(), ids));
        std::thread::sleep(self.batch_takes);
        stepped(jobs)
    }

    fn admit(&mut self, jobs: &[Job]) -> loraloom_engine::Admitted {
        let ids = jobs.iter().map(|j| j.id.clone()).collect();
        self.log.lock().unwrap().push(("admit".into(), ids));
        for job in jobs {
            let Work::Sample { params, .. } = &job.work else {
                panic!("only sampling jobs join the decode loop")
            };
            self.live.push((job.id.clone(), params.max_tokens));
        }
        loraloom_engine::Admitted {
            results: jobs.iter().map(|_| None).collect(),
            prefills: jobs.len() as u64,
            ..Default::default()
        }
    }

    fn step(&mut self) -> loraloom_engine::DecodeStep {
        std::thread::sleep(Duration::from_millis(1));
        self.log.lock().unwrap().push(("step".into(), Vec::new()));
        let released = self.release.load(std::sync::atomic::Ordering::SeqCst);
        let mut step = loraloom_engine::DecodeStep {
            tokens: self.live.len(),
            ..Default::default()
        };
        for (_, left) in &mut self.live {
            if *left != HELD || released {
                *left = if *left == HELD { 1 } else { *left } - 1;
            }
        }
        let (done, live): (Vec<_>, Vec<_>) = self.live.drain(..).partition(|(_, left)| *left == 0);
        self.live = live;
        for (id, _) in done {
            let out = loraloom_model::SampleOutput {
                sequences: Vec::new(),
                prompt: Default::default(),
            };
            step.finished.push((id, Ok(Output::Sample(out))));
        }
        step
    }

    fn decoding(&self) -> usize {
        self.live.len()
    }

    /// Ten tokens held per job decoding, and 7 kept.
    fn kv_tokens(&self) -> loraloom_engine::KvHeld {
        loraloom_engine::KvHeld {
            held: 10 * self.live.len(),
            kept: 7,
        }
    }

    fn drop_decoding(&mut self, ids: &[String]) -> Vec<String> {
        let (dropped, live): (Vec<_>, Vec<_>) =
            self.live.drain(..).partition(|(id, _)| ids.contains(id));
        self.live = live;
        dropped.into_iter().map(|(id, _)| id).collect()
    }
}

/// An engine over a [`FakeDecoder`] with `limits`, one base-model sampling session per name in
/// `sessions`, and the flag that releases [`HELD`] jobs.
fn decode_engine(
    limits: Limits,
    sessions: &[&str],
) -> (Engine, Vec<QueueKey>, Arc<std::sync::atomic::AtomicBool>) {
    let (backend, release, _) = FakeDecoder::new(Duration::ZERO);
    let config = fake_config(limits);
    let registry = Arc::new(Registry::new(temp_dir("decode-stop")));
    let engine = Engine::start(config, registry, vec![Box::new(backend)]);
    let keys = sessions
        .iter()
        .map(|name| base_sampler(&engine, name))
        .collect();
    (engine, keys, release)
}

/// Creates tenant `t`'s base-model sampling session `name` on `engine`; returns its queue.
fn base_sampler(engine: &Engine, name: &str) -> QueueKey {
    let key = SamplerKey {
        tenant: "t".into(),
        sampler_id: name.into(),
    };
    engine
        .create_sampler(key.clone(), loraloom_engine::SamplerSource::Base)
        .unwrap();
    QueueKey::Sampler(key)
}

/// One greedy sequence of `max_tokens` tokens from the prompt `[1]`.
fn sample_of(max_tokens: i64) -> Work {
    Work::Sample {
        prompt: vec![1],
        num_samples: 1,
        params: SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        },
        scoring: loraloom_model::Scoring::prompt_logprobs(false),
        record_stability: false,
        stream: false,
    }
}

fn held_sample() -> Work {
    sample_of(HELD)
}

fn wait_running(engine: &Engine, id: &str) {
    while !matches!(engine.futures().get("t", id).unwrap(), FutureState::Running) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_running_sampling_job_is_cancelled_between_tokens_and_the_others_go_on() {
    let (engine, keys, release) = decode_engine(Limits::default(), &["a", "b"]);
    let a = engine.submit(keys[0].clone(), held_sample()).unwrap();
    let b = engine.submit(keys[1].clone(), held_sample()).unwrap();
    wait_running(&engine, &a);
    wait_running(&engine, &b);
    assert!(
        engine.cancel("t", &a).unwrap(),
        "a decoding job can be cancelled"
    );
    assert!(matches!(
        wait(&engine, "t", &a),
        FutureState::Failed(EngineError::Cancelled)
    ));
    assert!(
        matches!(engine.futures().get("t", &b).unwrap(), FutureState::Running),
        "the other job goes on decoding"
    );
    assert!(
        !engine.cancel("t", &a).unwrap(),
        "a finished job is not cancelled"
    );
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(wait(&engine, "t", &b), FutureState::Done(_)));
    engine.shutdown(Duration::MAX);
}

/// A cancel that races a worker taking the job off its queue into its decode loop still
/// cancels it: the job is found queued or decoding, never in between (CI once saw `false`).
#[test]
fn a_sampling_job_cancelled_as_it_starts_is_cancelled() {
    let (engine, keys, release) = decode_engine(Limits::default(), &["a"]);
    for _ in 0..1000 {
        let id = engine.submit(keys[0].clone(), held_sample()).unwrap();
        assert!(
            engine.cancel("t", &id).unwrap(),
            "an unfinished job is cancelled"
        );
        assert!(matches!(
            wait(&engine, "t", &id),
            FutureState::Failed(EngineError::Cancelled)
        ));
    }
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    engine.shutdown(Duration::MAX);
}

#[test]
fn sampling_over_its_time_limit_fails_and_shutdown_stops_decoding() {
    let limits = Limits {
        max_sample_time: Duration::from_millis(50),
        ..Limits::default()
    };
    let (engine, keys, _release) = decode_engine(limits, &["a"]);
    let id = engine.submit(keys[0].clone(), held_sample()).unwrap();
    match wait(&engine, "t", &id) {
        FutureState::Failed(EngineError::RanTooLong { limit_s, .. }) => {
            assert!((limit_s - 0.05).abs() < 1e-9)
        }
        other => panic!("expected time_limit, got {other:?}"),
    }
    engine.shutdown(Duration::MAX);

    // Without a time limit, a held job would decode forever: shutdown (not finishing the
    // queue) stops it between two tokens as "server restarted" and returns.
    let limits = Limits {
        max_sample_time: Duration::ZERO,
        ..Limits::default()
    };
    let (engine, keys, _release) = decode_engine(limits, &["a"]);
    let id = engine.submit(keys[0].clone(), held_sample()).unwrap();
    wait_running(&engine, &id);
    engine.shutdown(Duration::ZERO);
    assert!(matches!(
        engine.futures().get("t", &id).unwrap(),
        FutureState::Failed(EngineError::ServerRestarted)
    ));
}

#[test]
fn sampling_jobs_join_a_running_decode_and_training_runs_between_its_steps() {
    let (backend, release, log) = FakeDecoder::new(Duration::ZERO);
    let config = fake_config(Limits {
        max_kv_tokens: 400,
        ..Limits::default()
    });
    let registry = Arc::new(Registry::new(temp_dir("decode")));
    registry
        .add_model(key("t", "run"), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    let engine = Engine::start(config, registry, vec![Box::new(backend)]);
    let (a, b) = (base_sampler(&engine, "a"), base_sampler(&engine, "b"));
    let held = engine.submit(a.clone(), sample_of(HELD)).unwrap();
    wait_running(&engine, &held);
    // While `held` decodes: a short job of another session, a second job of the same session
    // (sessions are read-only: their jobs need not wait for each other) and a training step.
    let short = engine.submit(b, sample_of(3)).unwrap();
    let same = engine.submit(a, sample_of(2)).unwrap();
    let step = engine
        .submit(QueueKey::Model(key("t", "run")), optim(0.1))
        .unwrap();
    for id in [&short, &same, &step] {
        assert!(matches!(wait(&engine, "t", id), FutureState::Done(_)));
    }
    assert!(
        matches!(
            engine.futures().get("t", &held).unwrap(),
            FutureState::Running
        ),
        "the long generation is still decoding"
    );
    // The loop's footprint: one sequence of the held job's prompt and max_tokens (the other
    // jobs, padded to its length, fit beside it: 3 x 101 <= 400).
    let stats = engine.stats();
    assert_eq!(
        (stats.kv_tokens_reserved, stats.kv_budget_tokens),
        (1 + HELD as u64, 400)
    );
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(wait(&engine, "t", &held), FutureState::Done(_)));
    let log = log.lock().unwrap().clone();
    assert_eq!(log[0], ("admit".to_string(), vec![held.clone()]));
    assert!(log
        .iter()
        .any(|(w, ids)| w == "optim_step" && ids == &vec![step.clone()]));
    let stats = engine.stats();
    assert_eq!(stats.prefills, 3);
    assert!(stats.decode_steps > 0 && stats.first_tokens == 0);
    assert_eq!(stats.kv_tokens_reserved, 0, "released as the jobs ended");
    // What the loop holds is asked once the worker is done with the step that emptied it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.stats().kv_tokens_held != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = engine.stats();
    assert_eq!((stats.kv_tokens_held, stats.kept_tokens), (0, 7));
    engine.shutdown(Duration::MAX);
}

#[test]
fn a_request_larger_than_the_kv_budget_runs_while_smaller_ones_keep_coming() {
    let limits = Limits {
        max_kv_tokens: 90,
        ..Limits::default()
    };
    let (engine, keys, _release) = decode_engine(limits, &["steady", "big"]);
    let big_done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Steady traffic: a 10-token request every 4 ms (each decodes for 10+ ms), so the loop
        // never empties while it lasts (at most 20 s).
        let steady = scope.spawn(|| {
            let start = Instant::now();
            let mut ids = Vec::new();
            while !big_done.load(std::sync::atomic::Ordering::SeqCst)
                && start.elapsed() < Duration::from_secs(20)
            {
                ids.push(engine.submit(keys[0].clone(), sample_of(10)).unwrap());
                std::thread::sleep(Duration::from_millis(4));
            }
            ids
        });
        while engine.stats().decode_steps == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // 1 + 99 entries for one sequence: more than the whole budget.
        let big = engine.submit(keys[1].clone(), sample_of(99)).unwrap();
        assert!(matches!(wait(&engine, "t", &big), FutureState::Done(_)));
        assert!(
            !steady.is_finished(),
            "it ran while the steady traffic went on"
        );
        big_done.store(true, std::sync::atomic::Ordering::SeqCst);
        for id in steady.join().unwrap() {
            assert!(matches!(wait(&engine, "t", &id), FutureState::Done(_)));
        }
    });
    engine.shutdown(Duration::MAX);
}

#[test]
fn saves_queued_under_the_checkpoint_limit_stop_at_it_when_they_run() {
    let (engine, _) = model_engine();
    engine.registry().set_checkpoint_limits(1, 0);
    let run = key("t", "run");
    engine.set_paused(true);
    engine
        .create_model(run.clone(), spec(2, 0), serde_json::Value::Null, None)
        .unwrap();
    // All three pass at submission: the tenant holds no checkpoint yet.
    let ids = ["a", "b", "c"].map(|name| {
        let save = Work::Save {
            name: name.into(),
            kind: CheckpointKind::State,
            sampler: None,
            options: Default::default(),
        };
        engine.submit(QueueKey::Model(run.clone()), save).unwrap()
    });
    engine.set_paused(false);
    let outcomes = ids.map(|id| wait(&engine, "t", &id));
    assert!(matches!(outcomes[0], FutureState::Done(_)), "{outcomes:?}");
    for outcome in &outcomes[1..] {
        assert!(
            matches!(outcome, FutureState::Failed(EngineError::LimitReached(m)) if m.contains("--max-checkpoints-per-tenant")),
            "{outcome:?}"
        );
    }
    assert_eq!(engine.registry().checkpoint_usage("t").0, 1);
    engine.shutdown(Duration::MAX);
}

#[test]
fn a_busy_decode_loop_decodes_as_long_as_each_training_batch_took_before_the_next() {
    // A decode step sleeps 1 ms: some 40 steps fit in a batch's time.
    let (backend, release, log) = FakeDecoder::new(Duration::from_millis(40));
    let registry = Arc::new(Registry::new(temp_dir("share")));
    registry
        .add_model(key("t", "run"), "tiny", spec(4, 0), serde_json::Value::Null)
        .unwrap();
    let engine = Engine::start(
        fake_config(Limits::default()),
        registry,
        vec![Box::new(backend)],
    );
    let held = engine
        .submit(base_sampler(&engine, "s"), sample_of(HELD))
        .unwrap();
    wait_running(&engine, &held);
    let steps: Vec<String> = (0..4)
        .map(|_| {
            engine
                .submit(QueueKey::Model(key("t", "run")), optim(0.1))
                .unwrap()
        })
        .collect();
    for id in &steps {
        assert!(matches!(wait(&engine, "t", id), FutureState::Done(_)));
    }
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(wait(&engine, "t", &held), FutureState::Done(_)));
    // Decode steps between one training batch and the next: one per batch (the old rule)
    // would give 1; the time share gives about as many as fit in 40 ms.
    let log = log.lock().unwrap().clone();
    let batches: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].0 == "optim_step")
        .collect();
    assert_eq!(batches.len(), 4, "{log:?}");
    for pair in batches.windows(2) {
        let between = log[pair[0]..pair[1]]
            .iter()
            .filter(|(w, _)| w == "step")
            .count();
        assert!(
            between >= 3,
            "{between} decode steps between two training batches"
        );
    }
    engine.shutdown(Duration::MAX);
}

/// A streamed sampling job reports each token of each of its sequences, in order, before its
/// future settles, and its stream then ends; a job beside it that does not stream reports
/// nothing, and work other than sampling does not stream.
#[test]
fn a_streamed_job_reports_every_token_as_chosen_and_its_stream_ends_when_it_settles() {
    let (engine, _) = model_engine();
    let queue = base_sampler(&engine, "s");
    let (id, mut tokens) = engine
        .submit_streaming(queue.clone(), seeded_sample(3, 12, 5))
        .unwrap();
    let plain = engine
        .submit(queue.clone(), seeded_sample(2, 9, 6))
        .unwrap();
    let mut streamed: HashMap<usize, Vec<(i64, f32)>> = HashMap::new();
    while let Some(step) = tokens.blocking_recv() {
        for t in step {
            assert!(t.top_k.is_none(), "no alternatives were asked for");
            streamed
                .entry(t.sample)
                .or_default()
                .push((t.token, t.logprob));
        }
    }
    // The stream ended: the job has settled, with the tokens it streamed.
    let FutureState::Done(Output::Sample(out)) = engine.futures().get("t", &id).unwrap() else {
        panic!("the stream ended before its job settled");
    };
    assert_eq!(out.sequences.len(), 3);
    for (s, seq) in out.sequences.iter().enumerate() {
        let want: Vec<(i64, f32)> = seq
            .tokens
            .iter()
            .copied()
            .zip(seq.logprobs.clone())
            .collect();
        assert_eq!(streamed[&s], want, "sequence {s}");
    }
    assert!(matches!(wait(&engine, "t", &plain), FutureState::Done(_)));
    let run = key("t", "r");
    create_run(&engine, &run);
    assert!(matches!(
        engine.submit_streaming(QueueKey::Model(run), optim(1e-3)),
        Err(EngineError::InvalidInput { .. })
    ));
    engine.shutdown(Duration::MAX);
}

/// A streamed job cancelled while it decodes ends its stream too.
#[test]
fn a_cancelled_streamed_job_ends_its_stream() {
    let (engine, keys, release) = decode_engine(Limits::default(), &["a"]);
    let (id, mut tokens) = engine
        .submit_streaming(keys[0].clone(), held_sample())
        .unwrap();
    wait_running(&engine, &id);
    assert!(engine.cancel("t", &id).unwrap());
    while tokens.blocking_recv().is_some() {}
    assert!(matches!(
        engine.futures().get("t", &id).unwrap(),
        FutureState::Failed(EngineError::Cancelled)
    ));
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    engine.shutdown(Duration::MAX);
}

/// A streamed job is not journaled: its reader is one connection, which a restart ends. A
/// shutdown whose drain ends before it fails it (its stream ends, the failure readable), and
/// the restarted server does not run it again, where a job beside it that does not stream is
/// queued again and runs.
#[test]
fn a_shutdown_fails_a_streamed_job_that_a_restart_does_not_run_again() {
    let decoder = tiny_decoder();
    let data_dir = temp_dir("stream-journal");
    let engine = durable_engine(&data_dir, &decoder);
    let queue = base_sampler(&engine, "s");
    engine.set_paused(true);
    let (streamed, mut tokens) = engine
        .submit_streaming(queue.clone(), seeded_sample(1, 4, 1))
        .unwrap();
    let plain = engine.submit(queue, seeded_sample(1, 4, 2)).unwrap();
    engine.end_drain();
    engine.shutdown(Duration::MAX);
    let restarted = FutureState::Failed(EngineError::ServerRestarted);
    assert_eq!(engine.futures().get("t", &streamed).unwrap(), restarted);
    assert!(tokens.blocking_recv().is_none(), "the stream ended");
    drop(engine);
    let engine = durable_engine(&data_dir, &decoder);
    assert!(matches!(wait(&engine, "t", &plain), FutureState::Done(_)));
    assert_eq!(engine.futures().get("t", &streamed).unwrap(), restarted);
    engine.shutdown(Duration::MAX);
}
