"""CLS pooling needs one row of the last layer: compute only that row.

A paper's vector is the last layer's output at the CLS position. Every earlier layer must run on every token (each
token's output feeds the next layer's keys and values), but in the last layer only the CLS row's query, attention
output, feed-forward and adapter reach the vector; the other tokens contribute their keys and values only. So the
last layer runs as attention of the CLS query over the full sequence's keys and values (the layer's own
self-attention module in its cross-attention form, same weights), then the attention output, feed-forward and
bottleneck adapter on that one row. For BERT-base that skips ~90% of the last layer (~7% of the forward's FLOPs,
~9% of the time on a 2-core AMX Xeon; BENCHMARKS.md); the vector equals the full layer's up to float rounding
(fp32: max |diff| ~1e-5 on unit-scale vectors; tested).

The layer's submodules are the adapters-wrapped ones, called inside the model's own forward, so the active adapter
applies exactly as in the full layer. The notebook's recipe (the benchmark's reference) keeps the full forward.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


def _cls_only_layer_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            *args, **kwargs) -> tuple[torch.Tensor]:
    cls = hidden_states[:, :1]
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :1, :]  # the CLS query's row of the (rows, 1, query, key) mask
    context = self.attention.self(cls, attention_mask=attention_mask, encoder_hidden_states=hidden_states)[0]
    attended = self.attention.output(context, cls)
    return (self.output(self.intermediate(attended), attended),)


def _last_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    encoder = getattr(getattr(model, "base_model", model), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers:
        return None
    last = layers[-1]
    attention = getattr(last, "attention", None)
    parts = (getattr(attention, "self", None), getattr(attention, "output", None),
             getattr(last, "intermediate", None), getattr(last, "output", None))
    return last if all(part is not None for part in parts) else None


def compute_cls_only_in_last_layer(model: torch.nn.Module) -> bool:
    """Make ``model``'s last encoder layer compute the CLS row only (its ``last_hidden_state`` then has one
    position). True where done; False for a model without BERT-style layers, which keeps its full forward."""
    last = _last_layer(model)
    if last is None:
        log.info("%s has no BERT-style encoder layers: the last layer computes every token", type(model).__name__)
        return False
    last.forward = types.MethodType(_cls_only_layer_forward, last)
    return True
