"""One rank of the 2-rank tensor- and expert-parallel checks (run by
tests/distributed/test_parallel.py through one `torch.distributed.run` launch, gloo on CPU).

Loads the saved tiny MoE twice: tensor parallel (attention sharded over the ranks, the router
replicated, and the experts sharded too where the installed transformers still has its
`moe_tp_experts` style: 5.24 put them in Mixtral's "auto" plan, 5.25 took them out and deprecated
the style for removal in 5.28, so they are asked for by name), and with `ep_size=2` on top (each rank holds 4 of
the 8 whole experts; transformers' AllReduceEP maps global ids to local ones and all-reduces the
partial outputs). For each, compiles with lynx, decodes a few steps of a batch, and writes what
the tests compare: per variant the steps' logits, `record()`'s per-site experts (and per-rank
view) and the lynx log's per-site decisions; under EP also whether a step gives the same logits
with the rank's unselected experts poisoned. Every rank writes its own JSON.
"""

import copy
import json
import logging
import sys

import torch
import torch.distributed as dist
import transformers
from transformers.distributed import DistributedConfig

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


def local_experts_read(model, ids: torch.Tensor) -> dict:
    """One decode step under `record()`, then the same step again with every expert of this rank
    that selection left unused poisoned with NaN: equal, finite logits show the rank read only the
    experts selected for it. Returns {"equal": bool, "poisoned": experts poisoned per layer}."""
    rank, layers = dist.get_rank(), model.model.layers
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        again = copy.deepcopy(cache)
        with lynx_compile.record(model) as recorder:
            expected = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        saved, poisoned = [], []
        for index, layer in enumerate(layers):
            experts = layer.mlp.experts
            local = experts.gate_up_proj.to_local() if hasattr(experts.gate_up_proj, "to_local") else experts.gate_up_proj
            per_rank = local.shape[0]
            chosen = recorder.calls[f"model.layers.{index}.mlp.gate"][-1].ids_after
            unused = [e for e in range(per_rank) if rank * per_rank + e not in chosen]
            for param in (experts.gate_up_proj, experts.down_proj):
                data = param.to_local() if hasattr(param, "to_local") else param.data
                saved.append((data, data.clone()))
                data[unused] = float("nan")
            poisoned.append(len(unused))
        got = model(input_ids=token, past_key_values=again, use_cache=True).logits[:, -1]
        for data, original in saved:
            data.copy_(original)
    return {"equal": bool(torch.isfinite(got).all() and torch.equal(got, expected)), "poisoned": poisoned}


class Decisions(logging.Handler):
    """The lynx log's per-site lines ("lynx site NAME: routing=...; dispatch=...; ...")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# Mixtral's experts under tensor parallelism: gate/up rows and down columns halved per rank.
EXPERT_TP_RULES = {"model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
                   "model.layers.*.mlp.experts.down_proj": "rowwise",
                   "model.layers.*.mlp.experts": "moe_tp_experts"}


def experts_tp_available() -> bool:
    """Whether the installed transformers can still shard experts by tensor parallelism."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

    return "moe_tp_experts" in ALL_PARALLEL_STYLES


def layouts() -> dict[str, dict]:
    """Variant-name prefix -> from_pretrained's sharding arguments (built under torchrun only:
    DistributedConfig checks the world size). The plan's dictionary adds to the model's own
    ("auto") rules."""
    tp_plan = EXPERT_TP_RULES if experts_tp_available() else "auto"
    return {"": {"distributed_config": DistributedConfig(tp_plan=tp_plan)},
            "ep_": {"distributed_config": DistributedConfig(tp_plan="auto", ep_size=2)}}


def main(model_dir: str, out_stem: str) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 60, (16, 4), generator=torch.Generator().manual_seed(0))
    torch._logging.set_logs(modules={"lynx": logging.INFO})
    decisions = Decisions()
    logging.getLogger("lynx_compile").addHandler(decisions)
    result = {}
    for prefix, layout in layouts().items():
        for variant, options in (("eager", None), ("none", {"policy": "none"}), ("default", {})):
            torch._dynamo.reset()
            decisions.lines.clear()
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **layout).eval()
            if options is not None:
                model.compile(backend="lynx", options=options)
            with lynx_compile.record(model) as recorder:
                steps = decode(model, ids, 3)
            weight = model.model.layers[0].mlp.experts.gate_up_proj
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            result[prefix + variant] = {
                "logits": [s.tolist() for s in steps], "gate_up_local_shape": list(local.shape),
                "experts_tp": experts_tp_available(),
                "experts": {site: [s["experts_before"], s["experts_after"]] for site, s in recorder.summary().items()},
                "per_rank": recorder.per_rank(dist.get_world_size()), "decisions": list(decisions.lines)}
            if prefix == "ep_" and variant == "default":
                result[prefix + variant]["local_reads"] = local_experts_read(model, ids)
    rank = dist.get_rank()
    with open(f"{out_stem}.rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
