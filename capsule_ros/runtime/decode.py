"""Acting on a query's last hidden state: a continuous head's chunk, or a token head's decoding.

A token head drives the engine (each sampled token is fed back with ``engine.extend`` before the
commit), so it lives here beside the engine, not in ``policy/``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..policy.heads import ContinuousActionHead, TokenSampler
from .engine import Engine
from .outcome import ActionOutput, TextOutput

if TYPE_CHECKING:
    from ..models.hybrid import HybridModel

Head = ContinuousActionHead | TokenSampler


class TextCodec:
    """Token ids -> text: the checkpoint tokenizer's ``decode`` when there is one, else the mirror
    of the text encoder's byte-level fallback (id - byte_offset as a utf-8 byte; ids outside
    [byte_offset, byte_offset + 256) and end-of-sequence ids are skipped, bad utf-8 is replaced).
    """

    def __init__(self, tokenizer: Any = None, byte_offset: int = 0,
                 eos_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer, self.byte_offset, self.eos_ids = tokenizer, int(byte_offset), eos_ids

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)
        raw = bytes(i - self.byte_offset for i in ids
                    if i not in self.eos_ids and 0 <= i - self.byte_offset < 256)
        return raw.decode("utf-8", errors="replace")


class ContinuousAct:
    """A continuous head: the whole act happens on the query's last hidden state."""

    def __init__(self, head: ContinuousActionHead, columns: tuple[str, ...]) -> None:
        self.head, self.columns = head, columns

    def first(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def finish(self, first: torch.Tensor) -> ActionOutput:
        return ActionOutput(first.detach().cpu().numpy(), self.head.step_period, self.columns)


class TokenAct:
    """A token head: the first token from the query's last hidden state (inside ``engine.query``),
    then decode (after it, before commit): each sampled token, as the model's own embedding, is
    fed back with ``engine.extend`` until EOS, ``max_new_tokens`` or the context limit. Every
    emitted token is fed back, so the committed boundary holds the whole answer and the next query
    continues after it.

    Randomness: a ``torch.Generator`` whose state lives in ``engine.meta_tensors["rng"]``,
    restored with the stream's capsule at the start of act and committed with the new boundary;
    a stream without one (new, or reset to empty) seeds it from the head's ``seed``. So a restored
    or rolled-back stream samples the same continuation.
    """

    RNG_KEY = "rng"

    def __init__(self, sampler: TokenSampler, engine: Engine, codec: TextCodec) -> None:
        self.sampler, self.engine, self.codec = sampler, engine, codec
        self.model: HybridModel = engine.model
        self.generator: torch.Generator | None = None

    def _restore_generator(self) -> torch.Generator | None:
        if self.sampler.greedy:
            return None
        device = self.model.live.device
        state = self.engine.meta_tensors.get(self.RNG_KEY)
        if state is None:
            return self.sampler.new_generator(device)
        gen = torch.Generator(device=device)
        gen.set_state(state.clone())
        return gen

    def first(self, hidden: torch.Tensor) -> int:
        self.generator = self._restore_generator()
        return self.sampler.pick(self.model.logits(hidden), self.generator)

    def finish(self, token: int) -> TextOutput:
        ids = [token]
        eos = self.model.eos_token_ids
        stop = "max_new_tokens"
        with torch.no_grad():
            while True:
                if self.model.position + 1 > self.model.max_len:
                    stop = "context"
                    break
                hidden = self.engine.extend(self.model.embed_tokens([ids[-1]]), source="decode")
                if ids[-1] in eos:
                    stop = "eos"
                    break
                if len(ids) >= self.sampler.max_new_tokens:
                    break
                ids.append(self.sampler.pick(self.model.logits(hidden[-1]), self.generator))
        if self.generator is not None:
            self.engine.meta_tensors[self.RNG_KEY] = self.generator.get_state()
        return TextOutput(tuple(ids), self.codec.decode(ids), stop)


def act_for(head: Head, engine: Engine, codec: TextCodec,
            columns: tuple[str, ...]) -> ContinuousAct | TokenAct:
    if isinstance(head, TokenSampler):
        return TokenAct(head, engine, codec)
    return ContinuousAct(head, columns)
