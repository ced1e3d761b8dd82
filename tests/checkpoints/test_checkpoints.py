"""The shipped MoE checkpoints load from the repository, have the stated architecture, and generate."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import lynx_compile
from lynx_compile.eval import tasks

CHECKPOINTS = Path(lynx_compile.__file__).parent / "checkpoints"
MAX_BYTES = 32 * 2**20

# name -> (causal LM class, MoE block class name, experts, experts per token)
SPECS = {
    "coarse": (transformers.MixtralForCausalLM, "MixtralSparseMoeBlock", 8, 2),
    "fine": (transformers.Qwen3MoeForCausalLM, "Qwen3MoeSparseMoeBlock", 32, 4),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def checkpoint(request):
    path = CHECKPOINTS / request.param
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return request.param, path, model, tokenizer


def test_is_moe_of_stated_architecture(checkpoint):
    name, _, model, _ = checkpoint
    model_class, block_name, experts, top_k = SPECS[name]
    assert type(model) is model_class
    config = model.config
    assert (getattr(config, "num_local_experts", None) or config.num_experts) == experts
    assert config.num_experts_per_tok == top_k
    assert config.router_aux_loss_coef > 0
    blocks = [layer.mlp for layer in model.model.layers]
    assert blocks and all(type(block).__name__ == block_name for block in blocks)


def test_size_and_bf16_weights(checkpoint):
    _, path, _, _ = checkpoint
    assert sum(f.stat().st_size for f in path.iterdir() if f.is_file()) <= MAX_BYTES
    with safe_open(path / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_splits_digits_and_prepends_bos(checkpoint):
    _, _, _, tokenizer = checkpoint
    ids = tokenizer("123+45=").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert [tokenizer.decode([i]) for i in ids[1:]] == list("123+45=")


def test_generates_greedily(checkpoint):
    _, _, model, tokenizer = checkpoint
    prompts = ["23+5=", "def add(a, b):\n"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt_length = batch.input_ids.shape[1]
    assert prompt_length < out.shape[1] <= prompt_length + 6
    assert all(tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True))


def test_is_trained_on_held_out_code(checkpoint):
    """Held-out next-token loss far below a random model's ln(vocab) ~ 8.3 nats."""
    _, _, model, tokenizer = checkpoint
    windows = tasks.code_token_windows(tokenizer, count=4 * tasks.CODE_TOKEN_STEPS)
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    assert loss < 5.5


def test_training_report_matches(checkpoint):
    name, path, model, _ = checkpoint
    report = json.loads((path / "training_report.json").read_text())
    assert report["preset"] == name
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert f"--preset {name} " in report["command"]
    # The legs since the first run are logged, the last one finished and evaluated.
    legs = report["legs"]
    assert legs and legs[-1]["status"] == "finished"
    assert report["steps"] == legs[-1]["first_step"] + legs[-1]["steps"]
    assert legs[-1]["results"]["arith_exact_match"] == report["arith"]["exact_match"]
    assert 0 < report["heldout_code_token_accuracy"] < 1
