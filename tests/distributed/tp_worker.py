"""One rank of the 2-rank tensor-parallel check (run by tests/distributed/test_tensor_parallel.py
through `torch.distributed.run`, gloo on CPU).

Loads the saved tiny MoE with transformers' `tp_plan="auto"` (attention and experts sharded over
the ranks, the router replicated), compiles it with lynx, decodes a few steps of a batch, and
writes what the test compares: per variant the last step's logits and `record()`'s per-site
experts. Every rank writes its own JSON.
"""

import json
import sys

import torch
import torch.distributed as dist
import transformers

import lynx_compile


def decode(model, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decode with a KV cache: the logits (B, V) of each decode step."""
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        out = []
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits.float())
    return out


def main(model_dir: str, out_stem: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (16, 4), generator=torch.Generator().manual_seed(0))
    result = {}
    for variant, options in (("eager", None), ("none", {"policy": "none"}), ("default", {})):
        torch._dynamo.reset()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto",
                                                                  dtype=torch.float32).eval()
        if options is not None:
            model.compile(backend="lynx", options=options)
        with lynx_compile.record(model) as recorder:
            steps = decode(model, ids, 3)
        weight = model.model.layers[0].mlp.experts.gate_up_proj
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        result[variant] = {"logits": [s.tolist() for s in steps], "gate_up_local_shape": list(local.shape),
                           "experts": {site: [s["experts_before"], s["experts_after"]]
                                       for site, s in recorder.summary().items()}}
    rank = dist.get_rank()
    with open(f"{out_stem}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
