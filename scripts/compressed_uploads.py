"""What the SDK's zstd compression of forward_backward bodies (`proto_compress_fwdbwd`, which
loraloom's client config turns on) saves on the wire, for SFT batches of real text.

Builds the SDK's own protobuf body for cookbook-shaped SFT batches (prompt weights 0, completion
weights 1) from this repository's Markdown files tokenized with the default model's tokenizer,
compresses it as the SDK does, and prints sizes, the ratio, the client's compression time and the
upload time at a few link speeds.

    .venv/bin/python scripts/compressed_uploads.py [MODEL_DIR]
"""

import sys
import time
from pathlib import Path

import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
model_dir = sys.argv[1] if len(sys.argv) > 1 else ROOT / "data/models/SmolLM2-135M-Instruct"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
text = "\n".join(p.read_text() for p in sorted(ROOT.glob("**/*.md")) if ".venv" not in p.parts and "target" not in p.parts)
tokens = tokenizer(text).input_ids


def body(datums: int, length: int) -> bytes:
    data = []
    for i in range(datums):
        start = (i * length) % max(1, len(tokens) - length - 1)
        seq = tokens[start:start + length + 1]
        prompt = length // 4
        data.append(types.Datum(
            model_input=types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [0.0] * prompt + [1.0] * (length - prompt)}))
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id="run", seq_id=1)
    return forward_backward_request_to_proto(request).SerializeToString()


print(f"{len(tokens)} tokens of text; zstandard {zstandard.__version__}, level 3 (the SDK's default)")
print("| batch | protobuf bytes | zstd bytes | ratio | compress ms | upload at 20 / 100 / 1000 Mbit/s, plain vs zstd (ms) |")
print("|---|---|---|---|---|---|")
for datums, length in [(8, 512), (32, 1024), (128, 256)]:
    plain = body(datums, length)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        packed = zstandard.ZstdCompressor().compress(plain)
        best = min(best, time.perf_counter() - started)
    links = " / ".join(f"{len(plain) * 8 / (m * 1e3):.0f} vs {len(packed) * 8 / (m * 1e3):.0f}" for m in (20, 100, 1000))
    print(f"| {datums}x{length} | {len(plain):,} | {len(packed):,} | {len(plain) / len(packed):.1f}x | {best * 1e3:.1f} | {links} |")
