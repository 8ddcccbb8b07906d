use loraloom_model::*;
use std::time::Instant;
use tch::{Device, Kind};
fn step(dec: &Decoder, a: &LoraAdapter) -> f64 {
    let toks: Vec<i64> = (0..129).map(|j| (j * 104729) % 40000 + 100).collect();
    let data = vec![Datum {
        input_tokens: toks[..128].to_vec(),
        loss_inputs: LossInputs {
            target_tokens: toks[1..].to_vec(),
            weights: Some(vec![1.0; 128]),
            logprobs: None,
            advantages: None,
        },
    }];
    let t = Instant::now();
    for _ in 0..3 {
        forward_backward(
            dec,
            &[TrainRequest {
                adapter: Some(a),
                loss: LossFn::CrossEntropy,
                data: &data,
            }],
            true,
        )
        .unwrap();
    }
    t.elapsed().as_secs_f64() / 3.0
}
fn main() {
    let dir = std::path::Path::new("data/models/SmolLM2-135M-Instruct");
    let dec = Decoder::load(dir, Device::Cpu, Some(Kind::Float)).unwrap();
    let spec = LoraSpec {
        rank: 16,
        alpha: 32.0,
        seed: 0,
        train_attn: true,
        train_mlp: true,
        train_unembed: true,
    };
    let a = LoraAdapter::new(spec.clone(), dec.config(), Device::Cpu, Kind::Float).unwrap();
    step(&dec, &a);
    println!(
        "main: {:.3}s threads {}",
        step(&dec, &a),
        tch::get_num_threads()
    );
    let d2 = dec.shallow_clone();
    let n = tch::get_num_threads();
    let mode = std::env::args().nth(1).unwrap_or_default();
    std::thread::spawn(move || {
        if mode == "set" {
            tch::set_num_threads(n);
        }
        let a = LoraAdapter::new(spec, d2.config(), Device::Cpu, Kind::Float).unwrap();
        step(&d2, &a);
        println!(
            "thread: {:.3}s threads {}",
            step(&d2, &a),
            tch::get_num_threads()
        );
    })
    .join()
    .unwrap();
}
