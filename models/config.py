"""Configuration of a training run: the model, the optimisation and the data.

Everything a run needs is here, frozen and typo-proof (``extra="forbid"``), and it is saved whole next to the
weights (``config.json``) so that a run directory alone reproduces the model and tells the exporter how patches
were cut and transformed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from streamer.preprocess import Preprocessing

__all__ = ["Annealing", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """Which member of the VAE family, and its networks.

    ``n_classes=0`` drops the discrete latent (VAE / rVAE / trVAE); ``rotation`` and ``translation`` switch the
    invariances on and off, so the six variants of the paper are six settings of this one object.
    """

    patch: tuple[int, int] = (48, 48)
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
    encoder_hidden: tuple[int, ...] = (256, 256)
    decoder_hidden: tuple[int, ...] = (256, 256, 256)
    conv_channels: tuple[int, ...] = (32, 64, 128)
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
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    annealing: Annealing = Annealing()
    val_fraction: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(0, ge=0)
    progress: bool = True


class DataConfig(_Frozen):
    """Where the training patches came from and how they were cut and transformed.

    The exporter copies ``preprocessing`` and the tiling fields into the artifact's manifest, which is how serving
    applies exactly what training saw.
    """

    source: str = ""
    kind: Literal["stack", "grid", "atoms"] = "stack"
    patch: tuple[int, int] = (48, 48)
    stride: tuple[int, int] = (8, 8)
    origin: tuple[int, int] = (0, 0)
    preprocessing: Preprocessing = Preprocessing()
    atom_sigma: float = Field(1.5, ge=0)
    atom_min_distance: int = Field(5, ge=1)
    atom_threshold: float = Field(0.2, ge=0, le=1)
    atom_sublattice: Literal["all", "brightest"] = Field(
        "all", description="brightest: keep one sublattice so classes do not split by sublattice (streamer.atoms)"
    )


class RunConfig(_Frozen):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    name: str = "jtrvae"
    version: str = "0.1.0"
