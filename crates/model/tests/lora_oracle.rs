//! LoRA training against peft and torch on the same weights and inputs.
//!
//! Tolerances: f32 everywhere. peft logits agree to 2e-5 of the largest logit, logprobs to 1e-4
//! max-abs and gradients to 1e-4 relative to their largest entry (the two sides sum the same
//! products in different orders).
//! Loss gradients w.r.t. logits are elementwise formulas: 1e-5. Adam: 1e-5 after 5 steps.

mod common;

use common::*;
use loraloom_model::checkpoint::{self, SaveRequest};
use loraloom_model::loss::{elementwise_loss, target_logprobs};
use loraloom_model::memory::{self, Mode};
use loraloom_model::{
    forward_backward, held_bytes, step_many, AdamParams, AdamState, AdapterStack, Datum, Decoder,
    Field, LoraAdapter, LoraBatch, LoraSpec, LossFn, LossInputs, Mxfp4Policy, PassCost,
    RequestOutput, StepJob, TrainRequest, NO_LIMIT,
};
use tch::{Device, Kind, Tensor};

fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    max_abs_diff(got, want) / scale
}

/// A one-member stack of `adapter` for direct decoder calls (f32, no gradients).
fn stack_of(adapter: &LoraAdapter) -> AdapterStack {
    AdapterStack::new(&[adapter], Kind::Float, false).unwrap()
}

/// `loss:sum` within 1e-4 (relative, at least absolute) of the peft oracle's `loss`.
fn assert_loss_matches_peft(loss_sum: f64, expected: &Expected) {
    let want = expected["loss"].double_value(&[0]);
    assert!(
        (loss_sum - want).abs() <= 1e-4 * want.abs().max(1.0),
        "{loss_sum} vs {want}"
    );
}

/// Every LoRA gradient (A and B of 7 projections in each of 2 layers, and the unembedding)
/// within 1e-4 relative of the peft oracle's `grad.*`.
fn assert_grads_match_peft(adapter: &LoraAdapter, expected: &Expected) {
    assert_eq!(check_grads(adapter, expected), 2 * (2 * 7 + 1));
}

#[test]
fn fresh_adapter_leaves_base_logits_unchanged() {
    let (_dir, decoder) = tiny_llama("fresh");
    let adapter = LoraAdapter::new(spec(8, 3), decoder.config(), Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[3i64, 17, 99, 4, 5, 6]).view([2, 3]);
    let base = tch::no_grad(|| decoder.forward(&ids, None)).unwrap();
    let stack = stack_of(&adapter);
    let lora = LoraBatch::one(&stack, 0, 2).unwrap();
    let adapted = tch::no_grad(|| decoder.forward(&ids, Some(&lora))).unwrap();
    assert_eq!(max_abs_diff(&base, &adapted), 0.0);
    // ... and A is not zero: the adapter is real, B = 0 is what keeps outputs equal.
    let a = &adapter.named_pairs()[0].1.a;
    assert!(a.abs().max().double_value(&[]) > 0.0);
    let bound = 1.0 / (decoder.config().hidden_size as f64).sqrt();
    assert!(a.abs().max().double_value(&[]) <= bound);
}

/// What a peft oracle run expects, by name.
type Expected = std::collections::HashMap<String, Tensor>;

/// Runs `lora_oracle.py COMMAND TINY OUT` on a fresh tiny model named `tag`: the model's folder
/// and decoder, the oracle's folder (holding the `adapter` it saved) and what it expects.
fn run_peft_oracle(tag: &str, command: &str) -> (TempDir, Decoder, TempDir, Expected) {
    let (dir, decoder) = tiny_llama(tag);
    let out = TempDir::new(&format!("{tag}-out"));
    oracle(
        "lora_oracle.py",
        &[
            command,
            dir.path().to_str().unwrap(),
            out.path().to_str().unwrap(),
        ],
    );
    let expected = read_tensors(&out.path().join("expected.safetensors"));
    (dir, decoder, out, expected)
}

/// One `cross_entropy` request of `adapter` over `data`, alone in its batch.
fn cross_entropy(
    decoder: &Decoder,
    adapter: &LoraAdapter,
    data: &[Datum],
    budget: u64,
) -> RequestOutput {
    let req = TrainRequest {
        adapter: Some(adapter),
        loss: LossFn::CrossEntropy,
        data,
    };
    forward_backward(decoder, &[req], true, budget)
        .unwrap()
        .remove(0)
}

/// A fresh copy of the adapter the peft oracle saved in `out`.
fn oracle_adapter(out: &TempDir, decoder: &Decoder) -> LoraAdapter {
    checkpoint::load(&out.path().join("adapter"), decoder.config(), Device::Cpu)
        .unwrap()
        .adapter
}

/// `adapter` on `decoder` against the oracle's `expected`: logits of a pass without a graph at
/// real positions, then a cross-entropy `forward_backward`'s `loss:sum` and logprobs (its
/// gradients are left in the adapter for the caller to check).
///
/// Logits within 2e-5 of the largest logit (11.5 on the llama oracle): the two sides sum the
/// same f32 products in different orders, and MKL picks its kernels by matrix shape, so fusing
/// projections (q/k/v, gate/up, and their LoRA `A`s) moves single logits by ~1e-5 of that
/// (measured: 5e-5 and 1.1e-4 absolute before and after fusing the `A`s).
fn assert_matches_oracle(
    decoder: &Decoder,
    adapter: &LoraAdapter,
    expected: &Expected,
) -> RequestOutput {
    let lengths = vec_i64(&expected["lengths"]);
    let ids = &expected["input_ids"];
    let stack = stack_of(adapter);
    let lora = LoraBatch::one(&stack, 0, ids.size()[0]).unwrap();
    let logits = tch::no_grad(|| decoder.forward(ids, Some(&lora))).unwrap();
    let tolerance = 2e-5 * expected["logits"].abs().max().double_value(&[]);
    for (i, &n) in lengths.iter().enumerate() {
        let d = max_abs_diff(
            &logits.get(i as i64).narrow(0, 0, n),
            &expected["logits"].get(i as i64).narrow(0, 0, n),
        );
        assert!(
            d < tolerance,
            "row {i}: logits differ by {d} (tolerance {tolerance})"
        );
    }
    let result = cross_entropy(decoder, adapter, &datums(expected), NO_LIMIT);
    assert_loss_matches_peft(result.loss_sum, expected);
    for (i, &n) in lengths.iter().enumerate() {
        let got = Tensor::from_slice(&result.outputs[i].logprobs);
        let want = expected["logprobs"].get(i as i64).narrow(0, 0, n);
        assert!(max_abs_diff(&got, &want) < 1e-4, "datum {i} logprobs");
        // elementwise_loss = -w * lp, zero where the weight is zero.
        assert_eq!(result.outputs[i].elementwise_loss[0], 0.0);
    }
    result
}

/// Every gradient of `adapter` against the oracle's `grad.*` (1e-4 relative); returns how many.
fn check_grads(adapter: &LoraAdapter, expected: &Expected) -> usize {
    let mut checked = 0;
    for (module, pair) in adapter.named_field_pairs(Field::Grads).unwrap() {
        for (half, t) in [("A", &pair.a), ("B", &pair.b)] {
            let key = format!("grad.base_model.model.{module}.lora_{half}.weight");
            let rel = rel_diff(t, &expected[&key]);
            assert!(rel < 1e-4, "{key}: relative diff {rel}");
            checked += 1;
        }
    }
    checked
}

#[test]
fn expert_adapters_on_a_mixture_of_experts_match_pytorch() {
    // Qwen3-MoE: two sparse layers around a dense one. peft adapts attention, the dense layer's
    // MLP and the unembedding; the oracle gives each expert its own LoRA on gate, up and down in
    // plain PyTorch, on transformers' router. The first layer's gradients flow back through
    // every later layer's experts and their adapters.
    // q/k/v/o of 3 layers, the dense layer's gate/up/down, the sparse layers' experts'
    // gate/up/down, the unembedding: A and B of each.
    check_expert_adapters("qwen3_moe", 2 * (3 * 4 + 3 + 2 * 3 + 1));
}

