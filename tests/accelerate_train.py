"""Run by test_distributed under `accelerate launch`: an injected model trains with Accelerator.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/accelerate_train.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

import lorakit as lk


def main(model_dir: str, out: str) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lk.inject(model, lk.LoRAConfig(method="lora_fa", rank=4, targets=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(acc.process_index)
    for _ in range(3):
        ids = torch.randint(0, 100, (2, 16), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    acc.wait_for_everyone()
    if acc.is_main_process:
        lk.save_adapter(acc.unwrap_model(model), out)
    print(f"rank {acc.process_index} of {acc.num_processes} done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
