"""Typed settings of every pipeline stage: the single source of truth.

The Dagster layer exposes each of these as a launchpad ``Config`` (by
subclassing), and the recipes under ``configs/`` are run configs that set
them. Defaults are the CPU demo recipe: they run anywhere in minutes.
Fields use only types Dagster's config system understands (no tuples).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class MetadataConfig(BaseModel):
    """How the Kaggle CSVs are read."""

    check_files: bool = Field(True, description="Fail when a photo listed in train.csv is missing from train_images/ (a broken data set).")
    missing_test_images: Literal["prior", "fail"] = Field(
        "prior",
        description="A test photo listed but missing: 'prior' keeps its row (it gets the prior answer, with a warning); 'fail' stops.",
    )


class DetectorConfig(BaseModel):
    """Where the animal detector comes from and how it is trained."""

    source: Literal["train", "dataset", "weights", "none"] = Field(
        "train",
        description="'train': an ultralytics YOLO model trained from the box file; 'dataset': trained on a YOLO-format "
        "data set (dataset_yaml); 'weights': a user's .pt file (weights_path); 'none': full frames, no detector.",
    )
    dataset_yaml: str | None = Field(None, description="A YOLO-format data set's data.yaml, used when source='dataset'.")
    model_yaml: str = Field("yolov8n.yaml", description="Ultralytics model yaml to build from (no weight download).")
    weights_path: str | None = Field(None, description="A trained ultralytics .pt file, used when source='weights'.")
    box_file: str = Field("fluke_boxes.csv", description="Box CSV (image,x_min,y_min,x_max,y_max) in the data dir.")
    epochs: int = Field(50, ge=1, description="Detector training epochs (more when min_steps asks for them).")
    min_steps: int = Field(
        400,
        ge=0,
        description="At least this many optimiser steps (batches): with few boxed photos the epochs grow to reach them, since "
        "a detector trained from scratch needs steps, not passes (50 boxes x 50 epochs learns nothing; 0: epochs as given).",
    )
    imgsz: int = Field(128, ge=32, description="Detector input size (train and predict).")
    batch: int = Field(16, ge=1)
    val_share: float = Field(0.2, ge=0.0, lt=1.0, description="Share of the boxed images held out to report mAP.")
    device: str = Field("auto", description="'auto' (GPU when there is one), 'cpu', or a CUDA index like '0'.")
    seed: int = 0


class BoxConfig(BaseModel):
    """One crop box for every train and test image."""

    min_confidence: float = Field(0.25, ge=0.0, le=1.0, description="Below this the full frame is used instead of a box.")
    expand: float = Field(1.2, ge=1.0, le=3.0, description="Box width and height are multiplied by this (about the centre).")
    batch: int = Field(32, ge=1, description="Images per detector batch.")
    warn_full_frame_share: float = Field(
        0.3, ge=0.0, le=1.0, description="The asset check warns when more photos than this share of a split fall back to the full frame."
    )


class CropConfig(BaseModel):
    """The crops cut from the boxes."""

    size: int = Field(64, ge=16, description="Side of the square crops written to disk (the training input size).")
    resize: Literal["stretch", "letterbox"] = Field(
        "stretch", description="'stretch' the box to the square; 'letterbox' keeps its aspect ratio and pads with black."
    )
    bad_train_image: Literal["fail", "exclude"] = Field(
        "fail",
        description="A training photo that cannot be read: 'fail' stops the run after listing them all; 'exclude' trains without it.",
    )
    contact_sheet: int = Field(12, ge=0, description="Sample photos shown with their box and crop in the metadata (0: none).")


class FoldConfig(BaseModel):
    """Cross-validation folds by individual."""

    new_individual_share: float = Field(
        0.16,
        ge=0.0,
        lt=1.0,
        description=(
            "Target share of each fold's validation images whose individual is held out whole (truth new_individual);"
            " 0.16: Kaggle's test (docs/retrieval.md)."
        ),
    )
    seed: int = 0


class TrainConfig(BaseModel):
    """The ArcFace recipe of one fold model."""

    backbone: str = Field("resnet18", description="Any timm model name.")
    pretrained: bool = Field(False, description="Load timm pretrained weights (hub, or weights_file when given).")
    weights_file: str | None = Field(None, description="Local backbone weights (.safetensors/.pth) for pretrained=True offline.")
    image_size: int = Field(64, ge=16, description="Training and embedding input size.")
    embedding_size: int = Field(512, ge=8)
    pooling: Literal["gem", "avg"] = Field("gem", description="GeM with a learnt exponent, or plain average pooling.")
    gem_p: float = Field(3.0, gt=0.0, description="Initial GeM exponent (learnt).")
    margin: float = Field(0.3, ge=0.0, lt=1.6, description="ArcFace angular margin in radians.")
    scale: float = Field(30.0, gt=0.0, description="ArcFace logit scale (s).")
    sub_centers: int = Field(1, ge=1, description="Sub-centres per class; >1 uses sub-center ArcFace.")
    dynamic_margin: bool = Field(
        False, description="Per-individual margin a*n^-b + c (n = its training photos) instead of the fixed margin."
    )
    margin_a: float = Field(0.271, ge=0.0, description="Dynamic margin: a (1st place Happywhale: 0.271).")
    margin_b: float = Field(0.364, ge=0.0, description="Dynamic margin: b, the decay with photo count (0.364).")
    margin_c: float = Field(0.05, ge=0.0, description="Dynamic margin: c, the floor (0.05).")
    species_head: bool = Field(False, description="Also train an ArcFace species head on the same embedding.")
    species_weight: float = Field(0.1, ge=0.0, description="Weight of the species head's loss.")
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(16, ge=2)
    accumulate: int = Field(1, ge=1, description="Batches per optimiser step (gradient accumulation).")
    augment: Literal["marks", "autoaugment"] = Field(
        "marks", description="'marks': affine, colour, blur, no mirror; 'autoaugment': torchvision's ImageNet AutoAugment (the notebook's)."
    )
    m_per_class: int = Field(1, ge=1, description="Images per individual in a batch (m-per-class sampler); 1 = plain shuffle.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_backbone: float = Field(2e-3, gt=0.0)
    lr_head: float = Field(2e-2, gt=0.0, description="Learning rate of the embedding head and ArcFace centres.")
    weight_decay: float = Field(1e-4, ge=0.0)
    schedule: Literal["cosine", "onecycle"] = Field(
        "cosine", description="Warm-up then cosine, or torch's OneCycleLR; both stepped once per optimiser step."
    )
    warmup_epochs: float = Field(1.0, ge=0.0, description="Warm-up length (one-cycle: its rising phase).")
    grad_clip: float = Field(0.0, ge=0.0, description="Max gradient norm; 0 disables clipping.")
    patience: int = Field(
        0, ge=0, description="Stop after this many validations without gain (epochs when val_every is 1); 0 disables."
    )
    val_every: int = Field(
        1,
        ge=1,
        description="Validate every this many epochs, and always after the last; epochs in between record NaN "
        "validation metrics and cannot become best.pt. Each epoch trains the same for any value; only what is "
        "measured, which epoch is kept and when patience runs out change.",
    )
    val_sample: int = Field(
        0,
        ge=0,
        description="0: validate on all the fold's validation photos against all its training photos. N: on a fixed, "
        "seeded sample of N validation photos, against every training photo of their individuals plus the same share "
        "of the others; the same photos every time, so its scores compare with each other, not with the full fold's.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    processes: int = Field(
        1, ge=1, description="Training processes; >1 runs DistributedDataParallel under torchrun (one per GPU; gloo on CPU)."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="'auto': bf16 on GPUs that support it, else fp16 with a gradient scaler; fp32 on CPU. 'bf16' on a CPU with "
        "native bf16 (AMX or AVX512-BF16) made the step 1.2-1.9x faster but not the demo (docs/benchmarks.md).",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="Layout of the model's weights and input batches. 'auto': channels_last on GPUs and with bf16 on CPU "
        "(the layout their convolution kernels take without a reorder), contiguous for fp32 on CPU, where channels_last "
        "measured slower (docs/benchmarks.md, \"Training step speed on 2 CPU cores\").",
    )
    seed: int = 0
    init_weights: str | None = Field(
        None,
        description="A fold model's checkpoint (a best.pt) whose backbone, pooling and embedding head start this training instead "
        "of random or pretrained weights; the ArcFace centres start fresh. A run resuming from its own last.pt ignores it.",
    )
    warm_start_epochs: int = Field(
        0,
        ge=0,
        description="Rounds after the first only: each fold model starts from the previous round's model of the same fold "
        "(init_weights) and trains this many epochs instead of `epochs` from scratch. 0: from scratch.",
    )


class EmbedConfig(BaseModel):
    """Embedding every crop with a fold model."""

    batch_size: int = Field(64, ge=1, description="Images per embedding batch.")
    flip_tta: bool = Field(False, description="Average the embeddings of each image and its mirror image (renormalised).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for embedding.")
    device: str = Field("auto", description="'auto' (GPU when there is one), 'cpu', 'cuda' or 'cuda:N'.")
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="Decode JPEG crops with PIL in the loader ('cpu') or in batches on the model's device ('device': nvJPEG on a GPU).",
    )


class GalleryConfig(BaseModel):
    """The faiss index of the training photos, and how it is searched."""

    index: str = Field(
        "flat",
        min_length=1,
        description="'flat' is exact; 'hnsw', 'ivf' or 'ivfpq' (compressed: ~pq_m bytes a photo) are approximate, for galleries "
        "past ~1M photos; or any faiss index_factory string, e.g. 'OPQ64,IVF1024,PQ64', 'IVF256,SQ8', 'IVF1024_HNSW32,Flat' "
        "(inner product; nprobe and ef_search apply to its IVF and HNSW parts; hnsw_m, nlist, pq_m, pq_nbits only to the presets).",
    )
    k: int = Field(50, ge=1, description="Neighbours fetched per query at first (deepened when they hold fewer than 5 individuals).")
    hnsw_m: int = Field(32, ge=4, description="HNSW links per node.")
    ef_search: int = Field(128, ge=1, description="HNSW candidate list length when searching.")
    nlist: int | None = Field(None, ge=1, description="IVF cells; default 4*sqrt(gallery size).")
    nprobe: int = Field(16, ge=1, description="IVF cells visited per query.")
    pq_m: int = Field(64, ge=1, description="IVF-PQ sub-vectors per embedding (must divide its dimension): bytes stored per photo.")
    pq_nbits: int = Field(8, ge=4, le=16, description="IVF-PQ bits per sub-vector code.")
    recall_queries: int = Field(2000, ge=1, description="Queries sampled to measure an approximate index's recall@5 against flat.")
    keep_versions: int | None = Field(
        None,
        ge=1,
        description="Gallery versions (gallery/versions/vNNNN) to keep, newest first, the current one always; None keeps every version.",
    )


class ThresholdConfig(BaseModel):
    """Tuning the new_individual threshold on out-of-fold predictions."""

    k: int = Field(50, ge=1, description="Neighbours fetched per validation query at first.")
    per_species: bool = Field(
        False, description="A threshold per species (of the nearest individual) with enough validation photos; global elsewhere."
    )
    species_min_queries: int = Field(100, ge=1, description="The fewest validation photos for a species' own threshold.")
    rerank: bool = Field(
        True,
        description="Re-rank each query's first candidates by local-feature matches (the local_features asset), fused with "
        "the embedding similarity by a weight tuned out of fold with the threshold; a weight of 0 is kept when fusion does not help.",
    )
    candidates: int = Field(10, ge=5, description="Candidate individuals per query that local matching re-ranks.")
    photos_per_candidate: int = Field(4, ge=1, description="A candidate's gallery photos matched: those most like the query by embedding.")
    fusion_weights: int = Field(
        21,
        ge=2,
        description="Fusion weights tried between 0 and 1 (evenly spaced) per fused score, each point with its exact best threshold "
        "(local features and class centres together: every point of that grid on the simplex).",
    )
    class_centres: bool = Field(
        True,
        description="Fuse each candidate's cosine to its best ArcFace class (sub-)centre of the fold models, calibrated out of fold, "
        "with a weight tuned with the threshold (0 where it does not help). Needs fold models that kept their centres (left out "
        "with a warning where they did not).",
    )
    lead_weights: list[float] = Field(
        [0.0],
        min_length=1,
        description="Weights of the first candidate's lead over the second in the new_individual decision (the threshold applies "
        "to s1 + weight * (s1 - s2), after any fusion), each tried with its exact best threshold; the smallest of the best wins, "
        "and 0 (the plain rule) is always tried. [0.0]: the plain rule.",
    )

    @field_validator("lead_weights")
    @classmethod
    def _finite_non_negative(cls, weights: list[float]) -> list[float]:
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"lead_weights must be finite numbers >= 0, got {weights}")
        return weights


class PseudoLabelConfig(BaseModel):
    """Which of the previous round's test predictions a later training round trains on (how
    many rounds run is the recipe's top-level ``rounds``, or ``$WHALE_ROUNDS``)."""

    min_precision: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Out-of-fold top-1 precision the confidence is calibrated to: the smallest score at which the validation photos "
        "scoring at least that much have their first candidate right this often (new individuals count as wrong).",
    )
    min_photos: int = Field(10, ge=1, description="The fewest validation photos a calibrated confidence may rest on (fewer: no pseudo-labels).")


class LocalFeatureConfig(BaseModel):
    """Keypoints of each photo's box, for local-feature re-ranking (HotSpotter-style)."""

    method: Literal["sift", "orb"] = Field("sift", description="OpenCV's SIFT (stored as RootSIFT) or ORB (faster, less distinctive).")
    size: int = Field(256, ge=32, description="Long side, in pixels, of the box taken from the original photo.")
    max_keypoints: int = Field(400, ge=8, description="Strongest keypoints kept per photo.")
    contrast_threshold: float = Field(
        0.01,
        gt=0.0,
        description="SIFT's contrast threshold (OpenCV's default 0.04 finds too few keypoints on smooth skin and low-contrast marks).",
    )
    ratio: float = Field(0.8, gt=0.0, le=1.0, description="Lowe's ratio test: best match distance below this times the second best.")
    ransac_tolerance: float = Field(0.03, gt=0.0, description="RANSAC reprojection tolerance, as a share of `size`.")
    workers: int = Field(0, ge=0, description="Threads (0: $WHALE_THREADS or every core).")
