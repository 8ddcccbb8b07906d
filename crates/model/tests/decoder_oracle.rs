//! The decoder against transformers on the same weights and inputs.
//!
//! Tolerances: tiny models in f32 agree to max-abs 1e-4 (observed ~1e-6; the rest is the
//! different order of f32 reductions in the two implementations). The 30-layer default model
//! accumulates more rounding, so 1e-3 on logits of magnitude ~20.

mod common;

use common::*;
use loraloom_model::{Decoder, ModelError, Mxfp4Policy};
use tch::{Device, Kind, Tensor};

fn check_real_positions(
    decoder: &Decoder,
    expected: &std::collections::HashMap<String, Tensor>,
    tol: f64,
) {
    let ids = &expected["input_ids"];
    let lengths: Vec<i64> = Vec::<i64>::try_from(&expected["lengths"]).unwrap();
    let want = &expected["logits"];
    let got = tch::no_grad(|| decoder.forward(ids, None)).unwrap();
    assert_eq!(got.size(), want.size());
    for (row, &len) in lengths.iter().enumerate() {
        let g = got.get(row as i64).narrow(0, 0, len);
        let w = want.get(row as i64).narrow(0, 0, len);
        let diff = max_abs_diff(&g, &w);
        let scale = w.abs().max().double_value(&[]);
        assert!(
            diff <= tol,
            "row {row}: max-abs diff {diff} > {tol} (logit scale {scale})"
        );
        assert!(
            scale > 0.5,
            "oracle logits are too small to be a meaningful test: {scale}"
        );
    }
}

fn check_tiny(arch: &str) {
    check_tiny_loaded(arch, Mxfp4Policy::Dequantize);
}

fn check_tiny_loaded(arch: &str, mxfp4: Mxfp4Policy) -> Decoder {
    let dir = TempDir::new(arch);
    oracle(
        "tiny_models.py",
        &["make", arch, dir.path().to_str().unwrap()],
    );
    let decoder = Decoder::load_with(dir.path(), Device::Cpu, Some(Kind::Float), mxfp4).unwrap();
    assert_eq!(
        decoder.config().architecture.name(),
        arch.trim_end_matches("_fused")
            .trim_end_matches("_window")
            .trim_end_matches("_yarn")
            .trim_end_matches("_mxfp4")
    );
    let expected = read_tensors(&dir.path().join("expected.safetensors"));
    check_real_positions(&decoder, &expected, 1e-4);
    decoder
}

#[test]
fn tiny_llama_with_llama3_rope_matches_transformers() {
    check_tiny("llama");
}

#[test]
fn tiny_qwen3_matches_transformers() {
    check_tiny("qwen3");
}

#[test]
fn tiny_qwen3_moe_matches_transformers() {
    check_tiny("qwen3_moe");
}

#[test]
fn tiny_qwen3_moe_with_fused_expert_tensors_matches_transformers() {
    check_tiny("qwen3_moe_fused");
}

#[test]
fn tiny_mixtral_matches_transformers() {
    check_tiny("mixtral");
}

#[test]
fn tiny_mixtral_with_fused_expert_tensors_matches_transformers() {
    check_tiny("mixtral_fused");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_tiny("qwen2");
}

#[test]
fn tiny_mistral_matches_transformers() {
    check_tiny("mistral");
}

#[test]
fn tiny_mistral_attending_within_a_sliding_window_matches_transformers() {
    // A 5-token window over rows of up to 20 tokens, in every layer.
    check_tiny("mistral_window");
}

#[test]
fn tiny_qwen2_with_one_sliding_layer_matches_transformers() {
    // Layer 1 within a 6-token window, layer 0 over everything.
    check_tiny("qwen2_window");
}

#[test]
fn tiny_qwen3_with_yarn_rope_scaling_matches_transformers() {
    check_tiny("qwen3_yarn");
}

#[test]
fn tiny_llama_with_untruncated_yarn_and_an_attention_factor_matches_transformers() {
    check_tiny("llama_yarn");
}

#[test]
fn tiny_gpt_oss_matches_transformers() {
    // Attention sinks, biased attention and experts, the clamped SwiGLU, alternating sliding
    // and full layers, untruncated YaRN.
    check_tiny("gpt_oss");
}

#[test]
fn tiny_gpt_oss_with_mxfp4_experts_matches_transformers_dequantized() {
    let decoder = check_tiny_loaded("gpt_oss_mxfp4", Mxfp4Policy::Dequantize);
    assert_eq!(decoder.dequantized_weight_bytes(), 0);
    assert!(!decoder.summary().contains("MXFP4"));
}

#[test]
fn tiny_gpt_oss_with_mxfp4_experts_kept_packed_matches_transformers_dequantized() {
    // The experts stay packed and each layer dequantizes them as it runs (every expert at
    // once: a pass over rows of up to 20 tokens routes more token-expert pairs than there are
    // experts).
    let decoder = check_tiny_loaded("gpt_oss_mxfp4", Mxfp4Policy::Packed);
    assert!(
        decoder.summary().ends_with("experts in MXFP4"),
        "{}",
        decoder.summary()
    );
    // At least one layer's gate/up, 8 experts of [2·32, 64] in f32, and its temporaries.
    let gate_up = 8 * 64 * 64 * 4;
    let held = decoder.dequantized_weight_bytes();
    assert!(held >= gate_up && held <= 3 * gate_up, "{held}");
    // A limit under what dequantizing takes keeps them packed; over it, not.
    let dir = TempDir::new("gpt_oss_mxfp4_limit");
    oracle(
        "tiny_models.py",
        &["make", "gpt_oss_mxfp4", dir.path().to_str().unwrap()],
    );
    // Two layers' gate/up [8, 64, 64] and down [8, 64, 32]: 4 bytes each in f32, packed half
    // a byte and a scale byte per 32.
    let values = 2 * (8 * 64 * 64 + 8 * 64 * 32);
    let load = |limit| {
        let policy = Mxfp4Policy::PackedAbove(limit);
        Decoder::load_with(dir.path(), Device::Cpu, Some(Kind::Float), policy).unwrap()
    };
    let (packed, dense) = (load(values * 4 - 1), load(values * 4));
    assert!(packed.dequantized_weight_bytes() > 0);
    assert_eq!(dense.dequantized_weight_bytes(), 0);
    assert_eq!(
        dense.weight_bytes() - packed.weight_bytes(),
        values * 4 - (values / 2 + values / 32)
    );
}

