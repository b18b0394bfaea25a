"""Checkpoints that nnssl and nnU-Net's nnssl fine-tuning path read, and encoder-only transfer from nnssl's.

- ``nnUNetTrainerAPEPretrain.save_checkpoint`` writes nnssl's ``nnssl_adaptation_plan`` (and ``adaptation_plan.json``
  beside the checkpoint), loadable with ``torch.load(weights_only=True)``; the keys it names are in the weights with
  the shapes its architecture implies (tiny networks built directly, no nnU-Net planning).
- Their reading code, where the fetched repositories are present (``git show`` from the mirrors of MIC-DKFZ/nnUNet
  and MIC-DKFZ/nnssl; skipped otherwise), executed from its source text: nnU-Net main's
  ``PretrainedTrainer.build_network_architecture`` and ``load_pretrained_weights``, nnssl's ``AdaptationPlan.from_dict``
  and ``AbstractBaseTrainer.verify_adaptation_plans``.
- ``-pretrained_weights`` with encoder-only transfer (``load_pretrained_encoder``) from a checkpoint in nnssl's
  format, compared with nnU-Net main's loader.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from test_nnunet_pretrain_trainer import _tiny_plans

MIRRORS = Path(os.environ.get("NNUNET_APE_MIRRORS", "/work/.mirror"))
NNSSL_FIELDS = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
                "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"}  # nnssl's AdaptationPlan
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "body": 1}, "numTraining": 2,
                "file_ending": ".nii.gz"}


def _mirror_file(repo: str, path: str) -> str:
    """The text of ``path`` at HEAD of the fetched ``repo`` (``owner+name`` under ``MIRRORS``); skips the test when
    the mirror is not there."""
    git_dir = MIRRORS / repo / "repo"
    if not git_dir.is_dir():
        pytest.skip(f"{repo} is not fetched at {git_dir} (set NNUNET_APE_MIRRORS)")
    done = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{path}"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{repo}: {path} not found ({done.stderr.strip()})")
    return done.stdout


def _function(source: str, qualified: str, namespace: dict):
    """Function ``qualified`` (``Class.method`` or ``function``) of module ``source``, executed from its source text
    (decorators dropped) in ``namespace``."""
    tree = ast.parse(source)
    *classes, name = qualified.split(".")
    body = tree.body
    for cls in classes:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    exec(textwrap.dedent("\n".join(lines)), namespace)
    return namespace[name]


def _module_without(source: str, prefixes: tuple[str, ...], names: dict, module: str, monkeypatch) -> dict:
    """``source`` executed as module ``module`` (in ``sys.modules`` for the test: dataclasses look their module up)
    with ``names`` predefined and its import lines that start with one of ``prefixes`` dropped; returns its names."""
    kept = [line for line in source.splitlines() if not line.startswith(prefixes)]
    namespace = types.ModuleType(module)
    namespace.__dict__.update(names)
    monkeypatch.setitem(sys.modules, module, namespace)
    exec("\n".join(kept), namespace.__dict__)
    return namespace.__dict__


def _pretraining_checkpoint(architecture: str, folder: Path, seed: int = 0) -> Path:
    """``nnUNetTrainerAPEPretrain.save_checkpoint`` of a tiny network of ``architecture`` after one optimizer step,
    nnU-Net's logger holding numpy scalars as nnU-Net logs them; returns the checkpoint's path."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ape.nnunet.pretrain_trainer import nnUNetTrainerAPEPretrain

    plans = {**_tiny_plans(architecture, [16, 16, 16]), "foreground_intensity_properties_per_channel": {
        "0": {"mean": 40.0, "std": 120.0, "percentile_00_5": -1000.0, "percentile_99_5": 1500.0}}}
    manager = PlansManager(plans)
    torch.manual_seed(seed)
    network = nnUNetTrainerAPEPretrain.build_network_architecture(manager, manager.get_configuration("3d_fullres"), 1, 3, False)
    trainer = nnUNetTrainerAPEPretrain.__new__(nnUNetTrainerAPEPretrain)
    trainer.network, trainer.is_ddp, trainer.local_rank, trainer.disable_checkpointing = network, False, 0, False
    trainer.optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], 1e-2, momentum=0.99, nesterov=True)
    network(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    trainer.optimizer.step()
    trainer.grad_scaler, trainer.logger = None, MetaLogger(str(folder), False)
    for key, value in (("train_losses", np.float32(2.5)), ("val_losses", np.float64(2.0)), ("lrs", 0.01),
                       ("epoch_start_timestamps", 1.0), ("epoch_end_timestamps", 2.0)):
        trainer.logger.log(key, value, 0)
    trainer._best_val_loss, trainer.current_epoch, trainer.inference_allowed_mirroring_axes = 2.0, 0, None
    trainer.my_init_kwargs = {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": DATASET_JSON,
                              "device": torch.device("cpu")}
    trainer.plans_manager, trainer.configuration_name, trainer.num_input_channels = manager, "3d_fullres", 1
    trainer.variant, trainer.patient_axes = "equiv", [(2, False), (1, True), (0, False)]
    path = folder / "checkpoint_final.pth"
    trainer.save_checkpoint(str(path))
    return path


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_pretraining_checkpoint_holds_nnssls_adaptation_plan_and_loads_weights_only(architecture, tmp_path):
    """The checkpoint loads with weights_only=True (nnU-Net's nnssl path loads it so); its nnssl_adaptation_plan has
    nnssl's fields, equals adaptation_plan.json beside it, holds the plans' spacing, normalization and patch size, and
    the network its architecture kwargs build has, under key_to_encoder and key_to_stem, exactly the saved weights'
    names and shapes; the input projection reads one channel."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    import nnunet_ape.nnunet  # noqa: F401  (registers the reader of these checkpoints)
    from nnunet_ape.checkpoint import load_ape_model

    path = _pretraining_checkpoint(architecture, tmp_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    assert set(plan) == NNSSL_FIELDS
    assert json.loads((tmp_path / "adaptation_plan.json").read_text()) == plan
    model, settings = load_ape_model(path)  # still an APE model for embed and localize
    assert settings["format"] == "nnunet-ape/ape-nnunet-v1" and settings["embed"]["patch_size"] == [16, 16, 16]
    assert isinstance(checkpoint["logging"]["train_losses"][0], float)

    configuration = _tiny_plans(architecture, [16, 16, 16])["configurations"]["3d_fullres"]
    (name, pretrain_configuration), = plan["pretrain_plan"]["configurations"].items()
    assert name == "3d_fullres" and pretrain_configuration["spacing"] == configuration["spacing"]
    assert pretrain_configuration["normalization_schemes"] == ["CTNormalization"]
    assert plan["pretrain_num_input_channels"] == 1 and plan["recommended_downstream_patchsize"] == [16, 16, 16]
    assert plan["architecture_plans"]["arch_class_name"] == architecture  # bare, as nnssl writes it
    assert plan["key_to_lpe"] is None

    arch = plan["architecture_plans"]
    rebuilt = get_network_from_plans(arch["arch_class_name"], arch["arch_kwargs"], arch["arch_kwargs_requiring_import"],
                                     plan["pretrain_num_input_channels"], 2, deep_supervision=False)
    expected = {k: v.shape for k, v in rebuilt.state_dict().items()
                if k.startswith((plan["key_to_encoder"] + ".", plan["key_to_stem"] + "."))}
    saved = checkpoint["network_weights"]
    found = {k: v.shape for k, v in saved.items() if k.startswith((plan["key_to_encoder"] + ".", plan["key_to_stem"] + "."))}
    assert expected and found == expected
    kernel = arch["arch_kwargs"]["kernel_sizes"][0]
    for key in plan["keys_to_in_proj"]:
        assert saved[key + ".weight"].shape == (arch["arch_kwargs"]["features_per_stage"][0], 1, *kernel)


def _nnunet_main_loader() -> tuple:
    """nnU-Net main's ``PretrainedTrainer.build_network_architecture`` and ``load_pretrained_weights``, executed from
    the fetched source (installed nnU-Net 2.8.1's get_network_from_plans, as main imports it)."""
    from typing import List, Tuple, Union

    from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    source = _mirror_file("MIC-DKFZ+nnUNet", "nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py")

    def not_for_cnns(*args, **kwargs):
        raise AssertionError("only for transformer checkpoints (positional embeddings, cls tokens)")

    namespace = {"torch": torch, "nn": torch.nn, "Union": Union, "List": List, "Tuple": Tuple,
                 "AbstractDynamicNetworkArchitectures": AbstractDynamicNetworkArchitectures,
                 "get_network_from_plans": get_network_from_plans, "get_network_from_name": not_for_cnns,
                 "handle_pos_embed_resize": not_for_cnns, "filter_state_dict": not_for_cnns}
    build = _function(source, "PretrainedTrainer.build_network_architecture", namespace)
    load = _function(source, "PretrainedTrainer.load_pretrained_weights", namespace)
    return build, load


def _finetune_with_nnunet_main(path: Path, channels: int, seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(fresh network, network with the checkpoint loaded) as nnU-Net main fine-tunes from ``path`` on ``channels``
    input channels: ``preprocess_like_nnssl``'s renaming of architecture_plans into the plans' architecture, then
    PretrainedTrainer's network and weight loading with the plans' pretrain_info."""
    import copy

    build, load = _nnunet_main_loader()
    plan = torch.load(path, weights_only=True, map_location="cpu")["nnssl_adaptation_plan"]
    architecture = dict(plan["architecture_plans"])  # like_nnssl.preprocess_like_nnssl
    architecture["network_class_name"] = architecture.pop("arch_class_name")
    architecture["_kw_requires_import"] = architecture.pop("arch_kwargs_requiring_import")
    config = next(iter(plan["pretrain_plan"]["configurations"]))
    torch.manual_seed(seed)
    network = build(architecture_class_name=architecture["network_class_name"], arch_init_kwargs=architecture["arch_kwargs"],
                    arch_init_kwargs_req_import=architecture["_kw_requires_import"],
                    input_patch_size=plan["recommended_downstream_patchsize"], num_input_channels=channels,
                    num_output_channels=4, enable_deep_supervision=False)
    fresh = copy.deepcopy(network)
    network, _ = load(network, str(path), pt_input_channels=plan["pretrain_num_input_channels"],
                      downstream_input_channels=channels,
                      pt_input_patchsize=plan["pretrain_plan"]["configurations"][config]["patch_size"],
                      downstream_input_patchsize=plan["recommended_downstream_patchsize"],
                      pt_key_to_encoder=plan["key_to_encoder"], pt_key_to_stem=plan["key_to_stem"],
                      pt_keys_to_in_proj=tuple(plan["keys_to_in_proj"]), pt_key_to_lpe=plan["key_to_lpe"])
    return fresh, network


@pytest.mark.parametrize("architecture,channels", [("PlainConvUNet", 1), ("ResidualEncoderUNet", 1), ("ResidualEncoderUNet", 2)])
def test_nnunet_mains_nnssl_finetuning_loads_our_checkpoint(architecture, channels, tmp_path):
    """nnU-Net main's fine-tuning code, run from its source, builds the network our plan describes and loads our
    checkpoint: its encoder and stem are the pretrained ones (the 1-channel stem repeated over 2 channels and
    halved), its decoder and head stay as initialised."""
    path = _pretraining_checkpoint(architecture, tmp_path)
    saved = torch.load(path, weights_only=True)["network_weights"]
    plan = torch.load(path, weights_only=True)["nnssl_adaptation_plan"]
    fresh, network = _finetune_with_nnunet_main(path, channels)
    loaded, before = network.state_dict(), fresh.state_dict()
    in_proj = {k + ".weight" for k in plan["keys_to_in_proj"]}
    encoder = [k for k in loaded if k.startswith((plan["key_to_encoder"] + ".", plan["key_to_stem"] + "."))]
    assert len(encoder) > 10
    for key in encoder:
        expected = saved[key].repeat(1, channels, 1, 1, 1) / channels if key in in_proj else saved[key]
        assert torch.allclose(loaded[key], expected), key
    decoder = [k for k in loaded if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder and all(torch.equal(loaded[k], before[k]) for k in decoder)


def _nnssl_reader(monkeypatch) -> dict:
    """nnssl's ``AdaptationPlan`` (with ``Plan``) and ``AbstractBaseTrainer.verify_adaptation_plans`` (with
    ``_test_load_weight`` and nnssl's ``get_network_from_plans``), executed from the fetched source with nnssl's own
    imports replaced by the executed modules."""
    from copy import deepcopy
    from dataclasses import asdict
    from typing import get_args

    def file(path: str) -> str:
        return _mirror_file("MIC-DKFZ+nnssl", f"src/nnssl/{path}")

    drop = ("from nnssl.", "import nnssl")
    finder = _module_without(file("utilities/find_class_by_name.py"), drop, {}, "_nnssl_find_class", monkeypatch)
    networks = _module_without(file("architectures/get_network_from_plan.py"), drop,
                               {"recursive_find_python_class": finder["recursive_find_python_class"]},
                               "_nnssl_get_network", monkeypatch)
    plan_module = _module_without(file("experiment_planning/experiment_planners/plan.py"), drop,
                                  {"recursive_fix_for_json_export": None, "recursive_find_reader_writer_by_name": None},
                                  "_nnssl_plan", monkeypatch)
    adaptation = _module_without(file("adaptation_planning/adaptation_plan.py"), drop,
                                 {"Plan": plan_module["Plan"], "ConfigurationPlan": plan_module["ConfigurationPlan"],
                                  "get_network_from_plans": networks["get_network_from_plans"]},
                                 "_nnssl_adaptation_plan", monkeypatch)
    trainer_source = file("training/nnsslTrainer/AbstractTrainer.py")

    def not_for_dynamic(*args, **kwargs):
        raise AssertionError("only for nnssl's named presets")

    namespace = {"torch": torch, "deepcopy": deepcopy, "asdict": asdict, "get_args": get_args,
                 "AdaptationPlan": adaptation["AdaptationPlan"], "DYN_ARCHITECTURE_PRESETS": adaptation["DYN_ARCHITECTURE_PRESETS"],
                 "get_network_from_plans": networks["get_network_from_plans"], "get_network_by_name": not_for_dynamic,
                 "AbstractDynamicNetworkArchitectures": torch.nn.Module}
    test_load = _function(trainer_source, "AbstractBaseTrainer._test_load_weight", namespace)
    namespace["AbstractBaseTrainer"] = types.SimpleNamespace(_test_load_weight=test_load)
    verify = _function(trainer_source, "AbstractBaseTrainer.verify_adaptation_plans", namespace)
    return {"AdaptationPlan": adaptation["AdaptationPlan"], "verify_adaptation_plans": verify}


def test_nnssl_reads_our_resenc_plan_and_cannot_hold_plainconvunet_kwargs(tmp_path, monkeypatch):
    """nnssl's own reader, run from its source: AdaptationPlan.from_dict takes our ResEnc plan and serializes it
    back to the same dict, and verify_adaptation_plans (the check nnssl runs before pretraining) rebuilds the network
    and loads our encoder and stem into it. A PlainConvUNet plan (nnU-Net's default plans) it cannot hold: nnssl's
    DynamicArchitecturePlans has ResEnc's n_blocks_per_stage, not n_conv_per_stage."""
    nnssl = _nnssl_reader(monkeypatch)
    checkpoint = torch.load(_pretraining_checkpoint("ResidualEncoderUNet", tmp_path / "resenc"), weights_only=True)
    plan = checkpoint["nnssl_adaptation_plan"]
    parsed = nnssl["AdaptationPlan"].from_dict(json.loads(json.dumps(plan)))
    assert json.loads(json.dumps(parsed.serialize())) == plan
    nnssl["verify_adaptation_plans"](plan, "3d_fullres", checkpoint["network_weights"])

    plain = torch.load(_pretraining_checkpoint("PlainConvUNet", tmp_path / "plain"), weights_only=True)["nnssl_adaptation_plan"]
    with pytest.raises(TypeError, match="n_conv_per_stage"):
        nnssl["AdaptationPlan"].from_dict(plain)


def _nnssl_encoder_checkpoint(path: Path) -> dict:
    """A checkpoint as nnssl writes one for an encoder-only pretraining (contrastive methods: nnssl's
    get_network_by_name strips ``encoder.`` from the keys): a tiny ResEnc's encoder weights under ``stem.``/``stages.``
    plus a projection head, and the adaptation plan naming them (ResEnc, 1 input channel). Returns the weights."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = _tiny_plans("ResidualEncoderUNet", [16, 16, 16])["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(5)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                     deep_supervision=False)
    weights = {**network.encoder.state_dict(), "projector.0.weight": torch.randn(8, 8), "projector.0.bias": torch.randn(8)}
    plan = {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch["arch_kwargs"],
                                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
            "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans", "configurations": {
                "onemmiso": {"spacing": [1, 1, 1], "patch_size": [16, 16, 16], "normalization_schemes": ["ZScoreNormalization"]}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": (16, 16, 16),
            "key_to_encoder": "stages", "key_to_stem": "stem", "keys_to_in_proj": ("stem.convs.0.conv", "stem.convs.0.all_modules.0"),
            "key_to_lpe": None}
    torch.save({"network_weights": weights, "nnssl_adaptation_plan": plan, "current_epoch": 1000,
                "trainer_name": "SimCLRTrainer"}, path)
    return weights


@pytest.mark.parametrize("channels", [1, 3])
def test_encoder_only_transfer_from_an_nnssl_checkpoint(channels, tmp_path):
    """load_pretrained_encoder takes what the plan names (stem., stages.) into the network's encoder.stem and
    encoder.stages, the 1-channel input projection repeated over the channels and divided by their number, leaves
    the decoder and heads as initialised and ignores the projection head."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunet_ape.nnunet.pretrained_weights import load_pretrained_encoder

    weights = _nnssl_encoder_checkpoint(tmp_path / "nnssl.pth")
    arch = _tiny_plans("ResidualEncoderUNet", [16, 16, 16])["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(9)
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                     channels, 4, deep_supervision=True)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    repeated = load_pretrained_encoder(network, str(tmp_path / "nnssl.pth"))
    after = network.state_dict()
    in_proj = ["encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight"]
    assert repeated == ([] if channels == 1 else [k for k in after if k in in_proj])
    for key, value in weights.items():
        if key.startswith("projector."):
            continue
        mine = after["encoder." + key]
        expected = value.repeat(1, channels, 1, 1, 1) / channels if "encoder." + key in in_proj else value
        assert torch.allclose(mine, expected), key
        assert torch.equal(after["decoder.encoder." + key], mine)  # the decoder's view of the encoder follows
    decoder = [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert decoder and all(torch.equal(after[k], before[k]) for k in decoder)


def test_encoder_only_transfer_equals_nnunet_mains_and_handles_a_stem_inside_the_encoder(tmp_path):
    """From our ResEnc pretraining checkpoint into 2 channels, load_pretrained_encoder gives exactly the weights that
    nnU-Net main's loader gives. For PlainConvUNet (its stem lies inside encoder.stages) ours repeats the stem over 4
    channels, where nnU-Net main's loader stops: it loads the whole encoder, 1-channel stem included, strictly."""
    from nnunet_ape.nnunet.pretrained_weights import load_pretrained_encoder

    path = _pretraining_checkpoint("ResidualEncoderUNet", tmp_path / "resenc")
    fresh, theirs = _finetune_with_nnunet_main(path, 2)
    repeated = load_pretrained_encoder(fresh, str(path))
    assert repeated and all(torch.equal(v, theirs.state_dict()[k]) for k, v in fresh.state_dict().items())

    path = _pretraining_checkpoint("PlainConvUNet", tmp_path / "plain")
    with pytest.raises(RuntimeError, match="size mismatch"):
        _finetune_with_nnunet_main(path, 4)
    saved = torch.load(path, weights_only=True)["network_weights"]
    network = _plain_network(4)
    repeated = load_pretrained_encoder(network, str(path))
    first = "encoder.stages.0.0.convs.0.conv.weight"
    assert first in repeated and torch.allclose(network.state_dict()[first], saved[first].repeat(1, 4, 1, 1, 1) / 4)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in saved.items()
               if k.startswith("encoder.stages.") and k not in repeated)


def _plain_network(channels: int) -> torch.nn.Module:
    """The tiny PlainConvUNet of ``_tiny_plans`` on ``channels`` input channels, 4 outputs."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = _tiny_plans("PlainConvUNet", [16, 16, 16])["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], channels, 4,
                                  deep_supervision=False)


def test_encoder_only_transfer_refuses_another_architecture(tmp_path):
    """A checkpoint whose encoder is not the network's stops with the weight named (no silent partial load)."""
    from nnunet_ape.nnunet.pretrained_weights import load_pretrained_encoder

    _nnssl_encoder_checkpoint(tmp_path / "resenc.pth")
    with pytest.raises(RuntimeError, match="has no place|lacks|shape"):
        load_pretrained_encoder(_plain_network(1), str(tmp_path / "resenc.pth"))


def test_encoder_init_trainers_install_the_encoder_loader_in_nnunets_run_training(tmp_path, monkeypatch):
    """nnU-Net's run_training.maybe_load_checkpoint (nnUNetv2_train -pretrained_weights) after
    nnUNetTrainerEncoderInit's and an _encoderInit variant's initialize loads only the encoder; the plain APE trainer
    keeps the transfer of all weights."""
    import nnunetv2.run.run_training as run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ape.nnunet import pretrained_weights, trainers

    monkeypatch.setattr(run_training, "load_pretrained_weights", run_training.load_pretrained_weights)  # restored after
    monkeypatch.setattr(nnUNetTrainer, "initialize", lambda self: setattr(self, "was_initialized", True))
    path = _pretraining_checkpoint("PlainConvUNet", tmp_path)
    for cls, loader in ((trainers.nnUNetTrainerEncoderInit, pretrained_weights.load_pretrained_encoder),
                        (trainers.nnUNetTrainerAPEChannels_encoderInit, pretrained_weights.load_pretrained_encoder),
                        (trainers.nnUNetTrainerAPEChannels, pretrained_weights.load_pretrained_weights_adding_channels)):
        trainer = cls.__new__(cls)
        trainer.was_initialized, trainer.network = False, _plain_network(1)
        before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        run_training.maybe_load_checkpoint(trainer, False, False, str(path))
        assert run_training.load_pretrained_weights is loader, cls.__name__
        after = trainer.network.state_dict()
        decoder_kept = all(torch.equal(after[k], before[k]) for k in after if k.startswith("decoder.stages."))
        assert decoder_kept == (loader is pretrained_weights.load_pretrained_encoder), cls.__name__
