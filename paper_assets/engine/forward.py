"""One model's forward pass on one device: eager or compiled, under the run's autocast, CLS rows out.

Shared by the encoder (which runs it on planned batches) and the tuning (which times it to decide the plan)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from . import calibrate
from .batching import warm_up_shapes
from .model import LoadedModel


class ModelForward:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self._compiled_fn: torch.nn.Module | None = None

    @property
    def compiled_once(self) -> bool:
        """Whether this process has already compiled the model (its compilation is paid)."""
        return self._compiled_fn is not None

    def compiled_model(self):
        """The model under ``torch.compile`` (dynamic shapes: one graph for every batch shape). On the CPU it is
        compiled with inductor's freezing, which folds the weights' bf16 casts and packs them for oneDNN once
        (AMX / AVX-512 kernels with the bias, GELU and residual adds fused), instead of casting and re-laying out
        every weight in every batch. Freezing must be on in inductor's config while the graph compiles:
        ``torch.compile(options={"freezing": True})`` is silently not applied (torch 2.13), so every call of the
        compiled model runs inside :meth:`compile_config`, recompilations included."""
        if self._compiled_fn is None:
            self._compiled_fn = torch.compile(self.model, dynamic=True)
        return self._compiled_fn

    def compile_config(self):
        if self.device.type == "cpu":
            import torch._inductor.config as inductor_config

            return inductor_config.patch(freezing=True)
        return nullcontext()

    def autocast(self):
        if self.loaded.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.loaded.dtype)
        return nullcontext()

    def cls(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, compiled: bool) -> torch.Tensor:
        """CLS vectors (float32, on the device) of one padded batch already on the device."""
        if compiled and input_ids.shape[0] == 1:
            # A compiled graph specialises on a batch of one (a new multi-second compilation); a row's vector
            # does not depend on the other rows of its batch, so the row is run as a batch of two.
            return self.cls(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), compiled)[:1]
        if compiled:
            with self.compile_config():
                out = self.compiled_model()(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0, :].float()

    def rates(self, variants: dict[str, bool], budgets: tuple[int, ...],
              rounds: int = calibrate.BUDGET_ROUNDS) -> dict[str, dict[int, list[float]]]:
        """Tokens per second of each named variant (name -> compiled?) on batches of paper-length rows, per token
        budget and round, timed interleaved (``calibrate.measure_rates``)."""

        def as_forward(compiled: bool):
            def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
                with torch.inference_mode(), self.autocast():
                    out = self.cls(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device),
                                   compiled)
                    return out.cpu().numpy()
            return forward

        forwards = {name: as_forward(compiled) for name, compiled in variants.items()}
        return calibrate.measure_rates(forwards, int(self.model.config.vocab_size), budgets, rounds)

    def warm_up(self, run: callable, token_budget: int, max_batch_rows: int, pad_multiple: int,
                max_length: int) -> None:
        """Run one full batch of every padded width through ``run(ids, mask)`` before the first chunk, so that
        compilation, kernel selection per shape and the allocator's largest blocks are paid here, once, and not by
        the first range (on a GPU the first 20k-paper range ran 27% below the rest without this). On a GPU also
        every bucketed row count of the two narrowest widths, where a chunk's last, partial batch nearly always
        falls: each new shape builds a cuDNN attention plan. A compiled CPU model runs one batch (the call
        compiles the dynamic-shape graph)."""
        shapes = warm_up_shapes(token_budget, max_batch_rows, pad_multiple, max_length,
                                every_width=self.device.type == "cuda")
        generator = torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        with torch.inference_mode(), self.autocast():
            for rows, width in shapes:
                ids = torch.randint(vocab, (rows, width), generator=generator).to(self.device)
                run(ids, torch.ones_like(ids))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
