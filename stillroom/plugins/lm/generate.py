"""Sampling continuations from a causal LM (student rollouts for GKD, teacher responses for SeqKD).

A small loop over the KV cache rather than ``model.generate``: it draws from the generator it is
given (or torch's global RNG, which checkpoints restore, so a resumed on-policy run samples the same
continuations) and returns the mask of the tokens that count: the generated ones up to and including
the first EOS, never the prompt or what follows EOS.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continues ``prompt_ids`` ([B, P], equal-length prompts) by ``max_new_tokens`` tokens.

    ``temperature`` 0 is greedy. Returns ``(ids [B, P + N], generated [B, P + N])`` where
    ``generated`` is 1 on sampled tokens up to and including the first EOS; positions after EOS
    hold ``pad_id`` (or EOS).
    """
    was_training = model.training
    model.eval()
    batch, start = prompt_ids.shape
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    ids = prompt_ids
    alive = torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
    keep = [torch.zeros(batch, start, dtype=torch.long, device=prompt_ids.device)]
    name = _cache_name(model)
    out = model(input_ids=ids, use_cache=True)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(alive, token, torch.full_like(token, pad))
        keep.append(alive.long()[:, None])
        ids = torch.cat([ids, token[:, None]], dim=1)
        if eos_id is not None:
            alive = alive & (token != eos_id)
        if not alive.any():
            break
        out = model(input_ids=token[:, None], use_cache=True, **{name: getattr(out, name)})
    model.train(was_training)
    return ids, torch.cat(keep, dim=1)


def _cache_name(model) -> str:
    """The KV cache's name in this transformers version: ``cache`` (5.x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
