"""The networks: output layout, broadcasting over enumerated classes, exportability, and the fused decoder kernel
giving exactly autograd's value and gradients."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models.coords import pixel_grid, transform_grid
from models.fused_likelihood import native_bfloat16, pixel_log_likelihood, resolve_matmul
from models.nets import BroadcastDecoder, ConvEncoder, CoordDecoder, DenseDecoder, InvariantFeatures, MLPEncoder

ROOT = Path(__file__).resolve().parents[1]


def test_nets_source_never_imports_pyro() -> None:
    for name in ("nets.py", "fused_likelihood.py", "coords.py"):
        tree = ast.parse((ROOT / "models" / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in mods if m.split(".")[0] == "pyro"}, name


def test_nets_import_without_pyro_in_a_fresh_interpreter() -> None:
    code = "import sys; sys.modules['pyro'] = None; import models.nets, models.coords; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_pixel_grid_convention_on_a_non_square_patch() -> None:
    g = pixel_grid(3, 5, device="cpu", dtype=torch.float64)
    assert g.shape == (15, 2)
    # row-major pixels, (x, y) columns, longer side spans [-1, 1], one unit on both axes
    assert g[0].tolist() == [-1.0, -0.5] and g[4].tolist() == [1.0, -0.5] and g[14].tolist() == [1.0, 0.5]
    assert g.mean(0).abs().max() < 1e-12
    # a quarter turn maps (x, y) to (-y, x), and shifts add after the rotation
    out = transform_grid(g, torch.tensor([torch.pi / 2], dtype=torch.float64), torch.tensor([[0.1, -0.2]]).double())
    assert out.shape == (1, 15, 2)
    expected = torch.stack([-g[:, 1] + 0.1, g[:, 0] - 0.2], dim=-1)
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize("encoder_cls", [MLPEncoder, ConvEncoder])
@pytest.mark.parametrize(("k", "rotation", "translation"), [(0, False, False), (3, True, False), (4, True, True)])
def test_encoder_heads(encoder_cls: type, k: int, rotation: bool, translation: bool) -> None:
    kw = {"latent_dim": 2, "n_classes": k, "rotation": rotation, "translation": translation}
    enc = encoder_cls((12, 10), **kw) if encoder_cls is MLPEncoder else encoder_cls((12, 10), channels=(4, 8), **kw)
    out = enc(torch.rand(5, 1, 12, 10))
    expected = {"z_loc", "z_scale"} | ({"class_logits"} if k else set())
    expected |= {"angle_loc"} if rotation else set()
    expected |= {"shift_loc", "shift_scale"} if translation else set()
    assert set(out) == expected
    assert out["z_loc"].shape == (5, 2) and (out["z_scale"] > 0).all()
    if k:
        assert out["class_logits"].shape == (5, k)
    if translation:
        assert out["shift_loc"].shape == (5, 2) and (out["shift_scale"] > 0).all()


def test_mlp_encoder_scripts_and_traces_to_the_same_outputs() -> None:
    enc = MLPEncoder((8, 8), latent_dim=2, n_classes=4, rotation=True, translation=True, hidden=(16,)).eval()
    x = torch.rand(3, 1, 8, 8)
    eager = enc(x)
    with warnings.catch_warnings():  # TorchScript is deprecated (2.13: Deprecation-, 2.14: FutureWarning) but served
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(enc)(x)
        traced = torch.jit.trace(enc, x, strict=False)(x)
    for key in eager:
        torch.testing.assert_close(scripted[key], eager[key])
        torch.testing.assert_close(traced[key], eager[key])


def test_decoders_broadcast_over_enumerated_classes() -> None:
    k, b, p = 3, 4, 6 * 5
    coords = torch.randn(b, p, 2)
    z = torch.randn(b, 2)
    y = torch.eye(k).reshape(k, 1, k)  # what parallel enumeration hands the model
    for dec in (
        CoordDecoder(latent_dim=2, n_classes=k, hidden=(8, 8)),
        BroadcastDecoder((6, 5), latent_dim=2, n_classes=k, channels=(4, 4)),
        DenseDecoder(p, latent_dim=2, n_classes=k, hidden=(8, 8)),
    ):
        out = dec(coords, z, y)
        assert out.shape == (k, b, p)
        # class j of image i equals decoding (i, j) on its own
        one = dec(coords[1:2], z[1:2], torch.eye(k)[2:3])
        torch.testing.assert_close(out[2, 1:2], one)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("shared_grid", [True, False])
@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_log_likelihood_equals_autograd(likelihood: str, shared_grid: bool, k: int, threads: int) -> None:
    """Value and every gradient, in float64, with chunks small enough to split classes and images, run in turn or
    side by side on threads."""
    torch.manual_seed(0)
    dec = CoordDecoder(latent_dim=2, n_classes=k, hidden=(6, 5, 4)).double()
    b, p = 3, 11
    coords = torch.randn(1 if shared_grid else b, p, 2, dtype=torch.float64, requires_grad=True)
    z = torch.randn(b, 2, dtype=torch.float64, requires_grad=True)
    y = torch.eye(k, dtype=torch.float64).reshape(k, 1, k) if k else None
    x = torch.rand(b, p, dtype=torch.float64)
    upstream = torch.randn((k, b) if k else (b,), dtype=torch.float64)
    inputs = [coords, z, *dec.parameters()]
    got = dec.log_likelihood(coords, z, y, x, likelihood=likelihood, gaussian_scale=0.3, threads=threads, chunk_rows=7)
    want = pixel_log_likelihood(dec(coords, z, y), x, likelihood, 0.3).sum(-1)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad((got * upstream).sum(), inputs)
    g_want = torch.autograd.grad((want * upstream).sum(), inputs)
    for a, w in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, w)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_bfloat16_matmuls_stay_within_about_half_a_percent_of_float64(likelihood: str) -> None:
    """The bfloat16 path is an approximation: its value and every gradient (weights, coordinates, latent) are
    compared in relative norm against float64 autograd, with chunks that split images and classes. A gradient
    taken through the wrong operand or left in bfloat16 where it is summed over pixels misses by far more."""
    torch.manual_seed(0)
    dec = CoordDecoder(latent_dim=2, n_classes=3, hidden=(64, 64, 64))
    b, p = 4, 400
    coords = torch.rand(b, p, 2) * 2 - 1
    z, y, x = torch.randn(b, 2), torch.eye(3).reshape(3, 1, 3), (torch.rand(b, p) > 0.6).float()
    upstream = torch.randn(3, b)

    def run(model: CoordDecoder, dtype: torch.dtype, matmul: str | None) -> list[torch.Tensor]:
        c, lat = coords.to(dtype).requires_grad_(), z.to(dtype).requires_grad_()
        xs, ys = x.to(dtype), y.to(dtype)
        if matmul is None:
            ll = pixel_log_likelihood(model(c, lat, ys), xs, likelihood, 0.3).sum(-1)
        else:
            ll = model.log_likelihood(c, lat, ys, xs, likelihood=likelihood, gaussian_scale=0.3, chunk_rows=700,
                                      threads=2, matmul=matmul)  # fmt: skip
        inputs = [c, lat, *model.parameters()]
        return [ll.detach().double()] + [g.double() for g in torch.autograd.grad((ll * upstream).sum(), inputs)]

    want = run(dec.double(), torch.float64, None)
    got = run(dec.float(), torch.float32, "bfloat16")
    full = run(dec, torch.float32, "full")
    for g, f, w in zip(got, full, want, strict=True):
        assert float((f - w).norm() / w.norm()) < 1e-5
        assert float((g - w).norm() / w.norm()) < 6e-3
    assert float((got[0] - want[0]).abs().max() / want[0].abs().max()) < 1e-4


def test_matmul_precision_resolution() -> None:
    assert resolve_matmul("auto", torch.float64) == "full"  # a float64 run asked for exact arithmetic
    assert resolve_matmul("auto", torch.float32) == ("bfloat16" if native_bfloat16() else "full")
    assert resolve_matmul("bfloat16", torch.float32) == "bfloat16"
    with pytest.raises(ValueError, match="'half' is not one of auto, full, bfloat16"):
        resolve_matmul("half", torch.float32)


def test_fused_log_likelihood_without_grad_matches() -> None:
    dec = CoordDecoder(latent_dim=2, n_classes=2, hidden=(8, 8))
    coords, z, y, x = torch.randn(1, 20, 2), torch.randn(4, 2), torch.eye(2).reshape(2, 1, 2), torch.rand(4, 20)
    with torch.no_grad():
        got = dec.log_likelihood(coords, z, y, x, likelihood="bernoulli", gaussian_scale=0.1)
        want = pixel_log_likelihood(dec(coords, z, y), x, "bernoulli", 0.1).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_dense_decoder_refuses_a_grid_of_another_size() -> None:
    dec = DenseDecoder(30, latent_dim=2, n_classes=0, hidden=(8,))
    with pytest.raises(ValueError, match="draws 30 pixels, the grid has 20"):
        dec(torch.zeros(1, 20, 2), torch.zeros(1, 2))


@pytest.mark.parametrize(("quantiles", "moments"), [(0, 0), (16, 0), (0, 6), (8, 2)])
def test_invariant_features_ignore_a_shift_and_a_quarter_turn_but_not_brightness(quantiles: int, moments: int) -> None:
    """The class head's features must not move when the model's own transforms act (a circular shift; a quarter
    turn, which maps the sampling rings onto themselves), and must move when the content does: a brighter patch of
    the same shape is what tells a heavy-cation film from its substrate."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    features = InvariantFeatures((16, 16), rotation=True, translation=True, quantiles=quantiles, moments=moments)
    assert features.n_features == 8 * 9 + moments + quantiles
    base = features.raw(x)
    shifted = features.raw(torch.roll(x, shifts=(3, -5), dims=(-2, -1)))
    turned = features.raw(torch.rot90(x, 1, dims=(-2, -1)))
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(turned, base, atol=1e-4, rtol=1e-4)
    brighter = features.raw(x + 0.3)
    moved = (brighter - base).abs().amax(dim=1)
    if quantiles or moments:
        assert bool((moved > 0.25).all()), "the intensity quantiles or moments must see a brighter patch"
    else:
        assert bool((moved < 1e-4).all()), "the mean-free spectrum alone is blind to a uniform offset"


