"""The ArcFace recipe's parts, each guarding against one of the reference notebook's defects
or checking an option against the library it builds on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses
from torchvision.transforms import v2

from whale_ml.stage_configs import TrainConfig
from whale_ml.data.images import eval_transform, load_rgb, train_transform
from whale_ml.models.embedding import IMAGENET_MEAN, create_embedding_model, normalisation
from whale_ml.retrieval.embeddings import autocast_for, native_cpu_bf16
from whale_ml.training.losses import DynamicMarginArcFaceLoss, DynamicMarginSubCenterArcFaceLoss, create_loss, dynamic_margins
from whale_ml.training.trainer import create_optimizer, create_scheduler, load_checkpoint, train_fold

QUIET = {"log": lambda _m: None}


# ---------------------------------------------------------------- dynamic margins


def test_dynamic_margin_formula() -> None:
    m = dynamic_margins([1, 10, 100, 0], a=0.271, b=0.364, c=0.05)
    assert m[0] == pytest.approx(0.321)
    assert m[2] == pytest.approx(0.271 * 100**-0.364 + 0.05)
    assert m[0] > m[1] > m[2] > 0.05  # rare individuals get the larger margin
    assert m[3] == m[0]  # no photos counts as one


@pytest.mark.parametrize("sub_centers", [1, 2])
def test_dynamic_margin_loss_is_the_library_loss_with_each_samples_margin(sub_centers: int) -> None:
    """Per-class margins reproduce pytorch-metric-learning's own loss, sample by sample."""
    torch.manual_seed(0)
    margins = np.array([0.1, 0.3, 0.5])
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    if sub_centers == 1:
        dyn = DynamicMarginArcFaceLoss(margins, embedding_size=8, scale=20.0)
    else:
        dyn = DynamicMarginSubCenterArcFaceLoss(margins, embedding_size=8, scale=20.0, sub_centers=sub_centers)
    per_sample = []
    for i in range(len(labels)):
        kw = {"num_classes": 3, "embedding_size": 8, "margin": math.degrees(margins[labels[i]]), "scale": 20.0}
        ref = losses.ArcFaceLoss(**kw) if sub_centers == 1 else losses.SubCenterArcFaceLoss(**kw, sub_centers=sub_centers)
        ref.W.data.copy_(dyn.W.data)
        per_sample.append(ref(emb[i : i + 1], labels[i : i + 1]))
    assert dyn(emb, labels).item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)
    # Gradients reach the class centres through the per-class margins as usual.
    emb.requires_grad_(True)
    dyn(emb, labels).backward()
    assert dyn.W.grad is not None and emb.grad is not None and torch.isfinite(emb.grad).all()


def test_create_loss_dynamic_needs_counts_and_sizes_margins_by_them(tiny_config) -> None:
    cfg = tiny_config(dynamic_margin=True)
    with pytest.raises(ValueError, match="one photo count per class"):
        create_loss(cfg, num_classes=3)
    loss = create_loss(cfg, num_classes=3, class_counts=[1, 4, 50])
    assert loss.class_margins.tolist() == pytest.approx(dynamic_margins([1, 4, 50], 0.271, 0.364, 0.05).tolist(), rel=1e-6)
    assert "class_margins" in loss.state_dict()


# ---------------------------------------------------------------- schedules, precision, heads


def test_onecycle_is_sized_in_optimiser_steps(tiny_config) -> None:
    cfg = tiny_config(epochs=3, schedule="onecycle", warmup_epochs=1.0)
    model = create_embedding_model(cfg)
    opt = create_optimizer(cfg, model, create_loss(cfg, 3))
    sched = create_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(15):  # exactly epochs x steps: one more would raise in OneCycleLR
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[1]["lr"])
    assert max(lrs) == pytest.approx(cfg.lr_head, rel=1e-3)  # the head group peaks at its own rate
    assert lrs[-2] < cfg.lr_head / 1000  # the rate of the last optimiser step: the cycle's floor
    assert int(np.argmax(lrs)) in (3, 4)  # the peak after the one-epoch rise


@pytest.mark.parametrize(
    ("precision", "device", "dtype", "scaler"),
    [
        ("auto", "cpu", None, False),
        ("fp32", "cuda", None, False),
        ("bf16", "cpu", torch.bfloat16, False),
        ("fp16", "cpu", torch.float16, True),  # the notebook: fp16 autocast without a scaler
    ],
)
def test_precision_choices(precision: str, device: str, dtype: torch.dtype | None, scaler: bool) -> None:
    assert autocast_for(torch.device(device), precision) == (dtype, scaler)


AMX_FLAGS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw amx_bf16 amx_tile\n"
AVX512_BF16_FLAGS = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
SKYLAKE_FLAGS = "flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512dq\n"


def test_native_cpu_bf16_reads_the_cpu_flags() -> None:
    """bf16 only where the CPU has it natively: AVX512 alone emulates it (slower than fp32)."""
    assert native_cpu_bf16(AMX_FLAGS) and native_cpu_bf16(AVX512_BF16_FLAGS)
    assert not native_cpu_bf16(SKYLAKE_FLAGS) and not native_cpu_bf16("")


