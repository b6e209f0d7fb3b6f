"""`QrobustLM`: any qrobust model, AR or masked diffusion, full precision or quantized, as an lm-eval model.

Registered as lm-eval's model `qrobust` when qrobust.lm_eval is imported, so
`--model qrobust --model_args model=tiny-dllm,method=gptq,bits=3` works from lm-eval's CLI
through `python -m qrobust.lm_eval`.
"""
from __future__ import annotations

from dataclasses import fields
from itertools import groupby

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from qrobust.errors import QrobustError
from qrobust.lm_eval.likelihood import DiffusionScorer, ar_scores, fit_window
from qrobust.lm_eval.target import Loaded, TargetSpec, load_target
from qrobust.precision import baseline_label, dtype_bits

DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")  # what generate_until reads


def _device(name: str | None) -> str:
    """lm-eval's CLI passes device='cuda' by default; like its `hf` model, fall back to the CPU without CUDA."""
    import torch

    if name is None or (str(name).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


@register_model("qrobust")
class QrobustLM(TemplateLM):
    """An lm-eval model over a qrobust ModelAdapter.

    Build it from a model (short name, hub id or directory) plus at most one of `quantized`
    (a `qrobust quantize` checkpoint), `method`/`bits` (quantize here, as a sweep does) or `plan`
    (a `qrobust plan` file); or hand it a loaded adapter with `adapter=`.

    Diffusion options: `estimator` ('count': LLaDA's l-of-L masking, or 'ratio': Dream's mask
    probability t), `mc_samples` per request, `mc_batch_size`, `mc_seed`; the sampler of
    generate_until is the adapter's SamplerConfig, overridden by `steps`, `block_length`, `alg`.
    """

    def __init__(self, model: str | None = None, adapter=None, quantized: str | None = None,
                 method: str | None = None, bits: int | None = None, plan: str | None = None,
                 group_size: int = 128, nsamples: int = 32, calib_seqlen: int = 512, seed: int = 0,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, max_length: int | None = None, estimator: str = "count",
                 mc_samples: int = 32, mc_batch_size: int = 32, mc_seed: int = 0, steps: int | None = None,
                 block_length: int | None = None, alg: str | None = None, work_dir: str | None = None) -> None:
        super().__init__()
        if adapter is None:
            if model is None:
                raise QrobustError("QrobustLM needs model=NAME_OR_DIR (or adapter=a loaded ModelAdapter)")
            spec = TargetSpec(str(model), quantized, method, None if bits is None else int(bits), plan,
                              int(group_size), int(nsamples), int(calib_seqlen), int(seed), _device(device), dtype)
            loaded = load_target(spec, work_dir)
        else:
            dtype = next(adapter.model.parameters()).dtype
            loaded = Loaded(adapter, model or adapter.name, method or baseline_label(dtype),
                            int(bits or dtype_bits(dtype)))
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.tokenizer = self.adapter.tokenizer
        self.kind = self.adapter.kind
        # "auto" (lm-eval's automatic batch size) has no meaning here: one fixed size is used.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.seed = int(seed)
        self._max_length = int(max_length) if max_length else (self.adapter.max_positions or 2048)
        if self.kind == "diffusion":
            self.scorer = DiffusionScorer(self.adapter.logits, self.adapter.mask_token_id, self.adapter.shift_logits,
                                          estimator, int(mc_samples), int(mc_batch_size), seed=int(mc_seed))
            overrides = {k: v for k, v in (("steps", steps), ("block_length", block_length), ("alg", alg))
                         if v is not None}
            if overrides:
                sampler = self.adapter.sampler
                values = {f.name: getattr(sampler, f.name) for f in fields(sampler)}
                self.adapter.sampler = type(sampler)(**{**values, **overrides})

    # ---- what TemplateLM needs ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.adapter.name).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- scoring -----------------------------------------------------------------------------
    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True,
                     greedy: bool = True) -> list[tuple[float, bool]]:
        if self.kind == "ar":
            return ar_scores(self.adapter.logits, pairs, self.max_length, self.batch_size,
                             self.tokenizer.pad_token_id, self.adapter.device)
        fitted = [fit_window(c, x, self.max_length) for c, x in pairs]
        return [self.scorer.score(c, x, self.adapter.device, greedy)
                for c, x in tqdm(fitted, desc="diffusion ELBO", disable=disable_tqdm)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score_pairs([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), r in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """AR: the exact log-likelihood of each text; diffusion: the sum over windows of each
        window's ELBO given the tokens before it, a lower bound."""
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="rolling", disable=disable_tqdm):
            windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            pairs = [(list(c), list(x)) for c, x in windows]
            total = sum(score for score, _ in self._score_pairs(pairs, greedy=False))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ---- generation --------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int, float, float]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until:
            until.append(eot)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_p = float(kwargs.pop("top_p", 1.0))
        if not do_sample:
            temperature = 0.0
        return tuple(until), max_new, temperature, top_p

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same settings go to the adapter's (batched) generate together."""
        settings = [self._generation_settings(r.args[1]) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: repr(settings[i]))
        out: list[str | None] = [None] * len(requests)
        for key, group in groupby(order, key=lambda i: settings[i]):
            idx = list(group)
            until, max_new, temperature, top_p = key
            gens = self.adapter.generate([requests[i].args[0] for i in idx], max_new, list(until), temperature,
                                         top_p, seed=self.seed, batch_size=self.batch_size)
            for i, g in zip(idx, gens):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out  # type: ignore[return-value]
