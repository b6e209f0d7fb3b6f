"""Load → calibrate → quantize → save, the work behind `qrobust quantize`."""
from __future__ import annotations

from pathlib import Path

import torch

from qrobust.calib import calibration_tokens
from qrobust.errors import QrobustError
from qrobust.models.loading import load_model
from qrobust.quant.checkpoint import save_quantized
from qrobust.quant.driver import QuantizeConfig, quantize_model


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QrobustError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    return out


def quantize_to_dir(model: str, config: QuantizeConfig, out: str | Path, device: str = "cpu",
                    dtype: torch.dtype | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    out = check_out_dir(out, overwrite)
    adapter = load_model(model, device=device, dtype=dtype)
    calib = None
    if config.method == "gptq":
        calib = calibration_tokens(adapter.tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    records = quantize_model(adapter, config, calib, progress)
    return save_quantized(adapter, config, records, out, base_model=model)