def test_auto_precision_is_fp32_on_cpu_whatever_the_cpu() -> None:
    """bf16 is a choice on CPUs (it did not speed the demo up end to end): auto stays fp32."""
    cpu = torch.device("cpu")
    assert autocast_for(cpu, "auto") == (None, False)
    assert autocast_for(cpu, "bf16") == (torch.bfloat16, False)


def test_fp16_training_runs_with_a_live_gradient_scaler(fold, tmp_path: Path, tiny_config) -> None:
    train, _, n = fold
    train_fold(tiny_config(epochs=1, precision="fp16"), train, train.iloc[:0], n, tmp_path, **QUIET)
    scaler = load_checkpoint(tmp_path / "last.pt")["scaler"]
    assert scaler and scaler["scale"] > 0  # enabled: the state is saved and resumed with the run


def test_species_head_is_trained_and_checkpointed(fold, tmp_path: Path, tiny_config) -> None:
    train, val, n = fold
    cfg = tiny_config(epochs=1, species_head=True, species_weight=0.5, dynamic_margin=True, sub_centers=2)
    train_fold(cfg, train, val, n, tmp_path, **QUIET)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["species"] == sorted(train["species"].unique())
    w = state["species_loss"]["W"]
    assert w.shape == (cfg.embedding_size, len(state["species"]))
    # One optimiser holds the species centres in the head group, and they received gradient.
    head_group = state["optimizer"]["param_groups"][1]
    assert len(head_group["params"]) == len(list(create_embedding_model(cfg).head_parameters())) + 2  # class + species centres
    species_w = head_group["params"][-1]
    assert state["optimizer"]["state"][species_w]["exp_avg"].abs().sum() > 0
    with pytest.raises(ValueError, match="species"):
        train_fold(cfg, train.drop(columns=["species"]), val, n, tmp_path / "x", **QUIET)


# ---------------------------------------------------------------- transforms and normalisation


def test_eval_transform_is_deterministic_under_any_seed(tiny_data: Path) -> None:
    """The notebook applied random AutoAugment to validation and test photos."""
    photo = load_rgb(next((tiny_data / "train_images").iterdir()))
    outs = []
    for seed in range(3):
        torch.manual_seed(seed)
        outs.append(eval_transform(32)(photo))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not any(isinstance(t, v2.RandomHorizontalFlip | v2.AutoAugment | v2.RandAugment) for t in eval_transform(32).transforms)


def test_train_augmentation_never_mirrors_a_photo() -> None:
    """A mirrored fluke shows its marks on the wrong side: another individual's pattern."""
    kinds = {type(t) for t in train_transform(32).transforms}
    assert not kinds & {v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.AutoAugment, v2.RandAugment, v2.TrivialAugmentWide}


def test_pretrained_normalisation_comes_from_timm(tiny_config) -> None:
    """The notebook fed unnormalised pixels to an ImageNet-pretrained backbone."""
    assert normalisation("resnet18") == (IMAGENET_MEAN, (0.229, 0.224, 0.225))
    clip_mean, _ = normalisation("vit_base_patch16_clip_224.openai")
    assert clip_mean != IMAGENET_MEAN  # a backbone with other statistics gets its own
    model = create_embedding_model(tiny_config(backbone="resnet18"))
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    x = (white.float() / 255 - model.mean) / model.std  # what the model feeds its backbone
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor((0.229, 0.224, 0.225)), atol=1e-5)


def test_average_pooling_option_has_no_learnt_exponent(tiny_config) -> None:
    cfg = tiny_config(pooling="avg")
    model = create_embedding_model(cfg)
    assert "pool.p" not in dict(model.named_parameters()) and float(model.pool.p) == 1.0
    assert "pool.p" in dict(create_embedding_model(tiny_config()).named_parameters())
    x = torch.rand(2, 3, 4, 4) + 0.1
    assert torch.allclose(model.pool(x), x.mean(dim=(2, 3)), atol=1e-6)


def test_notebook_recipe_trains(fold, tiny_recipe: dict, tmp_path: Path) -> None:
    """configs/notebook.yaml's choices (AutoAugment, SGD, one-cycle, average pooling, s=64) run end to end."""
    import yaml

    settings = yaml.safe_load((Path(__file__).parent.parent / "configs" / "notebook.yaml").read_text())["ops"]["arcface_model"]["config"]
    cfg = TrainConfig(**{**settings, **tiny_recipe, "epochs": 2, "warmup_epochs": 0.6})
    train, val, n = fold
    result = train_fold(cfg, train, val, n, tmp_path, **QUIET)
    assert cfg.augment == "autoaugment" and cfg.optimizer == "sgd" and cfg.pooling == "avg"
    assert [h["epoch"] for h in result.history] == [1, 2] and all(h["gem_p"] == 1.0 for h in result.history)


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 7, 40])
@pytest.mark.parametrize("warmup_epochs", [0.0, 0.3, 1.0])
def test_onecycle_any_length_steps_to_the_end(total: int, warmup_epochs: float, tiny_config) -> None:
    """Short runs (a few optimiser steps) must not break the schedule."""
    cfg = tiny_config(epochs=total, schedule="onecycle", warmup_epochs=warmup_epochs)
    opt = create_optimizer(cfg, create_embedding_model(cfg), create_loss(cfg, 3))
    sched = create_scheduler(cfg, opt, steps_per_epoch=1)
    for _ in range(total):
        opt.step()
        sched.step()
    assert all(math.isfinite(g["lr"]) for g in opt.param_groups)
