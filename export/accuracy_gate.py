"""The accuracy gate a reduced-precision variant must pass before ``precision: auto`` may serve it.

Every variant (int8 on ONNX Runtime, bf16 on OpenVINO) is compared with the fp32 graph on ONNX Runtime, on
the same inputs, at export; the report keeps the figures and the verdict. The bounds:

* logits: mean absolute error ≤ ``LOGIT_MAE`` × max(1, mean |fp32 logit|) — 0.01 for logits of unit scale
  (the issue's bound), proportionally more for a trained model's larger logits. For a translator the logits
  are teacher-forced: the decoder is fed the fp32 greedy output, so one early token flip cannot hide (or
  fake) the error of every later position. On random weights greedy output repeats a few tokens, which is
  why token agreement alone proves little;
* task accuracy (the zoo's test accuracy, or exact match of translations) at most ``ACCURACY_DROP`` below
  fp32's, when the export has labelled data;
* translators: greedy token agreement with fp32 ≥ ``TOKEN_AGREEMENT``.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

LOGIT_MAE: Final = 0.01
ACCURACY_DROP: Final = 0.005
TOKEN_AGREEMENT: Final = 0.95


def logit_checks(logits: np.ndarray, reference: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """MAE of ``logits`` against the fp32 ``reference`` (over the ``valid`` positions) and its bound."""
    error, scale = np.abs(logits - reference), np.abs(reference)
    if valid is not None:
        error, scale = error[valid], scale[valid]
    return {"logit_mae": float(error.mean()), "logit_mae_bound": LOGIT_MAE * max(1.0, float(scale.mean())),
            "logit_max_abs": float(error.max())}


def verdict(checks: dict[str, Any]) -> dict[str, Any]:
    """``checks`` with ``passed`` and, when it failed, ``why`` (each failed bound, in words)."""
    failed = []
    if checks["logit_mae"] > checks["logit_mae_bound"]:
        failed.append(f"logit MAE {checks['logit_mae']:.4g} > {checks['logit_mae_bound']:.4g}")
    if checks.get("accuracy") is not None and checks.get("accuracy_fp32") is not None \
            and checks["accuracy"] < checks["accuracy_fp32"] - ACCURACY_DROP:
        failed.append(f"accuracy {checks['accuracy']:.4f} < fp32 {checks['accuracy_fp32']:.4f} - {ACCURACY_DROP}")
    if checks.get("token_agreement") is not None and checks["token_agreement"] < TOKEN_AGREEMENT:
        failed.append(f"token agreement {checks['token_agreement']:.3f} < {TOKEN_AGREEMENT}")
    return {**checks, "passed": not failed, **({"why": "; ".join(failed)} if failed else {})}
