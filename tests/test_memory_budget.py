"""Training within a memory budget (`--memory-budget`): a batch larger than the budget runs in
micro-batches, a datum too long for it runs with activation checkpointing, and the result is
that of one unsplit pass; a datum that cannot fit even so is a 400 naming the limit.

Oracle: peft + torch.optim.Adam on the same initial adapter and data, unsplit, one datum at a
time. Two SDK steps are compared by `loss:sum` (the second step's loss depends on the first
step's gradients, so a wrong or missing gradient of any micro-batch shows there). Tolerance
1e-3 relative, as in test_sdk_matches_peft (f32 on both sides, different summation orders).
"""

import pytest
import tinker
from tinker import types

from conftest import MODEL_NAME, Server
from test_sdk_matches_peft import peft_losses

# With 300 MiB, SmolLM2-135M fits about 1,000 tokens of one datum checkpointed, and ~100
# tokens with every layer's activations kept.
BUDGET = "300M"


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("budget"), "--memory-budget", BUDGET)
    yield srv
    srv.stop()


def datum(seed, length):
    tokens = [(seed * 7919 + j * 104729) % 40000 + 100 for j in range(length + 1)]
    weights = [0.0 if j < 4 else 1.0 / 64 for j in range(length)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


def test_a_split_batch_trains_like_peft_unsplit(budget_server):
    sc = tinker.ServiceClient(base_url=budget_server.url, api_key="tml-budget")
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=3).result()
    tc.save_state("initial").result()
    # Four short datums (micro-batches) around one of 600 tokens (checkpointed).
    data = [datum(1, 48), datum(2, 600), datum(3, 40), datum(4, 64), datum(5, 32)]
    lr = 1e-3
    ours = []
    for _ in range(2):
        fb = tc.forward_backward(data, "cross_entropy").result()
        ours.append(fb.metrics["loss:sum"])
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()
    assert "memory budget: 300.0 MiB per pass (set)" in budget_server.output()
    [adapter_dir] = list(budget_server.data_dir.glob("checkpoints/*/*/weights/initial"))
    theirs = peft_losses(adapter_dir, data, steps=2, lr=lr)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= 1e-3 * abs(b), (step, ours, theirs)
    assert ours[1] < ours[0], ours


def test_a_datum_beyond_the_budget_is_a_named_400(budget_server):
    sc = tinker.ServiceClient(base_url=budget_server.url, api_key="tml-budget")
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8).result()
    with pytest.raises(tinker.BadRequestError) as refused:
        tc.forward_backward([datum(6, 4000)], "cross_entropy").result()
    text = str(refused.value)
    assert "--memory-budget" in text and "data[0]" in text, text
    # The server keeps serving, the same run included.
    fb = tc.forward_backward([datum(7, 16)], "cross_entropy").result()
    assert fb.metrics["loss:sum"] > 0
