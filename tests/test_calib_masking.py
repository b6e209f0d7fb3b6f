import pytest
import torch

from qrobust.errors import QrobustError
from qrobust.models import load_model
from qrobust.quant import QuantizeConfig
from qrobust.quant.driver import _capture_block_inputs


def _calibration_inputs_seen(adapter, calib, masking):
    """The token ids GPTQ's calibration forward passes see, one sequence per batch."""
    seen = []
    real = adapter.logits

    def spy(ids, attention_mask=None):
        if ids.shape[1] == calib.shape[1]:
            seen.append(ids.clone())
        return real(ids, attention_mask)

    adapter.logits = spy
    _capture_block_inputs(adapter, calib, 1, masking)  # what quantize_gptq runs first, one sequence a batch
    return torch.cat(seen)


def test_stratified_masks_span_the_ratios_at_batch_one_and_none_is_clean(tiny_dirs, calib):
    adapter = load_model(str(tiny_dirs["diffusion"]))
    seen = _calibration_inputs_seen(adapter, calib, "stratified")
    ratios = (seen == adapter.mask_token_id).float().mean(1)
    assert len(seen) == len(calib) and ratios.min() < 0.2 and ratios.max() > 0.8  # not 0.5 for every batch of one
    clean = _calibration_inputs_seen(load_model(str(tiny_dirs["diffusion"])), calib, "none")
    assert torch.equal(clean, calib)
    with pytest.raises(QrobustError, match="calibration masking"):
        QuantizeConfig(calib_masking="half")
