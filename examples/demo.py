"""Decode a batch with default Inductor and with backend="lynx", side by side.

    make demo        (or: python examples/demo.py --batch 16 --steps 8)

Prints, per MoE layer, the distinct experts a decode step reads before and after lynx's
selection, and the step time of each backend, measured in this run.
"""

import argparse
import statistics
import time

import torch

import lynx_compile
from small_model import small_mixtral


def decode(model, input_ids, steps):
    """Greedy decode `steps` tokens with a KV cache; returns per-step times (ms) after the first."""
    cache = None
    times = []
    tokens = input_ids
    with torch.no_grad():
        out = model(input_ids=tokens, use_cache=True)  # prefill
        cache = out.past_key_values
        tokens = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=tokens, past_key_values=cache, use_cache=True)
            times.append((time.perf_counter() - start) * 1e3)
            cache = out.past_key_values
            tokens = out.logits[:, -1:].argmax(-1)
    return times[3:]  # the first decode steps compile (static, then dynamic cache length)


def main():
    # Two backends compile the same module's code objects; give Dynamo room for both.
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    model = small_mixtral()
    prompt = torch.randint(3, model.config.vocab_size, (args.batch, 8), generator=torch.Generator().manual_seed(0))
    print(f"small Mixtral-style model (random weights): {model.config.num_hidden_layers} layers, "
          f"{model.config.num_local_experts} experts, top-{model.config.num_experts_per_tok}; "
          f"batch {args.batch}, {args.steps} decode steps, {torch.get_num_threads()} threads\n")

    baseline = torch.compile(model)
    lynx = torch.compile(model, backend="lynx")
    inductor_ms = statistics.median(decode(baseline, prompt, args.steps))
    lynx_ms = statistics.median(decode(lynx, prompt, args.steps))
    with lynx_compile.record(model) as rec:
        decode(lynx, prompt, 2)

    print("distinct experts read per decode step (mean over recorded steps):")
    print(rec.table())
    print(f"\nstep time: default Inductor {inductor_ms:.2f} ms, lynx {lynx_ms:.2f} ms "
          f"({inductor_ms / lynx_ms:.2f}x)")
    print("\nrouting sites lynx found (lynx_compile.explain):")
    print(lynx_compile.explain(model, prompt[:, :1]).table())


if __name__ == "__main__":
    main()
