"""The benchmarks' ``compile`` setting: nnU-Net 2.8 never compiles on CPU; with the setting the benchmark trainers
do, and keep the network's weights channels-last there (measured faster on this CPU: docs/pretraining.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import resumable_training as rt  # noqa: E402

from nnunet_ape.nnunet.pretrained_weights import unwrapped_network  # noqa: E402


class _Trainer:
    """What the mixin's compile hooks use of nnU-Net's trainer: its CPU gate and an initialize that builds the
    network, compiles it when asked, and gives the optimizer its parameters."""

    device = torch.device("cpu")

    def _do_i_compile(self) -> bool:
        return False  # nnU-Net 2.8.1 on CPU

    def initialize(self) -> None:
        self.network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
        if self._do_i_compile():
            self.network = torch.compile(self.network)
        self.optimizer = torch.optim.SGD(self.network.parameters(), 0.01)


class _Bench(rt.ResumableTraining, _Trainer):
    def __init__(self, compile_: bool | None):
        self.bench = {} if compile_ is None else {"compile": compile_}


def _weights(trainer: _Bench) -> torch.Tensor:
    return unwrapped_network(trainer.network)[0].weight


def test_the_compile_setting_compiles_on_cpu_with_channels_last_weights_the_optimizer_still_holds():
    trainer = _Bench(True)
    trainer.initialize()
    assert trainer._do_i_compile()
    assert isinstance(trainer.network, torch._dynamo.eval_frame.OptimizedModule)
    weight = _weights(trainer)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert any(p is weight for p in trainer.optimizer.param_groups[0]["params"])  # converted in place


def test_without_the_setting_nnunets_choice_stands():
    for setting in (None, False):
        trainer = _Bench(setting)
        trainer.initialize()
        assert not trainer._do_i_compile()
        assert isinstance(trainer.network, torch.nn.Sequential) and _weights(trainer).is_contiguous()