#[test]
fn expert_adapters_on_gpt_oss_match_pytorch() {
    // GPT-OSS: attention with sinks and biases, a sliding layer then a full one, every layer's
    // MLP biased experts with the clamped SwiGLU (their gate and up columns interleaved in the
    // checkpoint). Gradients reach q and k through the sinks' softmax.
    check_expert_adapters("gpt_oss", 2 * (2 * 4 + 2 * 3 + 1));
}

/// The expert-adapter oracle on tiny `arch`: logits, loss and the `grads` gradients alone and
/// beside another adapter of its layout.
fn check_expert_adapters(arch: &str, grads: usize) {
    let dir = TempDir::new("moe-lora");
    let out = TempDir::new("moe-lora-out");
    let (tiny, o) = (dir.path().to_str().unwrap(), out.path().to_str().unwrap());
    oracle("tiny_models.py", &["make", arch, tiny]);
    oracle("lora_oracle.py", &["moe-grads", tiny, o]);
    let expected = read_tensors(&out.path().join("expected.safetensors"));
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let adapter = oracle_adapter(&out, &decoder);
    let imported = adapter.spec();
    assert!(imported.train_attn && imported.train_mlp && imported.train_unembed);
    assert_eq!(imported.rank, 6);

    // Logits with the adapter, no graph (the inference stack's path); then forward_backward.
    let alone = assert_matches_oracle(&decoder, &adapter, &expected);
    let data = datums(&expected);
    assert_eq!(check_grads(&adapter, &expected), grads);

    // Beside another adapter of its layout in one batch (one stack of two members: each
    // token's experts read its own member's A and B), it computes and learns what it did alone.
    let other = LoraAdapter::new(imported.clone(), decoder.config(), Device::Cpu).unwrap();
    adapter.zero_grad().unwrap();
    let other_data = train_data(5, 2, 9);
    let together = forward_backward(
        &decoder,
        &[
            TrainRequest {
                adapter: Some(&other),
                loss: LossFn::CrossEntropy,
                data: &other_data,
            },
            TrainRequest {
                adapter: Some(&adapter),
                loss: LossFn::CrossEntropy,
                data: &data,
            },
        ],
        true,
        NO_LIMIT,
    )
    .unwrap();
    assert!((together[1].loss_sum - alone.loss_sum).abs() < 1e-4 * alone.loss_sum.abs());
    assert_eq!(check_grads(&adapter, &expected), grads);
    // The fresh adapter (B = 0) leaves the model as it is: its loss is the base model's.
    let base = forward_backward(
        &decoder,
        &[TrainRequest {
            adapter: None,
            loss: LossFn::CrossEntropy,
            data: &other_data,
        }],
        false,
        NO_LIMIT,
    )
    .unwrap();
    assert!((together[0].loss_sum - base[0].loss_sum).abs() < 1e-4 * base[0].loss_sum.abs());
}

#[test]
fn expert_adapters_learn_on_packed_mxfp4_experts_as_on_dequantized_ones() {
    // Dequantized experts match transformers (decoder_oracle) and expert adapters on GPT-OSS
    // match PyTorch's gradients (above); packed experts are dequantized where they multiply,
    // and again in the backward pass, into the same values. A batch of 2 rows of 7 tokens
    // routes more token-expert pairs than the 8 experts (each layer dequantizes every expert);
    // of 2 tokens routes 4 (one expert dequantized per pair).
    let dir = TempDir::new("gpt_oss_mxfp4");
    oracle(
        "tiny_models.py",
        &["make", "gpt_oss_mxfp4", dir.path().to_str().unwrap()],
    );
    let load = |mxfp4| Decoder::load_with(dir.path(), Device::Cpu, Some(Kind::Float), mxfp4);
    let dense = load(Mxfp4Policy::Dequantize).unwrap();
    let packed = load(Mxfp4Policy::Packed).unwrap();
    let cfg = dense.config();
    let specs = [Some(with_targets(spec(4, 3), true, true, true))];
    for data in [train_data(4, 2, 7), train_data(5, 1, 2)] {
        let on_dense = perturbed(&specs, cfg, 11);
        let on_packed = copies(&on_dense, cfg);
        let run = |decoder: &Decoder, adapters: &[Option<LoraAdapter>]| {
            let request = TrainRequest {
                adapter: adapters[0].as_ref(),
                loss: LossFn::CrossEntropy,
                data: &data,
            };
            forward_backward(decoder, &[request], true, NO_LIMIT).unwrap()[0].loss_sum
        };
        let (want, got) = (run(&dense, &on_dense), run(&packed, &on_packed));
        assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
        let (a, b) = (
            on_dense[0].as_ref().unwrap(),
            on_packed[0].as_ref().unwrap(),
        );
        let grads = row_of(a, Field::Grads);
        assert!(grads.abs().max().double_value(&[]) > 0.0);
        let rel = rel_diff(&row_of(b, Field::Grads), &grads);
        assert!(
            rel <= 1e-5,
            "{} rows: gradients differ by {rel}",
            data.len()
        );
        // Every expert projection's gradient reaches the adapter, packed as dense.
        for (module, pair) in b.named_field_pairs(Field::Grads).unwrap() {
            if module.contains("experts") {
                assert!(pair.a.abs().max().double_value(&[]) > 0.0, "{module}");
            }
        }
    }
}

#[test]
fn logits_logprobs_loss_and_gradients_match_peft() {
    let (_dir, decoder, out, expected) = run_peft_oracle("peft", "peft-grads");
    let adapter = oracle_adapter(&out, &decoder);
    assert_eq!(adapter.spec().rank, 4);
    assert_eq!(adapter.spec().alpha, 8.0);

    assert_matches_oracle(&decoder, &adapter, &expected);
    assert_grads_match_peft(&adapter, &expected);
}

/// `expected`'s top-K datums (real positions only): `[n, K]` targets and weights, K = `k`
/// (the oracle's first `k` columns).
fn topk_datums(expected: &Expected, k: i64) -> Vec<Datum> {
    let lengths = vec_i64(&expected["lengths"]);
    let rows = |name: &str, i: usize, n: i64| {
        expected[name]
            .get(i as i64)
            .narrow(0, 0, n)
            .narrow(1, 0, k)
            .contiguous()
            .view([-1])
    };
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| Datum {
            input_tokens: vec_i64(&expected["input_ids"].get(i as i64).narrow(0, 0, n)),
            loss_inputs: LossInputs {
                target_tokens: vec_i64(&rows("targets", i, n)),
                weights: Some(vec_f32(&rows("weights", i, n))),
                logprobs: None,
                advantages: None,
                sequence_ratio_mask: None,
                recorded: None,
                targets_per_position: Some(k as usize),
            },
            custom: None,
        })
        .collect()
}

/// Datum `d` with one target per position: column `column` of its `[N, K]` targets and weights.
fn column_of(d: &Datum, column: usize) -> Datum {
    let k = d.loss_inputs.width();
    let pick = |v: &[f32]| {
        v.iter()
            .skip(column)
            .step_by(k)
            .copied()
            .collect::<Vec<_>>()
    };
    let mut one = d.clone();
    one.loss_inputs.target_tokens = d
        .loss_inputs
        .target_tokens
        .iter()
        .skip(column)
        .step_by(k)
        .copied()
        .collect();
    one.loss_inputs.weights = d.loss_inputs.weights.as_deref().map(pick);
    one.loss_inputs.targets_per_position = None;
    one
}

