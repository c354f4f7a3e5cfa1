"""Completion jobs: one batch of rows through the generation loop, text streamed back per choice.

Text is produced by decoding a choice's whole token list after each step and sending the new part.
Two things are held back until more tokens arrive: a trailing U+FFFD (half of a multi-byte
character) and a tail that could still grow into a stop string. A matched stop string cuts the text
before it and stops that row; the other rows of the batch continue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillroom.plugins.lm.runtime import LanguageModel
from stillroom.plugins.lm.sampling import SamplingParams
from stillroom.serve.server.batcher import Job
from stillroom.serve.server.metrics import Metrics


class LMJob(Job):
    """One request: ``prompts[i]`` (token ids) and ``params[i]`` per choice i; events go to ``queue``.

    Events: ("delta", choice, text) and ("done", choice, finish_reason, prompt_tokens, completion_tokens).
    """

    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], stops: list[str]) -> None:
        super().__init__()
        self.prompts, self.params, self.stops = prompts, params, stops
        self.size = len(prompts)


@dataclass
class ChoiceText:
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    done: bool = False

    def advance(self, model: LanguageModel, final: bool) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the choice)."""
        text = model.decode(self.ids)
        hits = [text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            end = min(hits)
            delta = text[self.sent : end] if end > self.sent else ""
            self.sent = max(self.sent, end)
            return delta, True
        end = len(text)
        if not final:
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
            hold = max((len(s) - 1 for s in self.stops), default=0)
            for k in range(min(hold, end - self.sent), 0, -1):
                if any(s.startswith(text[end - k : end]) for s in self.stops):
                    end -= k
                    break
        delta = text[self.sent : end]
        self.sent = end
        return delta, False


def run_lm_batch(model: LanguageModel, metrics: Metrics, jobs: list[LMJob]) -> None:
    owners: list[tuple[LMJob, int]] = [(job, i) for job in jobs for i in range(job.size)]
    prompts = [job.prompts[i] for job, i in owners]
    params = [job.params[i] for job, i in owners]
    texts = [ChoiceText(job.stops) for job, _ in owners]
    gen = model.generate(prompts, params)

    def finish(row: int, reason: str) -> None:
        job, choice = owners[row]
        texts[row].done = True
        job.put(("done", choice, reason, len(prompts[row]), len(texts[row].ids)))

    for event in gen:
        for row, token in enumerate(event.tokens):
            job, choice = owners[row]
            state = texts[row]
            if state.done:
                continue
            if job.cancelled:
                gen.cancel(row)
                state.done = True
                continue
            final = event.finished[row] is not None
            if token is not None:
                state.ids.append(token)
            if token is not None or final:
                delta, stopped = state.advance(model, final)
                if delta:
                    job.put(("delta", choice, delta))
                if stopped:
                    gen.cancel(row)
                    finish(row, "stop")
                    continue
            if final:
                finish(row, event.finished[row])
    for row, state in enumerate(texts):
        if not state.done:
            finish(row, "stop")
    metrics.generated(tokens=sum(len(t.ids) for t in texts))
