"""Opening the tokenizer folder of an artifact, with a damaged file reported as one line.

The manifest's hashes catch a file changed after export; this catches a tokenizer that was already
broken when hashed (or an artifact whose manifest was re-written), which transformers would report
as a traceback from deep inside its loaders.
"""

from __future__ import annotations

from pathlib import Path

from stillroom.core.errors import StillroomError


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # tokenizers / json / OS errors from a corrupt or incomplete folder
        reason = " ".join(str(err).split())[:200]
        raise StillroomError(
            f"cannot load the tokenizer in '{path}': {type(err).__name__}: {reason}",
            "the artifact is damaged; re-run `stillroom export`",
        ) from err