#[test]
fn default_model_matches_transformers_and_knows_paris() {
    let model_dir = default_model_dir();
    assert!(
        model_dir.join("config.json").exists(),
        "default model missing at {} (run `make model`)",
        model_dir.display()
    );
    let out = TempDir::new("default");
    let expected_path = out.path().join("expected.safetensors");
    oracle(
        "tiny_models.py",
        &[
            "default",
            model_dir.to_str().unwrap(),
            expected_path.to_str().unwrap(),
        ],
    );
    let decoder = Decoder::load(&model_dir, Device::Cpu, Some(Kind::Float)).unwrap();
    let expected = read_tensors(&expected_path);
    check_real_positions(&decoder, &expected, 1e-3);

    // Greedy continuation by repeated full forwards (no cache): the oracle for the model itself,
    // independent of the sampler. Must equal transformers' generate() and mention Paris.
    let mut ids: Vec<i64> = Vec::<i64>::try_from(expected["paris_prompt"].view([-1])).unwrap();
    let want: Vec<i64> = Vec::<i64>::try_from(expected["paris_greedy"].view([-1])).unwrap();
    while ids.len() < want.len() {
        let input = Tensor::from_slice(&ids).view([1, -1]);
        let logits = tch::no_grad(|| decoder.forward(&input, None)).unwrap();
        ids.push(logits.get(0).get(-1).argmax(0, false).int64_value(&[]));
    }
    assert_eq!(ids, want);
    let tokenizer = loraloom_model::TextTokenizer::from_dir(&model_dir).unwrap();
    let text = tokenizer.decode(&ids).unwrap();
    assert!(text.contains("Paris"), "greedy continuation: {text:?}");
}

fn tiny_checkpoint(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    oracle(
        "tiny_models.py",
        &["make", "llama", dir.path().to_str().unwrap()],
    );
    dir
}

#[test]
fn bad_model_directories_are_named_errors() {
    let dir = tiny_checkpoint("bad");
    let p = dir.path();
    let load = || {
        Decoder::load(p, Device::Cpu, Some(Kind::Float))
            .map(|_| ())
            .unwrap_err()
    };

    // Unknown architecture.
    let config = std::fs::read_to_string(p.join("config.json")).unwrap();
    std::fs::write(
        p.join("config.json"),
        config.replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let err = load();
    assert!(
        matches!(err, ModelError::UnsupportedArchitecture(ref a) if a == "gpt_neox"),
        "{err}"
    );

    // Wrong shapes: the config promises a wider model than the weights hold.
    std::fs::write(
        p.join("config.json"),
        config.replace("\"hidden_size\": 64", "\"hidden_size\": 48"),
    )
    .unwrap();
    let err = load();
    assert!(
        matches!(err, ModelError::WrongShape { ref name, .. } if name == "model.embed_tokens.weight"),
        "{err}"
    );
    assert!(err.to_string().contains("[128, 64]"), "{err}");

    // Missing tensor: one more layer than the checkpoint has.
    std::fs::write(
        p.join("config.json"),
        config.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    let err = load();
    assert!(err.to_string().contains("model.layers.2."), "{err}");

    // Missing files.
    std::fs::write(p.join("config.json"), &config).unwrap();
    std::fs::remove_file(p.join("model.safetensors")).unwrap();
    let err = load();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_file(p.join("config.json")).unwrap();
    let err = load();
    assert!(err.to_string().contains("config.json"), "{err}");

    // Not a directory at all.
    let err = Decoder::load(&p.join("nope"), Device::Cpu, None)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let dir = tiny_checkpoint("sharded");
    let p = dir.path();
    let tensors = read_tensors(&p.join("model.safetensors"));
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, group) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let part: Vec<(&str, &Tensor)> = group.iter().map(|n| (n.as_str(), &tensors[*n])).collect();
        Tensor::write_safetensors(&part, p.join(file)).unwrap();
        for n in group {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    std::fs::remove_file(p.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(p.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let decoder = Decoder::load(p, Device::Cpu, Some(Kind::Float)).unwrap();
    let expected = read_tensors(&p.join("expected.safetensors"));
    check_real_positions(&decoder, &expected, 1e-4);
}

#[test]
fn out_of_vocabulary_tokens_are_rejected() {
    let dir = tiny_checkpoint("oov");
    let decoder = Decoder::load(dir.path(), Device::Cpu, Some(Kind::Float)).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 128]).view([1, 3]);
    let err = decoder.forward(&ids, None).unwrap_err();
    assert!(
        err.to_string().contains("input_ids") && err.to_string().contains("128"),
        "{err}"
    );
}
