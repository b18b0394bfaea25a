"""Re-export of the APE trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (the classes live in the installed
package so that nnU-Net's spawned workers can pickle them)."""

from nnunet_ape.nnunet.trainers import *  # noqa: F401,F403
from nnunet_ape.nnunet.pretrain_trainer import *  # noqa: F401,F403,E402
from nnunet_ape.nnunet.demo_trainer import *  # noqa: F401,F403,E402
from nnunet_ape.nnunet.finetune_trainer import *  # noqa: F401,F403,E402