#[test]
fn top_k_targets_per_position_match_peft_and_sum_their_columns() {
    let (_dir, decoder, out, expected) = run_peft_oracle("topk", "peft-topk");
    let load = || oracle_adapter(&out, &decoder);
    let k = expected["targets"].size()[2];
    let data = topk_datums(&expected, k);
    let adapter = load();
    let result = cross_entropy(&decoder, &adapter, &data, NO_LIMIT);
    // Tolerances as peft's one-target test (module docs).
    assert_loss_matches_peft(result.loss_sum, &expected);
    for (i, (d, o)) in data.iter().zip(&result.outputs).enumerate() {
        let n = d.input_tokens.len() as i64;
        assert_eq!(o.targets_per_position, Some(k as usize));
        let want = expected["logprobs"]
            .get(i as i64)
            .narrow(0, 0, n)
            .reshape([-1]);
        let got = Tensor::from_slice(&o.logprobs);
        assert!(max_abs_diff(&got, &want) < 1e-4, "datum {i} logprobs");
        // elementwise_loss = -w · lp per target: 0 at the zeroed first position and column 2.
        let weights = d.loss_inputs.weights.as_ref().unwrap();
        for (j, (&l, &w)) in o.elementwise_loss.iter().zip(weights).enumerate() {
            let lp = o.logprobs[j];
            assert!(
                (l + w * lp).abs() <= 1e-6 * lp.abs().max(1.0),
                "datum {i} [{j}]"
            );
        }
        assert!(o.elementwise_loss[..k as usize].iter().all(|&l| l == 0.0));
    }
    assert_grads_match_peft(&adapter, &expected);

    // One request mixing K = 5, one target per position and K = 4 over a row longer than its
    // loss chunks equals its datums sent one at a time, each as its K columns of one target per
    // position (gradients accumulate across calls).
    let mut long = train_data(5, 1, 40).remove(0);
    long.loss_inputs.target_tokens = (0..40 * 4).map(|j| (j * 37 + j / 4) % 128).collect();
    long.loss_inputs.weights = Some((0..40 * 4).map(|j| (j % 7) as f32 / 10.0).collect());
    long.loss_inputs.targets_per_position = Some(4);
    let mixed = vec![data[0].clone(), column_of(&data[1], 1), long];
    let cost = PassCost::new(decoder.config(), Kind::Float);
    // As in the memory-budget test: a loss chunk takes a sixteenth of the budget.
    let budget = cost.activation_bytes(40, Mode::Checkpointed) * 16 / 15 + cost.loss_bytes(2);
    let lengths: Vec<usize> = mixed.iter().map(|d| d.input_tokens.len()).collect();
    let plan = memory::plan(&lengths, true, &cost, budget).unwrap();
    assert!(plan.loss_chunk < 40, "{plan:?}");
    let (together, apart) = (load(), load());
    // The pass holds a copy of the adapter's weights besides its activations.
    let held = held_bytes(&[Some(&together)], Kind::Float);
    let fused = cross_entropy(&decoder, &together, &mixed, budget + held);
    for (i, d) in mixed.iter().enumerate() {
        let width = d.loss_inputs.width();
        let columns: Vec<RequestOutput> = (0..width)
            .map(|c| cross_entropy(&decoder, &apart, &[column_of(d, c)], NO_LIMIT))
            .collect();
        let sum: f64 = columns.iter().map(|c| c.loss_sum).sum();
        let got = fused.outputs[i]
            .elementwise_loss
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        assert!(
            (got - sum).abs() <= 1e-5 * sum.abs().max(1.0),
            "datum {i}: {got} vs {sum}"
        );
        // Position-major [N, K] in the fused output; column c of position p alone.
        for (c, column) in columns.iter().enumerate() {
            for (p, &lp) in column.outputs[0].logprobs.iter().enumerate() {
                let fused_lp = fused.outputs[i].logprobs[p * width + c];
                // f32 log-probabilities near -11 summed in other orders: relative 1e-5.
                assert!(
                    (fused_lp - lp).abs() <= 1e-5 * lp.abs().max(1.0),
                    "datum {i} [{p}, {c}]: {fused_lp} vs {lp}"
                );
            }
        }
    }
    let want = row_of(&apart, Field::Grads);
    let rel = rel_diff(&row_of(&together, Field::Grads), &want);
    assert!(rel < 1e-5, "gradient differs by {rel}");
    assert_eq!(fused.outputs[1].targets_per_position, None);
}

#[test]
fn forward_computes_outputs_without_touching_gradients() {
    let (_dir, decoder) = tiny_llama("fwd");
    let adapter = LoraAdapter::new(spec(4, 1), decoder.config(), Device::Cpu).unwrap();
    let data = vec![Datum {
        input_tokens: vec![1, 2, 3, 4],
        loss_inputs: LossInputs {
            target_tokens: vec![2, 3, 4, 5],
            weights: Some(vec![1.0; 4]),
            logprobs: None,
            advantages: None,
            sequence_ratio_mask: None,
            recorded: None,
            targets_per_position: None,
        },
        custom: None,
    }];
    let req = || TrainRequest {
        adapter: Some(&adapter),
        loss: LossFn::CrossEntropy,
        data: &data,
    };
    let fwd = forward_backward(&decoder, &[req()], false, NO_LIMIT).unwrap();
    assert!(!adapter.has_pending_gradients());
    assert_eq!(
        row_of(&adapter, Field::Grads).abs().max().double_value(&[]),
        0.0
    );
    let fb = forward_backward(&decoder, &[req()], true, NO_LIMIT).unwrap();
    assert_eq!(fwd, fb);
    assert!(adapter.has_pending_gradients());
    let g1 = adapter.named_field_pairs(Field::Grads).unwrap()[0]
        .1
        .b
        .copy();
    assert!(g1.abs().max().double_value(&[]) > 0.0);
    // A second forward_backward accumulates: the gradient doubles.
    forward_backward(&decoder, &[req()], true, NO_LIMIT).unwrap();
    let g2 = adapter.named_field_pairs(Field::Grads).unwrap()[0]
        .1
        .b
        .copy();
    assert!(rel_diff(&g2, &(&g1 * 2.0)) < 1e-6);
}

#[test]
fn losses_and_their_gradients_match_torch_formulas() {
    let out = TempDir::new("losses");
    let path = out.path().join("losses.safetensors");
    oracle("lora_oracle.py", &["losses", path.to_str().unwrap()]);
    let e = read_tensors(&path);
    let targets = vec_i64(&e["targets"]);
    let inputs = |weights: bool| LossInputs {
        target_tokens: targets.clone(),
        weights: weights.then(|| vec_f32(&e["weights"])),
        logprobs: Some(vec_f32(&e["sampling_logprobs"])),
        advantages: Some(vec_f32(&e["advantages"])),
        sequence_ratio_mask: None,
        recorded: None,
        targets_per_position: None,
    };
    let cases: Vec<(&str, LossFn, bool)> = vec![
        ("cross_entropy", LossFn::CrossEntropy, true),
        ("importance_sampling", LossFn::ImportanceSampling, false),
        ("ppo", LossFn::from_name("ppo", &[]).unwrap(), false),
        ("cispo", LossFn::from_name("cispo", &[]).unwrap(), false),
        ("dro", LossFn::Dro { beta: 0.1 }, false),
        ("ppo_weighted", LossFn::from_name("ppo", &[]).unwrap(), true),
    ];
    for (name, loss, weighted) in cases {
        let logits = e["logits"].copy().set_requires_grad(true);
        let lp = target_logprobs(&logits, &targets, 1).unwrap();
        let el = elementwise_loss(&loss, &lp, &inputs(weighted), &[0.0]).unwrap();
        el.sum(Kind::Float).backward();
        let d_el = max_abs_diff(&el, &e[&format!("{name}.elementwise")]);
        let d_grad = max_abs_diff(&logits.grad(), &e[&format!("{name}.grad")]);
        assert!(d_el < 1e-5, "{name}: elementwise loss differs by {d_el}");
        assert!(d_grad < 1e-5, "{name}: gradient differs by {d_grad}");
    }
}

/// Writes `parts` (flattened, then zero padding) as `field` of the adapter's row.
fn write_row(adapter: &LoraAdapter, field: Field, parts: &[&Tensor]) {
    let flat: Vec<Tensor> = parts.iter().map(|t| t.flatten(0, -1)).collect();
    let flat = Tensor::cat(&flat, 0);
    let numel = adapter.layout().numel;
    let padded = Tensor::cat(
        &[
            flat.shallow_clone(),
            Tensor::zeros([numel - flat.size()[0]], (Kind::Float, Device::Cpu)),
        ],
        0,
    );
    adapter.row().write(field, &padded).unwrap();
}

