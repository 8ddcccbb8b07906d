"""Weight export as the SDK and its CLI expect it: `tinker checkpoint download` of a trained
state writes a PEFT adapter that `peft` loads and whose greedy output equals the server's;
`save_weights_external` with age recipients stores every file encrypted (only the holder of the
identity reads them); download URLs are signed, expiring, tenant-bound and need no key; the
CLI's temporary export is deleted afterwards."""

import os
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest
import requests
import tinker
import torch
from peft import PeftModel
from tinker import types
from transformers import AutoModelForCausalLM

from conftest import ALICE, BOB, TWO_TENANTS, DEFAULT_MODEL_DIR, MODEL_NAME, Server
from test_sdk import PAIRS, train_on_pairs

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def export_server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("export"), *TWO_TENANTS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def trained(export_server, tokenizer):
    sc = tinker.ServiceClient(base_url=export_server.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=MODEL_NAME, rank=8, seed=3).result()
    train_on_pairs(tc, tokenizer, steps=4, learning_rate=2e-3)
    state = tc.save_state("final").result().path
    sampler = tc.save_weights_and_get_sampling_client().result()
    yield tc, state, sampler
    sc.close("success").result()


def peft_greedy(adapter_dir, prompt):
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def server_greedy(sampler, prompt):
    res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                              stop=[])).result()
    return res.sequences[0].tokens


def test_cli_download_gives_a_peft_adapter_with_the_servers_greedy_output(export_server, trained, tokenizer, tmp_path):
    tc, state, sampler = trained
    env = dict(os.environ, TINKER_BASE_URL=export_server.url, TINKER_API_KEY=ALICE)
    cli = Path(sys.executable).parent / "tinker"
    done = subprocess.run([str(cli), "checkpoint", "download", state, "--output", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [adapter_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (adapter_dir / "adapter_model.safetensors").exists()
    assert (adapter_dir / "adapter_config.json").exists()
    prompt = tokenizer(PAIRS[0][0]).input_ids
    assert peft_greedy(adapter_dir, prompt) == server_greedy(sampler, prompt)
    # The CLI's temporary export was deleted.
    rest = tinker.RestClient(base_url=export_server.url, api_key=ALICE)
    kinds = [c.checkpoint_type for c in rest.list_user_checkpoints().result().checkpoints]
    assert "external" not in kinds, kinds


def test_encrypted_export_and_signed_urls(export_server, trained, tokenizer, tmp_path):
    tc, _, sampler = trained
    identity = pyrage.x25519.Identity.generate()
    saved = tc.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())]).result()
    assert saved.path.endswith("/external_weights/sealed")
    rest = tinker.RestClient(base_url=export_server.url, api_key=ALICE)
    urls = rest.get_external_weights_urls(saved.path).result()
    assert set(urls.urls) == {"adapter_config.json.age", "adapter_model.safetensors.age", "loraloom.json.age"}
    for name, url in urls.urls.items():
        body = requests.get(url, timeout=30)  # no API key: the signature is the credential
        assert body.status_code == 200, body.text
        assert body.content.startswith(b"age-encryption.org/v1")
        (tmp_path / name.removesuffix(".age")).write_bytes(pyrage.decrypt(body.content, [identity]))
    prompt = tokenizer(PAIRS[1][0]).input_ids
    assert peft_greedy(tmp_path, prompt) == server_greedy(sampler, prompt)

    # An altered link is refused; another tenant gets no links; a deleted export serves nothing.
    url = urls.urls["adapter_config.json.age"]
    token, file = url.rsplit("/", 2)[-2:]
    payload, signature = token.split(".")
    forged = url.replace(token, payload + "." + ("0" if signature[0] != "0" else "1") + signature[1:])
    assert requests.get(forged, timeout=30).status_code == 403
    other_file = url.replace("/adapter_config.json.age", "/adapter_model.safetensors.age")
    assert requests.get(other_file, timeout=30).status_code == 403
    theirs = tinker.RestClient(base_url=export_server.url, api_key=BOB)
    with pytest.raises(tinker.NotFoundError):
        theirs.get_external_weights_urls(saved.path).result()
    with pytest.raises(tinker.BadRequestError, match="age_encryption_recipients"):
        tc.save_weights_external("bad", age_encryption_recipients=["age1notakey"]).result()
    with pytest.raises(tinker.BadRequestError, match="download only"):
        tc.load_state(saved.path).result()
    rest.delete_checkpoint_from_tinker_path(saved.path).result()
    assert requests.get(url, timeout=30).status_code == 404
