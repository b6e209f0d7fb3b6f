"""The AR engine's nucleus draw from 16-bit logits (models.nucleus) against an exact reference."""
import pytest
import torch

from qrobust.models.diffusion import nucleus_draw
from qrobust.models.engine import sample_token
from qrobust.models.nucleus import histogram_draw, histogram_draw_applies, histogram_draw_torch, sorted_draw

SETTINGS = ((0.1, 0.9), (0.7, 0.95), (1.0, 1.0), (0.1, 0.5))


def exact_draw(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """The draw in float64: a stable descending sort (ties in token-id order), tokens kept while
    the mass before them is at most top_p, the first whose cumulative mass reaches the quantile."""
    p = torch.softmax(logits.double() / temperature, -1)
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0) if top_p < 1 else sorted_p
    q = kept / kept.sum(-1, keepdim=True)
    index = (q.cumsum(-1) < uniform.double()[:, None]).sum(-1, keepdim=True)
    return order.gather(-1, index.minimum((q > 0).sum(-1, keepdim=True) - 1)).squeeze(-1)


def random_logits(rows: int, vocab: int, scale: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    logits = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    logits[0, : vocab // 10] = float("-inf")  # a masked part of the vocabulary
    logits[1] = logits[1, 0]  # one value everywhere: a single tie over the whole row
    return logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_histogram_draw_is_the_exact_draw_on_16_bit_logits(dtype):
    """Flat rows (nuclei of most of the vocabulary, ties of thousands of tokens per value) to peaked
    ones, quantile 0 included: every token equals the float64 sort's."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.02, 0.3, 2.0, 8.0):
        for temperature, top_p in SETTINGS:
            logits = random_logits(12, 30_011, scale, dtype, g)  # top_p × 30,011 is no whole number
            u = torch.rand(12, generator=g) * 0.9999
            u[2] = 0.0
            drawn = histogram_draw(logits, temperature, top_p, u)
            assert drawn.shape == (12, 1)
            assert drawn.squeeze(-1).tolist() == exact_draw(logits, temperature, top_p, u).tolist(), (scale, temperature)


def test_the_two_kernels_draw_the_torch_forms_tokens():
    """kernels.nucleus (here under Triton's interpreter; on CUDA by default) walks the values in
    blocks with carried sums where the torch form runs whole-row cumulative sums: the same tokens
    on flat to peaked rows, ties, masked tokens, quantile 0, both 16-bit dtypes and no top-p."""
    from qrobust import kernels
    from qrobust.kernels.nucleus import nucleus_draw_kernel

    if not kernels.supports("cpu") and not torch.cuda.is_available():
        pytest.skip("Triton cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(6)
    for (temperature, top_p), scale, dtype in zip(SETTINGS, (0.02, 2.0, 0.3, 8.0), (torch.bfloat16, torch.float16) * 2):
        logits = random_logits(5, 5003, scale, dtype, g)
        u = torch.rand(5, generator=g) * 0.9999
        u[2] = 0.0
        drawn = nucleus_draw_kernel(logits.to(device), temperature, top_p, u.to(device)).cpu()
        assert drawn.dtype == torch.int64 and drawn.shape == (5, 1)
        assert drawn.squeeze(-1).tolist() == exact_draw(logits, temperature, top_p, u).tolist()
        assert torch.equal(drawn, histogram_draw_torch(logits, temperature, top_p, u))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        nucleus_draw_kernel(torch.zeros(2, 8), 1.0, 0.9, torch.zeros(2))


def test_float32_sorting_over_a_wide_nucleus_drifts_where_the_histogram_does_not():
    """Over a nucleus of ~100k tokens a float32 cumulative sum in sorted order is off by a token now
    and then; the histogram's sums over values stay on the exact draw."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 151_936, generator=g) * 0.02).bfloat16()
    u = torch.rand(64, generator=g) * 0.9999
    exact = exact_draw(logits, 0.1, 0.9, u)
    assert histogram_draw(logits, 0.1, 0.9, u).squeeze(-1).tolist() == exact.tolist()
    assert (sorted_draw(logits, 0.1, 0.9, u).squeeze(-1) != exact).sum() > 0


def test_sample_token_takes_the_histogram_for_16_bit_logits_and_the_sort_otherwise():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 500, generator=g) * 3
    u = torch.rand(8, generator=g)
    assert histogram_draw_applies(logits.bfloat16()) and not histogram_draw_applies(logits)
    for x in (logits, logits.bfloat16(), logits.half()):
        assert sample_token(x, 0.7, 0.9, u).squeeze(-1).tolist() == exact_draw(x, 0.7, 0.9, u).tolist()


def test_a_short_cumulative_sum_draws_the_least_probable_kept_token_not_one_outside():
    """Seven positive probabilities whose float32 cumulative sum ends below the largest quantile
    torch.rand gives: the draw is the last of them, not a zero-probability token after them (the
    vocabulary's end, where the index was clamped before)."""
    g = torch.Generator().manual_seed(0)
    u = torch.tensor([1 - 2.0 ** -24])
    for _ in range(1000):
        p = torch.rand(1, 7, generator=g).sort(descending=True).values
        sorted_p = torch.cat([p / p.sum(), torch.zeros(1, 3)], -1)
        if float((sorted_p / sorted_p.sum()).cumsum(-1)[0, -1]) < float(u):
            break
    else:
        pytest.fail("no distribution whose float32 cumulative sum ends short")
    assert int(nucleus_draw(sorted_p, torch.arange(10)[None], 1.0, u)[0]) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_histogram_draw_replays_in_a_cuda_graph():
    from qrobust.models.decode import capture

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(32, 151_936, generator=g) * 0.5).bfloat16().cuda()
    u = torch.rand(32, generator=g).cuda()
    eager = histogram_draw(logits, 0.1, 0.9, u).clone()
    out = torch.empty_like(eager)
    replay = capture(lambda: out.copy_(histogram_draw(logits, 0.1, 0.9, u)), logits.device)
    replay()
    assert torch.equal(out, eager)
    u.copy_(torch.rand(32, generator=g))
    replay()
    assert out.squeeze(-1).tolist() == exact_draw(logits.cpu(), 0.1, 0.9, u.cpu()).tolist()