#[test]
fn runs_sharing_hyperparameters_at_different_steps_step_together_as_alone() {
    // Runs with equal hyperparameters share one call of the fused kernel, each with its own
    // step count (bias correction) and gradient clipping; each must end where it would alone.
    let (_dir, decoder) = tiny_llama("adam-group");
    let cfg = decoder.config();
    let hp = AdamParams {
        learning_rate: 1e-2,
        weight_decay: 0.05,
        ..AdamParams::default()
    };
    let clipped = AdamParams {
        grad_clip_norm: 1e-3,
        ..hp
    };
    // Runs 0 and 1 are stepped together, 2 and 3 (the same starting rows) alone.
    let runs: Vec<LoraAdapter> = (0..4)
        .map(|i| LoraAdapter::new(spec(4, 70 + i % 2), cfg, Device::Cpu).unwrap())
        .collect();
    let mut states: Vec<AdamState> = runs.iter().map(|r| AdamState::new(r).unwrap()).collect();
    let numel = runs[0].layout().numel;
    let grad = |seed: i64| {
        tch::manual_seed(seed);
        Tensor::randn([numel], (Kind::Float, Device::Cpu))
    };
    // Runs 0 and 2 are three steps ahead.
    for k in 0..3 {
        for i in [0, 2] {
            runs[i].row().write(Field::Grads, &grad(k)).unwrap();
            states[i].step(&runs[i], &hp).unwrap();
        }
    }
    for k in 3..5 {
        for (i, run) in runs.iter().enumerate() {
            let g = grad(k + i as i64 % 2);
            run.row().write(Field::Grads, &g).unwrap();
        }
        let params = if k == 4 { clipped } else { hp };
        let (together, alone) = states.split_at_mut(2);
        let (s0, s1) = together.split_at_mut(1);
        let mut jobs = [
            StepJob {
                adapter: &runs[0],
                state: &mut s0[0],
                params,
            },
            StepJob {
                adapter: &runs[1],
                state: &mut s1[0],
                params,
            },
        ];
        let fused: Vec<_> = step_many(&mut jobs)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        for (j, state) in alone.iter_mut().enumerate() {
            let stats = state.step(&runs[j + 2], &params).unwrap();
            assert_eq!(stats, fused[j], "run {j}, step {k}");
        }
    }
    assert_eq!((states[0].step, states[1].step), (5, 2));
    for i in 0..2 {
        for field in [Field::Params, Field::ExpAvg, Field::ExpAvgSq] {
            let d = max_abs_diff(&row_of(&runs[i], field), &row_of(&runs[i + 2], field));
            assert!(d <= 1e-7, "{field:?} of run {i}: {d}");
        }
    }
}

#[test]
fn one_fused_adamw_step_equals_torch_per_run_with_its_own_hyperparameters() {
    let (_dir, decoder) = tiny_llama("adam");
    let cfg = decoder.config();
    let out = TempDir::new("adam");
    let path = out.path().join("adam.safetensors");
    oracle("lora_oracle.py", &["adam", path.to_str().unwrap()]);
    let e = read_tensors(&path);
    let cases = [
        ("adam", 1e-2, 0.9, 0.95, 1e-8, 0.0, 0.0),
        ("adamw", 3e-3, 0.8, 0.99, 1e-6, 0.1, 0.0),
        ("clipped", 1e-2, 0.9, 0.999, 1e-8, 0.0, 0.5),
    ];
    // Two trios of runs, one run per case, all in one slab; each trio is stepped together (the
    // first on consecutive rows, updated in place; the second on rows with a gap, gathered and
    // written back). The runs in the gaps are in no batch and must keep bit-identical weights
    // and moments.
    let p0: Vec<&Tensor> = (0..3).map(|i| &e[&format!("p0.{i}")]).collect();
    let all: Vec<LoraAdapter> = (0..8)
        .map(|i| LoraAdapter::new(spec(4, 40 + i), cfg, Device::Cpu).unwrap())
        .collect();
    let trios = [[0usize, 1, 2], [4, 6, 7]];
    for &i in trios.iter().flatten() {
        write_row(&all[i], Field::Params, &p0);
    }
    let mut states: Vec<AdamState> = all.iter().map(|r| AdamState::new(r).unwrap()).collect();
    let bystanders = [3usize, 5];
    for &i in &bystanders {
        write_row(&all[i], Field::Grads, &[&e["grad.0.0"]]);
        states[i].step(&all[i], &AdamParams::default()).unwrap();
    }
    let before: Vec<Vec<Tensor>> = bystanders
        .iter()
        .map(|&i| {
            [Field::Params, Field::ExpAvg, Field::ExpAvgSq]
                .map(|f| row_of(&all[i], f))
                .into()
        })
        .collect();
    let numel: i64 = p0.iter().map(|t| t.numel() as i64).sum();
    for step in 0..5 {
        let grads: Vec<&Tensor> = (0..3).map(|i| &e[&format!("grad.{step}.{i}")]).collect();
        for trio in trios {
            for &i in &trio {
                write_row(&all[i], Field::Grads, &grads);
            }
            let mut trio_states: Vec<&mut AdamState> = states
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| trio.contains(i))
                .map(|(_, s)| s)
                .collect();
            let mut jobs: Vec<StepJob> = trio
                .iter()
                .zip(trio_states.iter_mut())
                .zip(cases)
                .map(|((&i, state), (_, lr, b1, b2, eps, wd, clip))| StepJob {
                    adapter: &all[i],
                    state,
                    params: AdamParams {
                        learning_rate: lr,
                        beta1: b1,
                        beta2: b2,
                        eps,
                        weight_decay: wd,
                        grad_clip_norm: clip,
                    },
                })
                .collect();
            for outcome in step_many(&mut jobs) {
                assert_eq!(outcome.unwrap().step, step + 1);
            }
            for (&i, (name, ..)) in trio.iter().zip(cases) {
                let want: Vec<Tensor> = (0..3)
                    .map(|k| e[&format!("{name}.{step}.{k}")].flatten(0, -1))
                    .collect();
                let got = row_of(&all[i], Field::Params);
                let d = max_abs_diff(&got.narrow(0, 0, numel), &Tensor::cat(&want, 0));
                assert!(d < 1e-5, "{name} (run {i}) step {step}: {d}");
                let rest = got.narrow(0, numel, got.size()[0] - numel);
                assert_eq!(
                    rest.abs().max().double_value(&[]),
                    0.0,
                    "zero padding stays zero"
                );
                assert_eq!(
                    row_of(&all[i], Field::Grads).abs().max().double_value(&[]),
                    0.0
                );
            }
        }
    }
    for (&i, was) in bystanders.iter().zip(&before) {
        for (field, was) in [Field::Params, Field::ExpAvg, Field::ExpAvgSq]
            .into_iter()
            .zip(was)
        {
            assert!(
                row_of(&all[i], field).equal(was),
                "{field:?} of run {i} (in no batch) changed"
            );
        }
    }
    for &i in trios.iter().flatten() {
        assert_eq!(states[i].step, 5);
    }
}

/// Runs requests of `specs` (datum counts `counts`, `None` = the base model) fused in one
/// forward_backward and each alone; losses and every gradient must agree.
fn fused_equals_alone(name: &str, specs: &[Option<LoraSpec>], counts: &[usize]) {
    let (_dir, decoder) = tiny_llama(name);
    fused_equals_alone_on(&decoder, specs, counts);
}

/// [`fused_equals_alone`] on `decoder`.
fn fused_equals_alone_on(decoder: &Decoder, specs: &[Option<LoraSpec>], counts: &[usize]) {
    let cfg = decoder.config();
    let fused = perturbed(specs, cfg, 0);
    // Exact copies of the same weights, to run alone.
    let alone = copies(&fused, cfg);
    let data: Vec<Vec<Datum>> = counts
        .iter()
        .enumerate()
        .map(|(i, &n)| train_data(i as i64, n, 5 + 3 * (i % 3)))
        .collect();
    let requests: Vec<TrainRequest> = (0..specs.len())
        .map(|i| TrainRequest {
            adapter: fused[i].as_ref(),
            loss: LossFn::CrossEntropy,
            data: &data[i],
        })
        .collect();
    let fused_out = forward_backward(decoder, &requests, true, NO_LIMIT).unwrap();
    for i in 0..specs.len() {
        let req = TrainRequest {
            adapter: alone[i].as_ref(),
            loss: LossFn::CrossEntropy,
            data: &data[i],
        };
        let out = forward_backward(decoder, &[req], true, NO_LIMIT)
            .unwrap()
            .remove(0);
        assert!((out.loss_sum - fused_out[i].loss_sum).abs() < 1e-5 * out.loss_sum.abs().max(1.0));
        if let (Some(f), Some(a)) = (&fused[i], &alone[i]) {
            let rel = rel_diff(&row_of(f, Field::Grads), &row_of(a, Field::Grads));
            assert!(rel < 1e-5, "request {i}: gradient differs by {rel}");
            assert!(row_of(a, Field::Grads).abs().max().double_value(&[]) > 0.0);
        }
    }
}

