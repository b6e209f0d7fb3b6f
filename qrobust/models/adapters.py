"""One interface over both kinds of code LM: generate, loss, and the layers to quantize."""
from __future__ import annotations

import dataclasses
import functools
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.sanitize import cut_at_stop
from qrobust.errors import QrobustError
from qrobust.models.diffusion import (
    SamplerConfig, diffusion_generate, mask_tokens, masked_diffusion_loss, stratified_mask_ratios,
)
from qrobust.models.transformer import TransformerLM


@dataclass
class Generation:
    """One completion and what it cost. seconds and forward_passes are those of its batch."""

    text: str
    num_tokens: int
    seconds: float
    forward_passes: int
    batch_size: int


@dataclass
class BlockLayers:
    """The quantizable linear layers of one transformer block, in forward order.

    groups: layers that read the same input (q/k/v; gate/up) form one group; GPTQ's
    "true sequential" mode quantizes group by group.
    """

    index: int
    prefix: str
    groups: list[list[str]]

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g]


class ModelAdapter(ABC):
    kind: ClassVar[str]
    fused_for_generation: ClassVar[bool] = False  # whether for_generation fuses projections on CUDA
    held_out_loss: ClassVar[str]  # what held_out_loss_rows measures

    def __init__(self, model: nn.Module, tokenizer, name: str, num_layers: int):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.num_layers = num_layers
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._layers: list[BlockLayers] | None = None
        self._engine = None  # the batched engine of models.engine, built on first use (native models only)

    @property
    def native(self) -> bool:
        """Whether the model is qrobust's own TransformerLM (which the batched engines run)."""
        return isinstance(self.model, TransformerLM)

    def _engine_of(self, engine_type):
        """This model's engine of `engine_type`, built anew when the model or its device changed."""
        if self._engine is None or self._engine.model is not self.model or self._engine.device != self.device:
            self._engine = engine_type(self.model)
        return self._engine

    def for_generation(self, fuse: bool | None = None) -> int:
        """Readies a native model for generation and forward passes alone (a config's evaluation
        after its quantization): q/k/v become one layer and gate/up one SwiGLU layer wherever their
        kinds and specs match, four products a block instead of seven; causal models where the
        kernels run also decode each layer's attention in one kernel (the new token's q/k norms,
        rotation and cache writes, and its attention over its row's slots): models.decode.generation_layers. This changes the model's layers, so quantize,
        plan, save and attribute before. fuse: apply it (default: on CUDA for the kinds whose
        engine it was measured to speed up, `fused_for_generation`). Returns how many layer groups
        were fused (0 for other models)."""
        from qrobust.models.decode import generation_layers

        if fuse is None:
            fuse = self.device.type == "cuda" and self.fused_for_generation
        if not (fuse and self.native):
            return 0
        self._layers = self._engine = None  # both hold the layers as they were (an engine's graphs replay them)
        return generation_layers(self.model)

    # ---- structure -------------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        """The positions the model was built for (its config's max_position_embeddings), if it says."""
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return positions if isinstance(positions, int) else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def blocks_module(self) -> tuple[str, nn.Module]:
        """The container of transformer blocks (a ModuleList or Sequential of num_layers)."""
        candidates = [
            (name, m)
            for name, m in self.model.named_modules()
            if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == self.num_layers
        ]
        if not candidates:
            raise RuntimeError(f"no list of {self.num_layers} transformer blocks found in {self.name}")
        return min(candidates, key=lambda c: (not c[0].endswith("layers"), len(c[0])))

    def blocks(self) -> list[nn.Module]:
        return list(self.blocks_module()[1])

    def quantizable_layers(self) -> list[BlockLayers]:
        """Linear layers per block in the order a forward pass calls them, grouped by input."""
        if self._layers is None:
            self._layers = self._trace_layers()
        return self._layers

    def _trace_layers(self) -> list[BlockLayers]:
        from qrobust.quant.qlinear import QuantLinear  # the quant package builds on this module

        prefix, container = self.blocks_module()
        # The input tensors themselves are kept, not their ids: a freed tensor's id can be reused by
        # a later input, which would merge layers that do not share an input into one group.
        calls: list[tuple[str, torch.Tensor]] = []
        hooks = []
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.Linear, QuantLinear)) and name.startswith(prefix + "."):
                hooks.append(module.register_forward_hook(
                    lambda m, inp, out, name=name: calls.append((name, inp[0]))))
        try:
            ids = torch.arange(8, device=self.device)[None] % 4 + 1
            with torch.no_grad():
                self.logits(ids)
        finally:
            for h in hooks:
                h.remove()
        per_block: list[BlockLayers] = [BlockLayers(i, f"{prefix}.{i}", []) for i in range(len(container))]
        last_input: dict[int, torch.Tensor] = {}
        for name, inp in calls:
            i = int(name[len(prefix) + 1:].split(".")[0])
            block = per_block[i]
            if any(name in g for g in block.groups):
                continue
            if block.groups and last_input.get(i) is inp:
                block.groups[-1].append(name)
            else:
                block.groups.append([name])
            last_input[i] = inp
        return per_block

    def linear_layer_names(self) -> list[str]:
        return [n for b in self.quantizable_layers() for n in b.names]

    # ---- computation -----------------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, tuple) else out

    @abstractmethod
    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, seed: int = 0,
             reduction: str = "mean") -> torch.Tensor:
        """The model's own training objective on a batch (AR: next-token CE; diffusion: ELBO),
        averaged over tokens ('mean') or summed ('sum': a sequence's gradient then does not depend
        on what else is in its batch)."""

    @abstractmethod
    def held_out_loss_rows(self, ids: torch.Tensor, samples: int = 8, seed: int = 0,
                           batch_size: int = 16) -> torch.Tensor:
        """The loss per token of each equal-length window [N] of held-out text, `held_out_loss`
        names it (AR: exact NLL; diffusion: a Monte-Carlo negative ELBO over `samples` stratified
        mask ratios, seeded)."""

    @abstractmethod
    def calibration_inputs(self, input_ids: torch.Tensor, seed: int = 0, masking: str = "stratified") -> torch.Tensor:
        """What the model sees in use, for calibration: clean text (AR) or masked text (diffusion,
        `masking` one of CALIB_MASKINGS)."""

    @abstractmethod
    def _generate_batch(self, enc, max_new_tokens: int, stop: Sequence[str], temperature: float,
                        top_p: float, generator: torch.Generator, on_step,
                        min_new_tokens: int = 0) -> tuple[list[str], list[int], int]:
        """(texts, generated token counts, forward passes) for one tokenized, left-padded batch."""

    def _engine_generate(self, prompts: Sequence[str], settings, stop: Sequence[str],
                         batch_size: int) -> list[Generation] | None:
        """Completions from the batched engine (models.engine) where this model runs on one, else None."""
        return None

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        on_step: Callable[[], None] | None = None,
        min_new_tokens: int = 0,
    ) -> list[Generation]:
        """Complete each prompt; the text is cut at the first stop sequence. min_new_tokens: no
        row finishes (at end-of-sequence or a stop string) before this many tokens, so that
        benchmarks can force every generation to its full length. on_step is called after each
        forward pass of the per-batch path (diffusion models; not the AR engine, whose steps are graphs)."""
        from qrobust.models.engine import DecodeSettings

        settings = DecodeSettings(max_new_tokens, temperature, top_p, min_new_tokens, seed)
        engine_out = self._engine_generate(prompts, settings, stop, batch_size)
        if engine_out is not None:
            return engine_out
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        results: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = self.encode_prompts(chunk, max_new_tokens, return_tensors="pt", padding=True).to(self.device)
            t0 = time.perf_counter()
            texts, counts, passes = self._generate_batch(enc, max_new_tokens, stop, temperature, top_p,
                                                         generator, on_step, min_new_tokens)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            for text, n in zip(texts, counts):
                results.append(Generation(cut_at_stop(text, stop), n, seconds, passes, len(chunk)))
        return results

    def prompt_room(self, max_new_tokens: int) -> int | None:
        """Prompt tokens that leave room for max_new_tokens in the model's positions (None: no
        limit, or none left to give)."""
        positions = self.max_positions
        if positions is None or positions <= max_new_tokens:
            return None
        return positions - max_new_tokens

    def encode_prompts(self, prompts: list[str], max_new_tokens: int, **kwargs):
        """The tokenizer's encoding of the prompts, padded on the left, each cut from the left to
        prompt_room (as lm-eval does): a model run past the positions it was trained on would
        answer from noise, and at quadratic cost (the built-in pair's 512 positions against
        MBPP's ~800-token 3-shot prompts)."""
        tok = self.tokenizer
        tok.padding_side = "left"
        room = self.prompt_room(max_new_tokens)
        if room is None:
            return tok(prompts, **kwargs)
        tok.truncation_side = "left"
        return tok(prompts, truncation=True, max_length=room, **kwargs)

    def apply_chat_template(self, prompt: str, prefill: str = "") -> str:
        """The prompt as a chat turn when the tokenizer has a template, else unchanged."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text + prefill
        return prompt + prefill


class ARAdapter(ModelAdapter):
    """Any transformers causal LM (Qwen3 is the reference)."""

    kind = "ar"
    held_out_loss = "nll"
    # fused projections: 2-9% more tokens/s at batch 32-64 on an H100, full precision and every
    # width alike (results/engine/engine_variants_fused_h100.json)
    fused_for_generation = True

    def __init__(self, model: nn.Module, tokenizer, name: str, num_layers: int, eos_ids: Sequence[int] = ()):
        super().__init__(model, tokenizer, name, num_layers)
        self.eos_ids = tuple(eos_ids)  # ends of sequence besides the tokenizer's (generation_config.json)

    def logits(self, input_ids, attention_mask=None):
        if self.native:
            return self.model(input_ids, attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _engine_generate(self, prompts, settings, stop, batch_size):
        from qrobust.models.engine import AREngine, StopRule

        if not self.native:
            return None
        engine = self._engine_of(AREngine)
        tok = self.tokenizer
        ends = frozenset(t for t in (tok.eos_token_id, self.model.config.eos_token_id, *self.eos_ids)
                         if isinstance(t, int))
        decode = functools.partial(tok.decode, skip_special_tokens=True)
        rule = StopRule(ends, tuple(stop), decode, settings.min_new_tokens)
        ids = self.encode_prompts(list(prompts), settings.max_new_tokens, add_special_tokens=True)["input_ids"]
        out = engine.generate(ids, settings, rule, batch_size)
        results = []
        for tokens, b in zip(out.tokens, out.batch_of):
            batch = out.batches[b]
            answer = tokens[:next((i for i, t in enumerate(tokens) if t in ends), len(tokens))]
            results.append(Generation(cut_at_stop(decode(answer), stop), len(tokens), batch.seconds,
                                      batch.forward_passes, len(batch.rows)))
        return results

    def loss(self, input_ids, attention_mask=None, seed=0, reduction="mean"):
        logits = self.logits(input_ids, attention_mask)[:, :-1].float()
        targets = input_ids[:, 1:]
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction=reduction)

    def held_out_loss_rows(self, ids, samples=8, seed=0, batch_size=16):
        from qrobust.zoo.metrics import ar_nll_rows

        return ar_nll_rows(self.logits, ids, batch_size)

    def calibration_inputs(self, input_ids, seed=0, masking="stratified"):
        return input_ids

    def _generate_batch(self, enc, max_new_tokens, stop, temperature, top_p, generator, on_step, min_new_tokens=0):
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      min_new_tokens=min_new_tokens)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        counts = []
        for row in new:
            n = int((row != self.tokenizer.pad_token_id).sum()) if self.tokenizer.pad_token_id is not None else len(row)
            counts.append(n)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts, counts, new.shape[1]


class DiffusionAdapter(ModelAdapter):
    """A masked-diffusion LM: the native TransformerLM(causal=False) or CoDA's remote code."""

    kind = "diffusion"
    held_out_loss = "neg_elbo"
    # not fused: with fused projections the fast sampler ran 0-7% slower on an H100, bf16 5%
    # (results/engine/engine_diffusion_widths_h100.json)
    fused_for_generation = False

    def __init__(self, model, tokenizer, name, num_layers, mask_token_id: int, shift_logits: bool,
                 sampler: SamplerConfig | None = None, eps: float = 1e-3):
        super().__init__(model, tokenizer, name, num_layers)
        self.mask_token_id = mask_token_id
        self.shift_logits = shift_logits
        self.sampler = sampler or SamplerConfig()
        self.eps = eps

    def _ratios(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.eps + (1 - self.eps) * torch.rand(n, generator=g)

    def loss(self, input_ids, attention_mask=None, seed=0, reduction="mean"):
        g = torch.Generator().manual_seed(seed + 1)
        return masked_diffusion_loss(self.logits, input_ids, self._ratios(input_ids.shape[0], seed),
                                     self.mask_token_id, self.shift_logits, g, attention_mask, reduction)

    def held_out_loss_rows(self, ids, samples=8, seed=0, batch_size=16):
        from qrobust.zoo.metrics import diffusion_nelbo_rows

        return diffusion_nelbo_rows(self.logits, ids, self.mask_token_id, self.shift_logits, samples, seed, batch_size)

    def calibration_inputs(self, input_ids, seed=0, masking="stratified"):
        """'stratified' (the default): mask ratios stratified over (eps, 1) across the sequences given
        together, so the layer Hessians cover every noise level the sampler visits, from the
        all-masked start to the last commits; 'none': clean text, as AR models calibrate."""
        return CALIB_MASKINGS[masking](self, input_ids, seed)

    def _clean(self, input_ids, seed):
        return input_ids

    def _stratified_masks(self, input_ids, seed):
        n = input_ids.shape[0]
        t = stratified_mask_ratios(n, self.eps)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
        noisy, _ = mask_tokens(input_ids, t, self.mask_token_id, torch.Generator().manual_seed(seed + 1))
        return noisy

    def _generate_batch(self, enc, max_new_tokens, stop, temperature, top_p, generator, on_step, min_new_tokens=0):
        cfg = dataclasses.replace(self.sampler, temperature=temperature, top_p=top_p)
        args = (enc["input_ids"], enc["attention_mask"], max_new_tokens, self.mask_token_id, self.shift_logits, cfg,
                generator, on_step)
        if self.native:
            from qrobust.models.engine import DiffusionEngine

            out, passes = self._engine_of(DiffusionEngine).generate(*args)
        elif cfg.mode == "fast":
            raise QrobustError(f"{self.name}: the fast sampler runs on the native model only: load without remote code")
        else:
            out, passes = diffusion_generate(self.logits, *args)
        texts, counts = [], []
        ends = {t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if t is not None}
        for row in out.tolist():
            n = next((i for i, t in enumerate(row) if t in ends), len(row))
            counts.append(max(n, min(min_new_tokens, len(row))))
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True))
        return texts, counts, passes


CALIB_MASKINGS = {"stratified": DiffusionAdapter._stratified_masks, "none": DiffusionAdapter._clean}
