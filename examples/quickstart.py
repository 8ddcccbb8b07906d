"""Fine-tune the default model on a few examples with the official tinker SDK, then sample."""
import os
import tinker
from tinker import types
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(os.environ.get("MODEL_DIR", "data/models/SmolLM2-135M-Instruct"))
service = tinker.ServiceClient(base_url=os.environ.get("LORALOOM_URL", "http://127.0.0.1:8000"), api_key="tml-local")
trainer = service.create_lora_training_client(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", rank=16, seed=0).result()

def datum(prompt, answer):
    p, a = tok(prompt).input_ids, tok(answer).input_ids + [tok.eos_token_id]
    return types.Datum(model_input=types.ModelInput.from_ints((p + a)[:-1]),
                       loss_fn_inputs={"target_tokens": (p + a)[1:], "weights": [0.0] * (len(p) - 1) + [1.0] * len(a)})

data = [datum("Q: What is loraloom? A:", " A LoRA server."), datum("Q: Who owns the GPU? A:", " We all do.")]
for step in range(15):
    loss = trainer.forward_backward(data, "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=2e-3)).result()
    print(f"step {step}: loss {loss.result().metrics['loss:sum']:.3f}")

sampler = trainer.save_weights_and_get_sampling_client().result()
out = sampler.sample(types.ModelInput.from_ints(tok("Q: What is loraloom? A:").input_ids), num_samples=1,
                     sampling_params=types.SamplingParams(max_tokens=8, temperature=0.0)).result()
print(tok.decode(out.sequences[0].tokens, skip_special_tokens=True))