#[test]
fn a_fused_batch_of_mixed_ranks_and_targets_equals_each_alone() {
    // Ranks 2, 3 and 4 (3 and 4 share the rank-4 slab, 3 padded), 8; one run without MLP
    // targets; a base-model request; one datum per run except two.
    fused_equals_alone(
        "fused-mixed",
        &[
            Some(spec(2, 11)),
            Some(spec(3, 12)),
            None,
            Some(spec(4, 13)),
            Some(with_targets(spec(8, 14), true, false, true)),
        ],
        &[1, 2, 1, 3, 1],
    );
}

#[test]
fn expert_adapters_past_a_stacks_capacity_fill_several_stacks_and_equal_each_alone() {
    // 400 experts: a stack holds 1023 / 400 = 2 expert adapters (a stack's expert deltas are
    // grouped matmuls of one group per member and expert, and libtorch's CUDA grouped matmul
    // takes at most 1023 groups).
    let dir = TempDir::new("moe-wide");
    oracle(
        "tiny_models.py",
        &["make", "qwen3_moe_wide", dir.path().to_str().unwrap()],
    );
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let three = perturbed(
        &[Some(spec(4, 1)), Some(spec(4, 2)), Some(spec(4, 3))],
        decoder.config(),
        0,
    );
    let three: Vec<&LoraAdapter> = three.iter().flatten().collect();
    assert_eq!(three[0].layout().stack_capacity(), 2);
    assert!(AdapterStack::new(&three, Kind::Float, false).is_err());
    let mut two = AdapterStack::new(&three[..2], Kind::Float, false).unwrap();
    assert_eq!(two.room(), 0);
    assert!(two.push(three[2]).is_err());
    assert_eq!(
        two.push(three[1]).unwrap(),
        1,
        "a member joins no second time"
    );
    // Five expert adapters of one layout (three stacks, rows of different stacks interleaved
    // in no order), a base-model request and an attention-only run in one forward_backward:
    // each computes and learns what it does alone.
    let mut specs: Vec<Option<LoraSpec>> = (0..5).map(|i| Some(spec(4, 30 + i))).collect();
    specs.insert(2, None);
    specs.push(Some(with_targets(spec(2, 40), true, false, false)));
    fused_equals_alone_on(&decoder, &specs, &[1, 2, 1, 1, 2, 1, 1]);
}

#[test]
fn a_fused_batch_of_many_runs_of_one_layout_equals_each_alone() {
    // Six runs in one slab: equal datum counts (blocks of rows), then uneven ones (gathers).
    let specs: Vec<Option<LoraSpec>> = (0..6).map(|i| Some(spec(4, 20 + i))).collect();
    fused_equals_alone("fused-blocks", &specs, &[2; 6]);
    fused_equals_alone("fused-gather", &specs, &[1, 3, 1, 2, 1, 1]);
}

/// `train_data` with the sampler inputs RL losses read (log-probabilities near the model's,
/// advantages of both signs, GSPO's mask leaving out the first position).
fn rl_data(seed: i64, n: usize, len: usize) -> Vec<Datum> {
    let mut data = train_data(seed, n, len);
    for (i, d) in data.iter_mut().enumerate() {
        let l = d.input_tokens.len();
        let at = |j: usize| (seed as usize + i + j) % 5;
        let inputs = &mut d.loss_inputs;
        inputs.logprobs = Some((0..l).map(|j| -4.2 - 0.2 * at(j) as f32).collect());
        inputs.advantages = Some(
            (0..l)
                .map(|j| if at(j) == 0 { -0.5 } else { 1.0 })
                .collect(),
        );
        inputs.sequence_ratio_mask = Some((0..l).map(|j| f32::from(j > 0)).collect());
    }
    data
}

#[test]
fn a_fused_batch_of_different_losses_and_lengths_equals_each_alone() {
    // Requests of four losses over datums of different lengths: two of cross-entropy (one on
    // the base model), PPO, GSPO (an adapter without the unembedding), two of importance
    // sampling; whole, and with loss chunks shorter than the longest datum, so that a chunk
    // holds several rows (padded, of different adapters) or a piece of one, and GSPO's ratio
    // spans pieces; against each datum alone.
    let (_dir, decoder) = tiny_llama("fused-losses");
    let cfg = decoder.config().clone();
    let ppo = LossFn::from_name("ppo", &[]).unwrap();
    let gspo = LossFn::from_name("gspo", &[]).unwrap();
    let is = LossFn::from_name("importance_sampling", &[]).unwrap();
    let ce = LossFn::CrossEntropy;
    let losses = [ce, ce, ppo, gspo, is, is];
    let specs = [
        Some(spec(4, 61)),
        None,
        Some(spec(4, 62)),
        Some(with_targets(spec(4, 63), true, true, false)),
        Some(spec(4, 64)),
        Some(spec(4, 65)),
    ];
    let data: Vec<Vec<Datum>> = (0..losses.len())
        .map(|i| {
            let mut d = rl_data(i as i64, 2, 6 + 10 * (i % 4));
            d.extend(rl_data(10 + i as i64, 1, 3));
            d
        })
        .collect();
    let adapters = perturbed(&specs, &cfg, 70);
    let batch = |adapters: &[Option<LoraAdapter>], budget: u64| {
        let requests: Vec<TrainRequest> = (0..losses.len())
            .map(|i| TrainRequest {
                adapter: adapters[i].as_ref(),
                loss: losses[i],
                data: &data[i],
            })
            .collect();
        forward_backward(&decoder, &requests, true, budget).unwrap()
    };
    let lengths: Vec<usize> = data
        .iter()
        .flatten()
        .map(|d| d.input_tokens.len())
        .collect();
    let cost = PassCost::new(&cfg, Kind::Float);
    // The smallest budget (in steps of a sixteenth) that fits the batch: the loss takes a
    // sixteenth of it, which must be less than the longest datum.
    let budget = (1..)
        .map(|k| k * cost.loss_bytes(1) * 16)
        .find(|&b| memory::plan(&lengths, true, &cost, b).is_ok())
        .unwrap();
    let plan = memory::plan(&lengths, true, &cost, budget).unwrap();
    assert!(plan.loss_chunk < 26, "{plan:?}");
    let alone = copies(&adapters, &cfg);
    let chunked = copies(&adapters, &cfg);
    let whole_out = batch(&adapters, NO_LIMIT);
    // The pass holds copies of the adapters' weights besides its activations.
    let refs: Vec<Option<&LoraAdapter>> = chunked.iter().map(Option::as_ref).collect();
    let chunked_out = batch(&chunked, budget + held_bytes(&refs, Kind::Float));
    for i in 0..losses.len() {
        // Each datum alone (no padding anywhere); its gradients add up in the adapter.
        let mut want = RequestOutput {
            outputs: Vec::new(),
            loss_sum: 0.0,
            metrics: Vec::new(),
        };
        for datum in &data[i] {
            let req = TrainRequest {
                adapter: alone[i].as_ref(),
                loss: losses[i],
                data: std::slice::from_ref(datum),
            };
            let mut out = forward_backward(&decoder, &[req], true, NO_LIMIT).unwrap();
            want.loss_sum += out[0].loss_sum;
            want.outputs.append(&mut out[0].outputs);
        }
        let want_grads = alone[i].as_ref().map(|a| row_of(a, Field::Grads));
        if let Some(g) = &want_grads {
            assert!(g.abs().max().double_value(&[]) > 0.0);
        }
        for (name, got, fused) in [
            ("whole", &whole_out[i], &adapters[i]),
            ("chunked", &chunked_out[i], &chunked[i]),
        ] {
            let at = format!("{name} request {i} ({:?})", losses[i]);
            let tol = 1e-5 * want.loss_sum.abs().max(1.0);
            assert!((got.loss_sum - want.loss_sum).abs() < tol, "{at}: loss");
            for (g, w) in got.outputs.iter().zip(&want.outputs) {
                assert_eq!(g.logprobs.len(), w.logprobs.len(), "{at}");
                let lp = rel_diff(
                    &Tensor::from_slice(&g.logprobs),
                    &Tensor::from_slice(&w.logprobs),
                );
                let el = rel_diff(
                    &Tensor::from_slice(&g.elementwise_loss),
                    &Tensor::from_slice(&w.elementwise_loss),
                );
                assert!(lp < 1e-5 && el < 1e-5, "{at}: logprobs {lp}, losses {el}");
            }
            if let (Some(fused), Some(want)) = (fused, &want_grads) {
                let rel = rel_diff(&row_of(fused, Field::Grads), want);
                assert!(rel < 1e-5, "{at}: gradient differs by {rel}");
            }
        }
    }
}

