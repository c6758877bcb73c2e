"""The parity check's class argmax: identical wherever the reference decides the class by more than the tolerance
allows either way; a tie within it may go either way (an export of a real training failed on one such patch)."""

from __future__ import annotations

import torch

from exporters.verify import PARITY_TOLERANCE, _compare

NAMES = ["z_loc", "class_prob"]


def _ref() -> dict[str, torch.Tensor]:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5 + PARITY_TOLERANCE / 2, 0.5 - PARITY_TOLERANCE / 2]])
    return {"z_loc": torch.zeros(3, 2), "class_prob": probs}


def test_a_flip_on_a_tie_within_the_tolerance_passes_and_a_flip_on_a_decided_patch_fails() -> None:
    ref = _ref()
    tie = ref["class_prob"].clone()
    tie[2] = torch.tensor([0.5 - PARITY_TOLERANCE / 4, 0.5 + PARITY_TOLERANCE / 4])  # moved by less than the bound
    r = _compare("onnx", NAMES, [ref["z_loc"], tie], ref, PARITY_TOLERANCE, 1.0)
    assert r.passed and r.argmax_agreement == 1.0 and bool((tie.argmax(-1) != ref["class_prob"].argmax(-1)).any())
    decided = ref["class_prob"].clone()
    decided[0] = torch.tensor([0.1, 0.9])  # a clear class turned over: a real disagreement (and a large Δ)
    r = _compare("onnx", NAMES, [ref["z_loc"], decided], ref, PARITY_TOLERANCE, 1.0)
    assert not r.passed and r.argmax_agreement == 0.5  # 1 of the 2 decided patches
