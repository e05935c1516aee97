"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): one training step on a LoRA classifier
sharded with torch's FSDP2 (`fully_shard`, each GPT-2 block its own unit), the adapter then saved the way lora_ft
saves it (`training.gathered_state` + `adapters.save_adapter`). Beside it, the same step taken by an unsharded copy
on the whole batch, saved plainly: the two folders must hold the same adapter.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py TINY_GPT2 OUTPUT
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lora_ft.engine import adapters, training


def step(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=input_ids, labels=labels).loss.backward()
    optimizer.step()


def main(base: Path, output: Path) -> None:
    accelerator = Accelerator(cpu=True)  # sets up gloo; accelerate itself does not shard on CPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same weights and batch in every process
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.config.pad_token_id = model.config.eos_token_id
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    model = get_peft_model(model, lora)
    plain = copy.deepcopy(model)
    input_ids, labels = torch.randint(0, 1000, (4, 12)), torch.tensor([0, 1, 1, 0])

    for block in model.base_model.model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "not sharded"
    half = len(labels) // world  # FSDP averages the processes' gradients, as one step on the whole batch would
    step(model, input_ids[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half])
    state = training.gathered_state(model, accelerator)  # every process takes part
    tokenizer = AutoTokenizer.from_pretrained(base)
    if rank == 0:
        adapters.save_adapter(model, tokenizer, output / "sharded", state)
        step(plain, input_ids, labels)
        adapters.save_adapter(plain, tokenizer, output / "plain")
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