#[test]
fn a_batch_split_to_fit_a_memory_budget_equals_one_pass() {
    let (_dir, decoder) = tiny_llama("budget");
    let cfg = decoder.config().clone();
    let specs = [
        Some(with_targets(spec(4, 31), true, true, true)),
        None,
        Some(spec(2, 32)),
    ];
    let whole = perturbed(&specs, &cfg, 40);
    let split = copies(&whole, &cfg);
    // Short datums around one long one, which alone exceeds the budget without checkpointing.
    let mut first = train_data(1, 3, 9);
    first.insert(1, train_data(2, 1, 60).remove(0));
    let data = [first, train_data(3, 2, 12), train_data(4, 4, 7)];
    fn batch<'a>(
        adapters: &'a [Option<LoraAdapter>],
        data: &'a [Vec<Datum>],
    ) -> Vec<TrainRequest<'a>> {
        (0..data.len())
            .map(|i| TrainRequest {
                adapter: adapters[i].as_ref(),
                loss: LossFn::CrossEntropy,
                data: &data[i],
            })
            .collect()
    }
    // The budget: the long datum fits only checkpointed, the loss runs in chunks shorter than
    // it, and the batch needs several micro-batches (checked, so the test cannot pass vacuously).
    let cost = PassCost::new(&cfg, Kind::Float);
    // A loss chunk takes a sixteenth of the budget: what is left holds the checkpointed datum.
    let activations = cost.activation_bytes(60, Mode::Checkpointed) * 16 / 15 + cost.loss_bytes(2);
    // The pass holds copies of the adapters' weights besides: the budget covers them too.
    let refs: Vec<Option<&LoraAdapter>> = whole.iter().map(Option::as_ref).collect();
    let budget = activations + held_bytes(&refs, Kind::Float);
    let lengths: Vec<usize> = data
        .iter()
        .flatten()
        .map(|d| d.input_tokens.len())
        .collect();
    let plan = memory::plan(&lengths, true, &cost, activations).unwrap();
    assert!(plan.micro_batches.len() >= 3, "{plan:?}");
    assert!(plan.loss_chunk < 60, "{plan:?}");
    assert!(
        plan.micro_batches
            .iter()
            .any(|m| m.mode == Mode::Checkpointed && m.rows == (1..2)),
        "{plan:?}"
    );

    let one = forward_backward(&decoder, &batch(&whole, &data), true, NO_LIMIT).unwrap();
    let parts = forward_backward(&decoder, &batch(&split, &data), true, budget).unwrap();
    for (i, (a, b)) in one.iter().zip(&parts).enumerate() {
        assert!(
            (a.loss_sum - b.loss_sum).abs() <= 1e-5 * a.loss_sum.abs().max(1.0),
            "request {i}: {} vs {}",
            a.loss_sum,
            b.loss_sum
        );
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            let lp = Tensor::from_slice(&x.logprobs);
            assert!(rel_diff(&Tensor::from_slice(&y.logprobs), &lp) < 1e-5);
            let el = Tensor::from_slice(&x.elementwise_loss);
            assert!(rel_diff(&Tensor::from_slice(&y.elementwise_loss), &el) < 1e-5);
        }
    }
    for (w, s) in whole.iter().zip(&split) {
        if let (Some(w), Some(s)) = (w, s) {
            let want = row_of(w, Field::Grads);
            assert!(want.abs().max().double_value(&[]) > 0.0);
            let rel = rel_diff(&row_of(s, Field::Grads), &want);
            assert!(rel < 1e-5, "gradient differs by {rel}");
        }
    }
    // Scoring (no graph) under the same budget gives the same log-probabilities.
    let scored = forward_backward(&decoder, &batch(&split, &data), false, budget).unwrap();
    for (a, b) in one.iter().zip(&scored) {
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            let lp = Tensor::from_slice(&x.logprobs);
            assert!(rel_diff(&Tensor::from_slice(&y.logprobs), &lp) < 1e-5);
        }
    }
    // What cannot fit even checkpointed is refused before any gradient changes.
    let before = row_of(split[0].as_ref().unwrap(), Field::Grads);
    let err = forward_backward(&decoder, &batch(&split, &data), true, budget / 4).unwrap_err();
    assert!(err.to_string().contains("--memory-budget"), "{err}");
    assert!(rel_diff(&row_of(split[0].as_ref().unwrap(), Field::Grads), &before) == 0.0);
}

#[test]
fn save_state_then_load_continues_identically() {
    let (_dir, decoder) = tiny_llama("resume");
    let cfg = decoder.config();
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let data = train_data(5, 2, 7);
    let step = |adapter: &LoraAdapter, opt: &mut AdamState| -> f64 {
        let loss = cross_entropy(&decoder, adapter, &data, NO_LIMIT).loss_sum;
        opt.step(adapter, &hp).unwrap();
        loss
    };
    let adapter = LoraAdapter::new(spec(4, 9), cfg, Device::Cpu).unwrap();
    let mut opt = AdamState::new(&adapter).unwrap();
    for _ in 0..3 {
        step(&adapter, &mut opt);
    }
    let ckpt = TempDir::new("ckpt");
    let path = ckpt.path().join("state-3");
    let save = |opt: &AdamState| {
        let req = SaveRequest {
            adapter: &adapter,
            optimizer: Some(opt),
            base_model: "tiny",
            gradients: false,
            note: None,
        };
        checkpoint::save(&req, &path).unwrap();
    };
    save(&opt);
    let loaded = checkpoint::load(&path, cfg, Device::Cpu).unwrap();
    let resumed = loaded.adapter;
    let mut resumed_opt = loaded.optimizer.expect("full state has the optimizer");
    assert_eq!(resumed_opt.step, 3);
    assert_eq!(resumed.spec(), adapter.spec());
    for _ in 0..2 {
        let a = step(&adapter, &mut opt);
        let b = step(&resumed, &mut resumed_opt);
        assert_eq!(a, b, "losses after resuming must be identical");
    }
    assert_eq!(
        max_abs_diff(
            &row_of(&adapter, Field::Params),
            &row_of(&resumed, Field::Params)
        ),
        0.0
    );
    // Saving again under the same name replaces the checkpoint atomically.
    save(&opt);
    let reloaded = checkpoint::load(&path, cfg, Device::Cpu).unwrap();
    assert_eq!(reloaded.optimizer.unwrap().step, 5);
}