def _reference_ring_features(x: np.ndarray, spectral: bool, harmonics: int = 8, n_angles: int = 32) -> np.ndarray:
    """The documented function written the plain way: numpy's FFT, four explicit bilinear corners per ring sample
    and a DFT over each ring's angles — independent of the matmul formulation the module exports."""
    n, h, w = x.shape
    if spectral:
        f = x - x.mean(axis=(1, 2), keepdims=True)
        f = 0.5 * np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(f), axes=(1, 2))) ** 2)
        cy, cx = h // 2, w // 2
    else:
        f, cy, cx = x, (h - 1) / 2, (w - 1) / 2
    n_radii = max(2, min(h, w) // 2)
    radii = (np.arange(n_radii) + 0.5) * (min(h, w) / 2 / n_radii)
    theta = np.arange(n_angles) * 2 * np.pi / n_angles
    ys, xs = cy + radii[:, None] * np.sin(theta), cx + radii[:, None] * np.cos(theta)
    if spectral:
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        fy, fx = ys - y0, xs - x0
        y1, x1 = (y0 + 1) % h, (x0 + 1) % w
        y0, x0 = y0 % h, x0 % w
    else:
        ys, xs = ys.clip(0, h - 1), xs.clip(0, w - 1)
        y0, x0 = np.minimum(np.floor(ys), h - 2).astype(int), np.minimum(np.floor(xs), w - 2).astype(int)
        fy, fx = ys - y0, xs - x0
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    rings = (
        f[:, y0, x0] * (1 - fy) * (1 - fx) + f[:, y0, x1] * (1 - fy) * fx
        + f[:, y1, x0] * fy * (1 - fx) + f[:, y1, x1] * fy * fx
    )  # fmt: skip
    spectrum = np.fft.fft(rings, axis=2)[..., : harmonics + 1]
    return (0.5 * np.log1p(np.abs(spectrum) ** 2)).reshape(n, -1)


@pytest.mark.parametrize("patch", [(16, 16), (15, 17), (24, 20)])
@pytest.mark.parametrize("translation", [True, False])
def test_invariant_features_equal_the_plain_fft_and_ring_sampling(patch: tuple[int, int], translation: bool) -> None:
    """The exported formulation (half spectrum, ring sampling and harmonics folded into one matrix) must be the
    function the docstring describes, on even and odd sides (to the float32 rounding of its fixed matrices)."""
    x = np.random.default_rng(0).random((6, *patch))
    features = InvariantFeatures(patch, rotation=True, translation=translation).double()
    got = features.raw(torch.from_numpy(x)[:, None]).numpy()
    np.testing.assert_allclose(got, _reference_ring_features(x, spectral=translation), rtol=1e-6, atol=1e-6)


def test_intensity_moments_are_the_textbook_ones_and_finite_on_a_flat_patch() -> None:
    x = np.random.default_rng(1).gamma(2.0, 0.1, size=(5, 1, 12, 12))
    got = InvariantFeatures((12, 12), rotation=True, translation=True, moments=6).double().raw(torch.from_numpy(x))
    flat = x.reshape(5, -1)
    mean, std = flat.mean(1), flat.std(1)
    z = (flat - mean[:, None]) / std[:, None]
    want = np.stack([mean, std, (z**3).mean(1), (z**4).mean(1), flat.min(1), flat.max(1)], axis=1)
    np.testing.assert_allclose(got[:, -6:].numpy(), want, rtol=1e-4)
    flat_patch = InvariantFeatures((12, 12), rotation=True, translation=True, moments=6).raw(
        torch.full((1, 1, 12, 12), 0.4)
    )
    assert bool(torch.isfinite(flat_patch).all())
    with pytest.raises(ValueError, match="0 to 6"):
        InvariantFeatures((12, 12), rotation=True, translation=True, moments=7)


@pytest.mark.parametrize("encoder_cls", [MLPEncoder, ConvEncoder])
def test_a_class_head_can_ignore_rotations_the_model_does_not_undo(encoder_cls: type) -> None:
    """Unit-cell patches train without the rotation latent (a rotation would turn one polarisation direction into
    another) but with a class that must not split the film by that direction: ``class_rotation`` makes the class
    head's features ignore a quarter turn while z, which must see the direction, does not."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 12, 12)
    turned = torch.rot90(x, 1, dims=(-2, -1))
    common = {"latent_dim": 2, "n_classes": 3, "rotation": False, "translation": False, "invariant_class": True}
    enc = encoder_cls((12, 12), class_rotation=True, **common).eval()
    with torch.no_grad():
        a, b = enc(x), enc(turned)
    torch.testing.assert_close(a["class_logits"], b["class_logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a["z_loc"], b["z_loc"], atol=1e-3) and "angle_loc" not in a
    plain = encoder_cls((12, 12), **common).eval()  # without it the class head reads the pixels
    with torch.no_grad():
        assert not torch.allclose(plain(x)["class_logits"], plain(turned)["class_logits"], atol=1e-3)
