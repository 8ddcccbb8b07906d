#!/usr/bin/env python3
"""Writes crates/model/assets/fused_adamw.pt: a TorchScript module whose forward is PyTorch's
fused multi-tensor AdamW kernel (`torch._fused_adamw_`, CPU and CUDA), which tch does not bind.
loraloom embeds the file and calls it through `tch::CModule`, so one optimizer step over many
runs is one kernel per hyperparameter group that reads and writes each weight, gradient and
moment once, instead of ~30 elementwise passes through temporaries. The module holds no
tensors, only this code; regenerate it with `.venv/bin/python scripts/make_fused_adamw.py`
(any PyTorch from 2.4 on; a file written by 2.13 loads in 2.11).
"""
import pathlib
import warnings
from typing import List

import torch


class FusedAdamW(torch.nn.Module):
    def forward(
        self,
        params: List[torch.Tensor],
        grads: List[torch.Tensor],
        exp_avgs: List[torch.Tensor],
        exp_avg_sqs: List[torch.Tensor],
        state_steps: List[torch.Tensor],
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        eps: float,
    ) -> None:
        # state_steps already hold the step being taken (torch.optim increments them first).
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            state_steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            amsgrad=False,
            maximize=False,
        )


def main() -> None:
    out = pathlib.Path(__file__).resolve().parent.parent / "crates/model/assets/fused_adamw.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        module = torch.jit.script(FusedAdamW())
    module.save(str(out))
    print(f"wrote {out} ({out.stat().st_size} bytes, torch {torch.__version__})")


if __name__ == "__main__":
    main()
