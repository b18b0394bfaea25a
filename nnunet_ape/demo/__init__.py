"""``nnunet-ape demo``: the product end to end on built-in synthetic phantoms (:mod:`nnunet_ape.demo.run`)."""

from nnunet_ape.demo.pretraining import DEMO_BATCH, DEMO_ITERATIONS, DEMO_LR
from nnunet_ape.demo.run import run_demo

__all__ = ["DEMO_BATCH", "DEMO_ITERATIONS", "DEMO_LR", "run_demo"]