#[test]
fn a_snapshot_with_pending_gradients_gives_them_back_pending_and_steps_identically() {
    let (_dir, decoder) = tiny_llama("pending-grads");
    let cfg = decoder.config();
    let hp = AdamParams {
        learning_rate: 1e-2,
        ..AdamParams::default()
    };
    let data = train_data(5, 2, 7);
    let adapter = LoraAdapter::new(spec(4, 9), cfg, Device::Cpu).unwrap();
    let mut opt = AdamState::new(&adapter).unwrap();
    cross_entropy(&decoder, &adapter, &data, NO_LIMIT);
    opt.step(&adapter, &hp).unwrap();
    // Gradients of the next step, not yet consumed (a graceful shutdown comes here).
    cross_entropy(&decoder, &adapter, &train_data(5, 2, 8), NO_LIMIT);
    assert!(adapter.has_pending_gradients());
    let grads = row_of(&adapter, Field::Grads);
    assert!(grads.abs().max().double_value(&[]) > 0.0);
    let out = TempDir::new("pending-grads-out");
    let save = |gradients: bool, name: &str| {
        let path = out.path().join(name);
        let request = SaveRequest {
            adapter: &adapter,
            optimizer: Some(&opt),
            base_model: "tiny",
            gradients,
            note: None,
        };
        checkpoint::save(&request, &path).unwrap();
        checkpoint::load(&path, cfg, Device::Cpu).unwrap()
    };
    // A checkpoint holds no gradients: nothing is pending after loading it.
    let checkpointed = save(false, "checkpoint");
    assert!(!checkpointed.adapter.has_pending_gradients());
    assert_eq!(
        row_of(&checkpointed.adapter, Field::Grads)
            .abs()
            .max()
            .double_value(&[]),
        0.0
    );
    // A snapshot with them gives them back bit for bit, pending, and the next step is the
    // step the run would have taken.
    let restored = save(true, "snapshot");
    assert!(restored.adapter.has_pending_gradients());
    assert!(row_of(&restored.adapter, Field::Grads).equal(&grads));
    let mut restored_opt = restored.optimizer.expect("the snapshot has the optimizer");
    opt.step(&adapter, &hp).unwrap();
    restored_opt.step(&restored.adapter, &hp).unwrap();
    for field in [Field::Params, Field::ExpAvg, Field::ExpAvgSq] {
        assert!(row_of(&restored.adapter, field).equal(&row_of(&adapter, field)));
    }
    assert!(!restored.adapter.has_pending_gradients());
}

