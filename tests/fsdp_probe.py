"""Run under torchrun by tests/test_distributed.py: a sharded model's weights, read whole and
put back (fsdp.ShardedWeights), from a snapshot only rank 0 holds (the best weights kept
during a run) and from weights every rank read (a resumed checkpoint).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_probe.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from peft_engine.distributed import close, world_from_env
from peft_engine.fsdp import ShardedWeights, shard_model
from peft_engine.methods import method_for


def main(model_dir: str, out: str) -> None:
    world = world_from_env()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    shard_model(model, torch.device("cpu"), world)
    weights = ShardedWeights(method_for("full").weights, world).format()
    snapshot = weights.state(model)  # whole on rank 0, {} on the others
    whole = {k: v.clone() for k, v in snapshot.items()}

    def changed() -> None:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(1.0)

    def difference() -> float:
        now = weights.state(model)
        return max((float((now[k] - whole[k]).abs().max()) for k in whole), default=0.0)

    changed()
    moved = difference()
    weights.restore(model, snapshot)  # rank 0 sends what only it holds
    from_rank0 = difference()
    everyone = {k: v.clone() for k, v in whole.items()}
    sent = [everyone]
    torch.distributed.broadcast_object_list(sent, src=0)  # now every rank holds the weights
    changed()
    weights.restore(model, sent[0])
    from_all = difference()
    if world.is_main:
        result = {"tensors": len(whole), "moved": moved, "from_rank0": from_rank0,
                  "from_all": from_all}  # fmt: skip
        with open(out, "w") as file:
            json.dump(result, file)
    close(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
