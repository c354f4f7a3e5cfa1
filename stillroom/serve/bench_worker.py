"""One benchmark target, measured in a fresh process: ``python -m stillroom.serve.bench_worker JOB.json``.

Loads the target through its registered runtime (timing the load); the family that owns the target
(``Family.bench``) times every batch size and gathers its quality figures, writing any arrays the
parent needs (``NAME.npy``, e.g. predictions to compare, a sample grid) beside ``result.json`` in the
job's directory. The job reaches ``Family.bench`` as written: ``target``, ``settings`` and whatever
the family's ``bench_inputs`` prepared for every target. A user error becomes ``{"error": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from stillroom.core.bench_plan import BenchSettings, Target
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import write_json
from stillroom.core.measure import peak_memory

log = logging.getLogger(__name__)


def run_job(job_path: Path) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job_path).parent
    target, settings = Target(**job["target"]), BenchSettings(**job["settings"])
    from stillroom.core.host import get_host

    try:
        host = get_host()
        factory = host.runtime(target.runtime)
        family = host.family_for_target(target.spec)
        start = time.perf_counter()
        model = factory(target.spec, name=target.name, **target.options)
        load_s = time.perf_counter() - start
        result: dict[str, Any] = {
            "kind": model.kind,
            "load_s": load_s,
            "provider": model.provider,
            "device": model.device,
        }
        result.update(family.bench(model, job, settings, out))
        for name in settings.metrics or [family.metric]:
            figures = host.metric(name)(model, job, settings, out)
            result.setdefault("quality", {}).update(figures.pop("quality", {}))
            result.update(figures)
        result.update(peak_memory())
    except StillroomError as err:
        write_json(out / "result.json", {"error": str(err)})
        return 1
    write_json(out / "result.json", result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(run_job(Path(sys.argv[1])))