#[test]
fn checkpoints_saved_together_load_back_like_single_saves() {
    let (_dir, decoder) = tiny_llama("save-all");
    let cfg = decoder.config();
    let out = TempDir::new("save-all-out");
    let runs: Vec<LoraAdapter> = (0..3)
        .map(|i| {
            let a = LoraAdapter::new(spec(2 + 2 * i, 60 + i as u64), cfg, Device::Cpu).unwrap();
            perturb(&a, 60 + i, 0.05);
            a
        })
        .collect();
    let states: Vec<AdamState> = runs.iter().map(|r| AdamState::new(r).unwrap()).collect();
    let dirs: Vec<_> = (0..3).map(|i| out.path().join(format!("run{i}"))).collect();
    // One directory already holds an older checkpoint, which the batch replaces.
    checkpoint::save(
        &SaveRequest {
            adapter: &runs[2],
            optimizer: None,
            base_model: "tiny",
            gradients: false,
            note: None,
        },
        &dirs[0],
    )
    .unwrap();
    let requests: Vec<(SaveRequest, &std::path::Path)> = runs
        .iter()
        .zip(&states)
        .zip(&dirs)
        .map(|((adapter, state), dir)| {
            let request = SaveRequest {
                adapter,
                optimizer: Some(state),
                base_model: "tiny",
                gradients: false,
                note: None,
            };
            (request, dir.as_path())
        })
        .collect();
    for outcome in checkpoint::save_all(&requests) {
        outcome.unwrap();
    }
    for (run, dir) in runs.iter().zip(&dirs) {
        let loaded = checkpoint::load(dir, cfg, Device::Cpu).unwrap();
        assert_eq!(loaded.adapter.spec(), run.spec());
        assert!(loaded.optimizer.is_some());
        for field in [Field::Params, Field::ExpAvg, Field::ExpAvgSq] {
            assert!(row_of(&loaded.adapter, field).equal(&row_of(run, field)));
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no temporary directories stay behind");
}

#[test]
fn exported_adapter_gives_the_same_logits_in_peft() {
    let (dir, decoder) = tiny_llama("export");
    let adapter = LoraAdapter::new(spec(4, 21), decoder.config(), Device::Cpu).unwrap();
    perturb(&adapter, 21, 0.05);
    let out = TempDir::new("export-out");
    let adapter_dir = out.path().join("sampler");
    let req = SaveRequest {
        adapter: &adapter,
        optimizer: None,
        base_model: "tiny",
        gradients: false,
        note: None,
    };
    checkpoint::save(&req, &adapter_dir).unwrap();
    let logits_path = out.path().join("peft_logits.safetensors");
    oracle(
        "lora_oracle.py",
        &[
            "peft-logits",
            dir.path().to_str().unwrap(),
            adapter_dir.to_str().unwrap(),
            logits_path.to_str().unwrap(),
        ],
    );
    let e = read_tensors(&logits_path);
    let stack = stack_of(&adapter);
    let lora = LoraBatch::one(&stack, 0, 1).unwrap();
    let ours = tch::no_grad(|| decoder.forward(&e["input_ids"], Some(&lora))).unwrap();
    let base = tch::no_grad(|| decoder.forward(&e["input_ids"], None)).unwrap();
    assert!(
        max_abs_diff(&ours, &base) > 1e-2,
        "the adapter must change the logits for this test to mean anything"
    );
    let d = max_abs_diff(&ours, &e["logits"]);
    assert!(d < 1e-4, "peft logits differ by {d}");
}

#[test]
fn bad_training_inputs_are_named_errors() {
    let (_dir, decoder) = tiny_llama("badin");
    let cfg = decoder.config();
    let adapter = LoraAdapter::new(spec(4, 1), cfg, Device::Cpu).unwrap();
    let run = |d: Datum, loss: LossFn| {
        let data = vec![d];
        let req = TrainRequest {
            adapter: Some(&adapter),
            loss,
            data: &data,
        };
        forward_backward(&decoder, &[req], true, NO_LIMIT)
            .unwrap_err()
            .to_string()
    };
    let good = || train_data(1, 1, 4).remove(0);
    let mut d = good();
    d.loss_inputs.target_tokens.pop();
    assert!(run(d, LossFn::CrossEntropy).contains("data[0].loss_fn_inputs.target_tokens"));
    let mut d = good();
    d.input_tokens[2] = 128;
    let err = run(d, LossFn::CrossEntropy);
    assert!(
        err.contains("data[0].model_input") && err.contains("128"),
        "{err}"
    );
    let mut d = good();
    d.loss_inputs.target_tokens[1] = 500;
    assert!(run(d, LossFn::CrossEntropy).contains("target_tokens"));
    let mut d = good();
    d.loss_inputs.weights.as_mut().unwrap()[1] = f32::NAN;
    assert!(run(d, LossFn::CrossEntropy).contains("data[0].loss_fn_inputs.weights"));
    let err = run(good(), LossFn::ImportanceSampling);
    assert!(err.contains("loss_fn_inputs.logprobs"), "{err}");
    let mut s = spec(0, 1);
    let err = LoraAdapter::new(s.clone(), cfg, Device::Cpu)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    s.rank = 4;
    s.alpha = f64::NAN;
    assert!(LoraAdapter::new(s, cfg, Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string()
        .contains("alpha"));
    let mut opt = AdamState::new(&adapter).unwrap();
    let bad = AdamParams {
        learning_rate: f64::NAN,
        ..AdamParams::default()
    };
    let err = opt.step(&adapter, &bad).unwrap_err();
    assert!(
        err.to_string().contains("adam_params.learning_rate"),
        "{err}"
    );
    let bad = AdamParams {
        beta2: -0.1,
        ..AdamParams::default()
    };
    assert!(opt
        .step(&adapter, &bad)
        .unwrap_err()
        .to_string()
        .contains("beta2"));
    assert_eq!(opt.step, 0, "a rejected step changes nothing");
}

/// Rows of mixed members of a stack that is not trainable (decode, `forward`) go through every
/// member's `A` and `B` at once under a mask; each row's logits must equal that row alone with
/// its own adapter. f32; the masked products add exact zeros, so only summation order differs.
#[test]
fn mixed_members_of_an_inference_stack_equal_each_row_alone() {
    let (_dir, decoder) = tiny_llama("dense");
    let cfg = decoder.config();
    let adapters: Vec<LoraAdapter> = (0..3)
        .map(|i| {
            // Ranks 3, 4, 4: one slab of bucket rank 4 (rank 3 padded).
            let a = LoraAdapter::new(spec(3 + i.min(1), 40 + i as u64), cfg, Device::Cpu).unwrap();
            perturb(&a, 60 + i, 0.1);
            a
        })
        .collect();
    let refs: Vec<&LoraAdapter> = adapters.iter().collect();
    let stack = AdapterStack::new(&refs, Kind::Float, false).unwrap();
    let members = [2i64, 0, 1, 1, 0, 2];
    let ids =
        Tensor::from_slice(&[5i64, 9, 2, 7, 1, 3, 3, 8, 4, 6, 2, 2, 9, 1, 5, 4, 7, 7]).view([6, 3]);
    let assignment: Vec<_> = members.iter().map(|&m| Some((&stack, m))).collect();
    let mixed = tch::no_grad(|| {
        decoder
            .forward(&ids, Some(&LoraBatch::new(&assignment).unwrap()))
            .unwrap()
    });
    // The same rows with every fused group's delta added through one block-diagonal `B` (what
    // a GPU does for small stacks; the CPU never does).
    let mut block_diagonal = AdapterStack::new(&refs, Kind::Float, false).unwrap();
    block_diagonal.set_group_b(Some(true)).unwrap();
    let assignment: Vec<_> = members
        .iter()
        .map(|&m| Some((&block_diagonal, m)))
        .collect();
    let mixed_b = tch::no_grad(|| {
        decoder
            .forward(&ids, Some(&LoraBatch::new(&assignment).unwrap()))
            .unwrap()
    });
    for (row, &m) in members.iter().enumerate() {
        let own = AdapterStack::new(&[&adapters[m as usize]], Kind::Float, false).unwrap();
        let alone = tch::no_grad(|| {
            decoder
                .forward(
                    &ids.narrow(0, row as i64, 1),
                    Some(&LoraBatch::one(&own, 0, 1).unwrap()),
                )
                .unwrap()
        });
        let err = rel_diff(&mixed.narrow(0, row as i64, 1), &alone);
        assert!(err < 1e-5, "row {row} (member {m}): relative error {err}");
        let err = rel_diff(&mixed_b.narrow(0, row as i64, 1), &alone);
        assert!(
            err < 1e-5,
            "row {row} (member {m}), block-diagonal B: relative error {err}"
        );
    }
    // One member of the three for every row (its own block of the dense pair), and a batch
    // whose rows 1 and 4 run the base model (the delta goes to the other rows only): each row
    // equals the trainable stack's path (products with the scale, no dense pair) alone.
    let plain = |row: i64, m: Option<usize>| {
        let own = m.map(|m| AdapterStack::new(&[&adapters[m]], Kind::Float, true).unwrap());
        let batch = own.as_ref().map(|s| LoraBatch::one(s, 0, 1).unwrap());
        tch::no_grad(|| {
            decoder
                .forward(&ids.narrow(0, row, 1), batch.as_ref())
                .unwrap()
        })
    };
    let all_one = tch::no_grad(|| {
        decoder
            .forward(&ids, Some(&LoraBatch::one(&stack, 1, 6).unwrap()))
            .unwrap()
    });
    let some_base: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(row, &m)| (row % 3 != 1).then_some((&stack, m)))
        .collect();
    let partial = tch::no_grad(|| {
        decoder
            .forward(&ids, Some(&LoraBatch::new(&some_base).unwrap()))
            .unwrap()
    });
    let some_base_b: Vec<_> = members
        .iter()
        .enumerate()
        .map(|(row, &m)| (row % 3 != 1).then_some((&block_diagonal, m)))
        .collect();
    let partial_b = tch::no_grad(|| {
        decoder
            .forward(&ids, Some(&LoraBatch::new(&some_base_b).unwrap()))
            .unwrap()
    });
    for row in 0..6i64 {
        let m = (row % 3 != 1).then_some(members[row as usize] as usize);
        let err = rel_diff(&partial_b.narrow(0, row, 1), &plain(row, m));
        assert!(
            err < 1e-5,
            "row {row} ({m:?}), some base rows, block-diagonal B: relative error {err}"
        );
        let err = rel_diff(&all_one.narrow(0, row, 1), &plain(row, Some(1)));
        assert!(
            err < 1e-5,
            "row {row}, member 1 for all: relative error {err}"
        );
        let m = (row % 3 != 1).then_some(members[row as usize] as usize);
        let err = rel_diff(&partial.narrow(0, row, 1), &plain(row, m));
        assert!(
            err < 1e-5,
            "row {row} ({m:?}), some base rows: relative error {err}"
        );
    }
    // A decode step (one token per row, matrices instead of `[rows, 1, ..]` tensors, keys
    // rotated into the cache) after a prefill of the first two tokens gives the third
    // position's logits of the one pass, for mixed members and for some base rows, with one `B`
    // per target and with block-diagonal `B`s.
    let cases = [
        (
            "mixed",
            members
                .iter()
                .map(|&m| Some((&stack, m)))
                .collect::<Vec<_>>(),
            &mixed,
        ),
        ("mixed, block-diagonal B", assignment.clone(), &mixed_b),
        ("some base rows", some_base.clone(), &partial),
        (
            "some base rows, block-diagonal B",
            some_base_b.clone(),
            &partial_b,
        ),
    ];
    for (case, assignment, one_pass) in cases {
        let batch = LoraBatch::new(&assignment).unwrap();
        let stepped = tch::no_grad(|| {
            let (_, mut cache) = decoder.prefill(&ids.narrow(1, 0, 2), Some(&batch)).unwrap();
            let next: Vec<i64> = Vec::try_from(ids.select(1, 2)).unwrap();
            let hidden = decoder
                .decode_step(&next, &mut cache, Some(&batch))
                .unwrap();
            decoder.logits(&hidden, Some(&batch)).unwrap()
        });
        let err = rel_diff(&stepped, &one_pass.select(1, 2));
        assert!(err < 1e-5, "{case}, decode step: relative error {err}");
    }
    // And the adapters matter: a row with another member's adapter differs.
    let other = AdapterStack::new(&[&adapters[0]], Kind::Float, false).unwrap();
    let wrong = tch::no_grad(|| {
        decoder
            .forward(
                &ids.narrow(0, 0, 1),
                Some(&LoraBatch::one(&other, 0, 1).unwrap()),
            )
            .unwrap()
    });
    assert!(rel_diff(&mixed.narrow(0, 0, 1), &wrong) > 1e-3);
}

/// Requests joining a decode loop together bring their adapters at once: `push_many` adds each
/// new adapter once, existing members keep their indices, a stack built from a list with
/// repeats holds each adapter once, and each member index computes that adapter's delta.
#[test]
fn push_many_adds_each_new_adapter_once_and_keeps_member_indices() {
    let (_dir, decoder) = tiny_llama("push");
    let cfg = decoder.config();
    let adapters: Vec<LoraAdapter> = (0..3)
        .map(|i| {
            let a = LoraAdapter::new(spec(4, 80 + i as u64), cfg, Device::Cpu).unwrap();
            perturb(&a, 90 + i, 0.1);
            a
        })
        .collect();
    let (a, b, c) = (&adapters[0], &adapters[1], &adapters[2]);
    let mut stack = AdapterStack::new(&[a, a], Kind::Float, false).unwrap();
    assert_eq!(stack.len(), 1);
    assert_eq!(stack.push_many(&[b, a, c, b]).unwrap(), vec![1, 0, 2, 1]);
    assert_eq!(stack.len(), 3);
    assert_eq!(stack.push(c).unwrap(), 2);
    let ids = Tensor::from_slice(&[5i64, 9, 2, 7]).view([1, 4]);
    for (m, adapter) in [a, b, c].into_iter().enumerate() {
        let own = AdapterStack::new(&[adapter], Kind::Float, true).unwrap();
        let (got, want) = tch::no_grad(|| {
            (
                decoder
                    .forward(&ids, Some(&LoraBatch::one(&stack, m as i64, 1).unwrap()))
                    .unwrap(),
                decoder
                    .forward(&ids, Some(&LoraBatch::one(&own, 0, 1).unwrap()))
                    .unwrap(),
            )
        });
        let err = rel_diff(&got, &want);
        assert!(err < 1e-5, "member {m}: relative error {err}");
    }
}
