"""Configuration of a training run: the model, the optimisation and the data.

Everything a run needs is here, frozen and typo-proof (``extra="forbid"``), and it is saved whole next to the
weights (``config.json``) so that a run directory alone reproduces the model and tells the exporter how patches
were cut and transformed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamer.maps.atoms import Sublattice
from streamer.maps.manifest import Tiling
from streamer.maps.preprocess import Preprocessing

__all__ = ["Annealing", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig"]

#: Patch side of a model and of the data it is cut from, unless told: two lattice constants of a typical 16 px
#: lattice (a stack's patch is its image size whatever this says). The grid stride default is a quarter of it.
_PATCH = (32, 32)
#: Tiling and the atom finder: defaults and bounds are the manifest's, so training starts from what serving records.
_TILING = Tiling.model_fields
_Width = Annotated[int, Field(ge=1)]  # a layer's width or a convolution's channels


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """Which member of the VAE family, and its networks.

    ``n_classes=0`` drops the discrete latent (VAE / rVAE / trVAE); ``rotation`` and ``translation`` switch the
    invariances on and off, so the six variants of the paper are six settings of this one object.
    """

    patch: tuple[int, int] = _PATCH
    n_classes: int = Field(4, ge=0, le=64)
    latent_dim: int = Field(2, ge=1, le=64)
    rotation: bool = True
    translation: bool = True
    encoder: Literal["mlp", "conv"] = "mlp"
    decoder: Literal["mlp", "spatial_broadcast", "dense"] = Field(
        "mlp",
        description="mlp: the coordinate MLP of the paper; spatial_broadcast: its convolutional variant; dense: a "
        "plain MLP from (z, y) to all pixels, the paper's j-VAE baseline, only for models with no rotation or "
        "translation",
    )
    class_head: Literal["invariant", "pixels"] = Field(
        "invariant",
        description="what q(y|x) reads: invariant = features the model's rotation/translation leave unchanged "
        "(models.nets.InvariantFeatures), so the class cannot follow angle, shift or lattice registration; pixels = "
        "the paper's shared encoder trunk",
    )
    class_invariance: Literal["model", "rotation"] = Field(
        "model",
        description="which transforms the invariant class head (and the warm start's clustering) ignores: model = the "
        "model's own rotation/translation latents; rotation = rotations about the patch centre too, even when the "
        "model has no rotation latent. For unit-cell patches (polarisation): there the decoder must not rotate (a "
        "rotation turns one displacement direction into another, so the direction leaves z for the angle), and a "
        "class that reads the pixels splits the film by displacement direction instead (docs/real-data.md)",
    )
    class_moments: int = Field(
        6,
        ge=0,
        le=6,
        description="with the invariant class head, how many statistics of the patch's own intensity distribution "
        "it also reads, in this order: mean, standard deviation, skewness, kurtosis, minimum, maximum (unchanged by "
        "any rotation or shift); they carry the brightness that tells a heavy-cation film from its substrate, which "
        "the mean-free spectrum does not, and the extremes a point defect moves (docs/training.md); 0 = none",
    )
    class_quantiles: int = Field(
        0,
        ge=0,
        le=256,
        description="with the invariant class head, how many quantiles of the patch's intensity distribution it also "
        "reads (sorted pixel values at evenly spaced ranks); class_moments carries the same at a fraction of the cost "
        "(a sort per patch was most of the exported encoder's time), so 0 by default; runs trained with them keep them",
    )
    encoder_hidden: tuple[_Width, ...] = (256, 256)
    decoder_hidden: tuple[_Width, ...] = Field(
        (64, 64, 64),
        description="coordinate-decoder widths; it runs once per pixel per enumerated class (K·B·H·W rows, ~95 % of "
        "a step), so 3×64 is what a CPU budget buys: the paper's 3×256 is a GPU size (docs/training.md)",
    )
    conv_channels: tuple[_Width, ...] = (32, 64, 128)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    gaussian_scale: float = Field(
        0.2,
        gt=0,
        description="σ of the Gaussian likelihood in [0, 1] pixel units; it sets how many nats a reconstruction error "
        "costs against the β-weighted KL terms, so a small σ drowns the annealing and the classes collapse into z",
    )
    angle_prior: Literal["projected_normal", "von_mises"] = "projected_normal"
    angle_prior_concentration: float = Field(0.1, gt=0)
    translation_prior_scale: float = Field(0.1, gt=0)
    class_names: tuple[str, ...] | None = Field(
        None,
        description="what each class holds, as the manifest and every published map name it; atomstream train sets "
        "them after training to the data's labels the classes match (an unsupervised class k is not label k)",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if min(self.patch) < 4:
            raise ValueError(f"patch {self.patch} is too small: each side needs at least 4 pixels")
        if self.decoder == "dense" and (self.rotation or self.translation):
            raise ValueError(
                "the dense decoder cannot draw a rotated or shifted grid: use it with rotation and translation off"
            )
        if self.class_names is not None and len(self.class_names) != self.n_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but n_classes={self.n_classes}; give one per class"
            )
        return self

    @property
    def variant(self) -> str:
        """The paper's name for this configuration (VAE, rVAE, trVAE, jVAE, jrVAE, jtrVAE)."""
        joint = "j" if self.n_classes > 0 else ""
        inv = (
            "tr"
            if self.translation and self.rotation
            else ("r" if self.rotation else ("t" if self.translation else ""))
        )
        return f"{joint}{inv}VAE"

    @property
    def class_rotation(self) -> bool:
        """Whether the invariant class head's features ignore rotations: the model's rotation latent, or
        ``class_invariance="rotation"``."""
        return self.rotation or self.class_invariance == "rotation"

    def names_of_classes(self) -> tuple[str, ...]:
        return self.class_names if self.class_names is not None else tuple(f"class{k}" for k in range(self.n_classes))


class Annealing(_Frozen):
    """β weights of the paper's loss: β1 on the (γ, s) KL, β2(t) on z, β3(t) on y.

    β2 and β3 fall linearly from their start to their end values over the first ``ramp_fraction`` of the epochs and
    then stay; β2 starts several times above β3 so that information goes into the class first.
    """

    beta1: float = Field(1.0, ge=0)
    beta2_start: float = Field(8.0, ge=0)
    beta2_end: float = Field(1.0, ge=0)
    beta3_start: float = Field(2.0, ge=0)
    beta3_end: float = Field(1.0, ge=0)
    ramp_fraction: float = Field(0.2, ge=0, le=1)

    def at(self, epoch: int, n_epochs: int) -> tuple[float, float, float]:
        """(β1, β2, β3) for a 0-based epoch."""
        ramp = self.ramp_fraction * n_epochs
        f = 1.0 if ramp <= 0 else min(1.0, epoch / ramp)
        b2 = self.beta2_start + f * (self.beta2_end - self.beta2_start)
        b3 = self.beta3_start + f * (self.beta3_end - self.beta3_start)
        return self.beta1, b2, b3


class TrainConfig(_Frozen):
    epochs: int = Field(100, ge=1)
    class_init: Literal["invariant_gmm", "random"] = Field(
        "invariant_gmm",
        description="where the class head starts: invariant_gmm fits it to a Gaussian mixture of the patches in "
        "features invariant to the model's rotation/translation (models.warm_start), which keeps the class latent "
        "from collapsing or sorting by nuisance; random is the plain VAE start",
    )
    class_anchor: float = Field(
        20.0,
        ge=0,
        description="weight (nats per image) of the cross-entropy between q(y|x) and the initial clusters at the "
        "start of training; it falls linearly to class_anchor_end over the annealing ramp",
    )
    class_anchor_end: float = Field(
        2.0,
        ge=0,
        description="weight of that cross-entropy after the annealing ramp; with 0 the ELBO alone moves the classes "
        "off the clusters (glyph suits ±60°: held-out accuracy 0.51 against 0.997 at 2, docs/training.md)",
    )
    batch_size: int = Field(32, ge=1, description="patches per step: small batches, more updates per CPU second")
    lr: float = Field(2e-3, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    annealing: Annealing = Annealing()
    val_fraction: float = Field(0.1, ge=0, lt=1)
    keep: Literal["last", "best_val"] = Field(
        "last",
        description="the weights a run ends with: the last epoch's, or (best_val) those of the epoch with the lowest "
        "held-out loss once the β ramp is over (needs val_fraction > 0; earlier epochs' losses are of other βs). The "
        "unit-cell recipe keeps best_val: on the PbTiO3 scan's 445 cells the held-out ELBO turns after ~300 epochs "
        "while a 300 s budget trains ~1000, and z's displacement readout falls with it (docs/real-data.md)",
    )
    checkpoint_every: int = Field(0, ge=0)
    progress: bool = True
    likelihood_threads: int = Field(
        1,
        ge=1,
        description="CPU threads the coordinate decoder's fused likelihood spreads its chunks over; 1 runs them in "
        "turn on torch's own intra-op threads. More is fastest with torch at one intra-op thread, a process-wide "
        "setting fit leaves alone (atomstream train sets both)",
    )
    decoder_matmul: Literal["auto", "full", "bfloat16"] = Field(
        "full",
        description="precision of the fused decoder kernel's matmul operands on the CPU: with 256-wide decoder layers "
        "bfloat16 takes ~0.6x the step time where the CPU has it natively (gradients within 0.3 % of float64); with "
        "the default 64-wide ones it is hardly faster, and at equal epochs its held-out ELBO came out 5-9 nats worse "
        "on 24-32 px cards (docs/training.md), so it is opt-in; auto picks it where the CPU has it natively and "
        "dtype is float32",
    )
    pixel_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="share of each image's pixels the reconstruction term scores per step (a fresh random subset, "
        "scaled by P/m so the ELBO stays unbiased); the coordinate decoder's cost is proportional to it. Validation "
        "always scores every pixel (docs/training.md has the quality-against-time table)",
    )


class DataConfig(_Frozen):
    """Where the training patches came from and how they were cut and transformed.

    The exporter copies ``preprocessing`` and the tiling fields into the artifact's manifest, which is how serving
    applies exactly what training saw.
    """

    source: str = ""
    kind: Literal["stack", "grid", "atoms"] = "stack"
    patch: tuple[int, int] = _PATCH
    stride: tuple[int, int] = _TILING["stride"]
    origin: tuple[int, int] = _TILING["origin"]
    preprocessing: Preprocessing = Preprocessing()
    atom_sigma: float = _TILING["atom_sigma"]
    atom_min_distance: int = _TILING["atom_min_distance"]
    atom_threshold: float = _TILING["atom_threshold"]
    atom_sublattice: Sublattice = Field(
        _TILING["atom_sublattice"].default,
        description="brightest: keep one sublattice so classes do not split by sublattice; cells: the centres of its "
        "unit cells, the paper's polarisation patches (streamer.maps.atoms)",
    )


class RunConfig(_Frozen):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    name: str = "jtrvae"
    version: str = "0.1.0"
