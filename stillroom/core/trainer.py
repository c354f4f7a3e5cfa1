"""The training loop, method-agnostic (nanoGPT's loop with FastVideo's roles).

    for step in steps:
        if data.select is due: method trains on the selector's examples from now (core.selection)
        for phase in method.phases(step):              # e.g. critic x N, then student
            for _ in range(phase.repeats):
                for micro in range(grad_accum):
                    loss = method.loss(phase.role, next_batch(), step) / grad_accum
                    loss.backward()                      # under bf16 autocast on CUDA
                average gradients across processes; clip; optimizer step; LR schedule
        EMA update; method.after_step; log; hooks; checkpoint

Resume is a branch at start-up: load the latest complete checkpoint (weights, optimizer, scheduler,
RNG, data position, method state) and continue; on CPU the result is bitwise identical to an
uninterrupted run. Only rank 0 writes; the saved student is a plain transformers/diffusers dir.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from stillroom.core import checkpoint, distributed
from stillroom.core.errors import StillroomError
from stillroom.core.fsio import atomic_dir, remove_stale_temps, write_json, write_text
from stillroom.core.host import Host, get_host
from stillroom.core.method import Context, Method, Role
from stillroom.core.provenance import versions
from stillroom.core.recipe import Recipe, TrainConfig
from stillroom.core.selection import DataSelection

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.world()[1])
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise StillroomError(f"unknown device '{name}'", "use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StillroomError("train.device asks for CUDA but no CUDA GPU is visible", "set train.device=cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA by default, none (fp32) elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise StillroomError("train.precision=fp16 needs a CUDA GPU", "use bf16 or fp32")
        return torch.float16
    return None


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


@dataclass
class Run:
    """A training run as the hooks see it."""

    recipe: Recipe
    run_dir: Path
    method: Method
    roles: dict[str, Role]
    step: int = 0
    rank: int = 0
    world_size: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class IndexStream:
    """Deterministic example order: epoch e is a permutation seeded by (seed, e).

    The position is a single integer, so resuming needs no iterator state; each process takes its
    own slice of every global batch.
    """

    def __init__(self, size: int, seed: int, rank: int, world_size: int) -> None:
        if size <= 0:
            raise StillroomError("the training data is empty", "check data.* in the recipe")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.position = 0
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _index(self, i: int) -> int:
        epoch, offset = divmod(i, self.size)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=gen)
        return int(self._order[offset])

    def next(self, batch_size: int) -> list[int]:
        start = self.position + self.rank * batch_size
        idx = [self._index(start + j) for j in range(batch_size)]
        self.position += batch_size * self.world
        return idx


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, host: Host | None = None) -> None:
        self.recipe, self.cfg = recipe, recipe.train
        self.run_dir = Path(run_dir)
        self.host = host or get_host()
        self.rank, _, self.world_size = distributed.world()
        self.device = resolve_device(self.cfg.device)
        distributed.init(self.device)
        self.autocast_dtype = resolve_precision(self.cfg.precision, self.device)

    # ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> Path:
        """Trains to ``train.steps`` and returns the saved student directory."""
        ckpt_root = self.run_dir / "checkpoints"
        latest = checkpoint.list_checkpoints(ckpt_root)
        self._check_run_dir(resume, latest)
        torch.manual_seed(self.cfg.seed + self.rank)
        method_cls = self.host.method(self.recipe.method_name)
        ctx = Context(self.device, torch.float32, self.run_dir, self.rank, self.world_size, self.cfg.seed)
        method: Method = method_cls(self.recipe, ctx)
        roles = method.build()
        if "student" not in roles or not roles["student"].trainable:
            raise StillroomError(
                f"method '{method.name}' built no trainable 'student' role", "fix the plugin"
            )
        method.roles = roles
        for name, role in roles.items():
            role.module.to(self.device)
            if role.aux is not None:
                role.aux.to(self.device)
            role.module.train(role.trainable)
            if not role.trainable:
                role.module.requires_grad_(False)
            else:
                distributed.broadcast_parameters(role.module)
                if role.aux is not None:
                    distributed.broadcast_parameters(role.aux)
            log.debug("role %s on %s", name, self.device)
        ema = self._make_ema(roles["student"].module)
        optims, scheds = self._optimizers(roles)
        selection = DataSelection.of(self.recipe, method, self.cfg.seed)  # None without data.select
        dataset = method.dataset()
        stream = IndexStream(len(dataset), self.cfg.seed, self.rank, self.world_size)
        run = Run(self.recipe, self.run_dir, method, roles, 0, self.rank, self.world_size)
        modules = self._checkpoint_modules(roles, ema)

        if resume and latest:
            optim_state, state = checkpoint.load(latest[-1], modules)
            for name, opt in optims.items():
                opt.load_state_dict(optim_state["optimizers"][name])
                scheds[name].load_state_dict(optim_state["schedulers"][name])
            if selection is not None:
                selection.load_state_dict(state["selection"])
                dataset, stream = self._selected_data(method, selection)
            run.step, stream.position = state["step"], state["data_position"]
            method.load_state_dict(state.get("method", {}))
            self._truncate_metrics(run.step)
            log.info("resumed from %s at step %d", latest[-1].name, run.step)
        elif self.rank == 0:
            if resume:
                log.info("no checkpoint was written before the run stopped: starting it again from step 0")
                self._truncate_metrics(0)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))

        self.host.call("on_train_start", run=run)
        writer = self._tensorboard()
        with self._progress(run.step) as advance:
            while run.step < self.cfg.steps:
                step = run.step
                started = time.perf_counter()
                selected = {}
                if selection is not None and selection.due(step):
                    selected = selection.select(step, self.cfg.steps)
                    dataset, stream = self._selected_data(method, selection)
                metrics = {
                    **self._train_step(method, roles, optims, scheds, dataset, stream, step),
                    **selected,
                }
                if ema is not None:
                    self._update_ema(ema, roles["student"].module)
                method.after_step(step, metrics)
                run.step = step + 1
                metrics["step_time_s"] = time.perf_counter() - started
                if self.cfg.eval_every and run.step % self.cfg.eval_every == 0 and run.step < self.cfg.steps:
                    evaluated = self._evaluate(method, ema or roles["student"].module)
                    metrics.update({f"eval/{k}": v for k, v in evaluated.items()})
                if run.step % self.cfg.log_every == 0 or run.step == self.cfg.steps:
                    self._log(run, metrics, writer)
                self.host.call("on_step_end", run=run, step=run.step, metrics=metrics)
                advance(metrics)
                every = self.cfg.checkpoint_every
                if (every and run.step % every == 0) or run.step == self.cfg.steps:
                    self._checkpoint(run, modules, optims, scheds, stream, method, selection)

        student_dir = self._finish(run, method, ema or roles["student"].module, writer)
        distributed.shutdown()
        return student_dir

    # ---------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool, latest: list[Path]) -> None:
        if resume:
            saved = self.run_dir / "recipe.yaml"
            if not latest and not saved.is_file():
                raise StillroomError(
                    f"nothing to resume in '{self.run_dir}': it has no complete checkpoint",
                    "run without --resume to start a new run",
                )
            if saved.is_file() and _read_yaml(saved) != _plain(self.recipe.to_dict()):
                raise StillroomError(
                    f"'{self.run_dir}' was started with a different recipe",
                    "resume with the same recipe and overrides, or choose another --out",
                )
            return
        if latest or (self.run_dir / "student").exists():
            raise StillroomError(
                f"run directory '{self.run_dir}' already holds a run",
                "pass --resume to continue it, or choose another --out",
            )

    def _make_ema(self, student: torch.nn.Module) -> torch.nn.Module | None:
        if self.cfg.ema is None:
            return None
        ema = copy.deepcopy(student).float().eval()
        ema.requires_grad_(False)
        return ema

    @torch.no_grad()
    def _update_ema(self, ema: torch.nn.Module, student: torch.nn.Module) -> None:
        decay = self.cfg.ema
        for e, s in zip(ema.parameters(), student.parameters(), strict=True):
            e.lerp_(s.detach().float(), 1.0 - decay)
        for e, s in zip(ema.buffers(), student.buffers(), strict=True):
            e.copy_(s)

    def _optimizers(self, roles: dict[str, Role]):
        optims, scheds = {}, {}
        for name, role in roles.items():
            if not role.trainable:
                continue
            params = role.parameters()
            if not params:
                raise StillroomError(
                    f"role '{name}' is trainable but has no parameters", "fix the method plugin"
                )
            optims[name] = torch.optim.AdamW(
                params,
                lr=role.lr or self.cfg.lr,
                betas=role.betas or self.cfg.betas,
                weight_decay=self.cfg.weight_decay if role.weight_decay is None else role.weight_decay,
                foreach=False,
            )
            scheds[name] = torch.optim.lr_scheduler.LambdaLR(optims[name], lr_lambda(self.cfg))
        return optims, scheds

    def _checkpoint_modules(self, roles: dict[str, Role], ema: torch.nn.Module | None):
        modules: dict[str, torch.nn.Module] = {}
        for name, role in roles.items():
            if role.checkpointed:
                modules[name] = role.module
                if role.aux is not None:
                    modules[f"{name}.aux"] = role.aux
        if ema is not None:
            modules["ema"] = ema
        return modules

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_step(self, method, roles, optims, scheds, dataset, stream, step) -> dict[str, float]:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for phase in method.phases(step):
            if phase.role not in optims:
                raise StillroomError(
                    f"method phase names role '{phase.role}' that has no optimizer", "fix the method plugin"
                )
            role = roles[phase.role]
            opt = optims[phase.role]
            for _ in range(phase.repeats):
                opt.zero_grad(set_to_none=True)
                for _ in range(self.cfg.grad_accum):
                    batch = method.collate([dataset[i] for i in stream.next(self.cfg.batch_size)])
                    with self._autocast():
                        out = method.loss(phase.role, batch, step)
                    if not torch.isfinite(out.loss):
                        raise StillroomError(
                            f"loss of role '{phase.role}' is {out.loss.item()} at step {step}",
                            "lower train.lr or enable train.clip_grad",
                        )
                    (out.loss / self.cfg.grad_accum).backward()
                    for key, value in {f"loss/{phase.role}": out.loss.item(), **out.metrics}.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                        counts[key] = counts.get(key, 0) + 1
                params = role.parameters()
                distributed.average_gradients(params)
                clip = role.clip_grad or self.cfg.clip_grad
                if clip:
                    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
                    sums[f"grad_norm/{phase.role}"] = sums.get(f"grad_norm/{phase.role}", 0.0) + float(norm)
                    counts[f"grad_norm/{phase.role}"] = counts.get(f"grad_norm/{phase.role}", 0) + 1
                opt.step()
        for sched in scheds.values():
            sched.step()
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics["lr"] = scheds["student"].get_last_lr()[0]
        return metrics

    def _evaluate(self, method: Method, student: torch.nn.Module) -> dict[str, float]:
        was_training = student.training
        student.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = method.evaluate(student)
        student.train(was_training)
        return {k: float(v) for k, v in result.items()}

    def _selected_data(self, method: Method, selection: DataSelection) -> tuple[Any, IndexStream]:
        """The method's data after a selection, and a fresh example order for it (seeded by the step)."""
        dataset = selection.dataset(method.dataset())
        return dataset, IndexStream(len(dataset), self.cfg.seed + selection.step, self.rank, self.world_size)

    def _checkpoint(self, run: Run, modules, optims, scheds, stream, method, selection) -> None:
        if self.rank == 0:
            optim_state = {
                "optimizers": {k: v.state_dict() for k, v in optims.items()},
                "schedulers": {k: v.state_dict() for k, v in scheds.items()},
            }
            state = {"data_position": stream.position, "method": method.state_dict()}
            if selection is not None:
                state["selection"] = selection.state_dict()
            path = checkpoint.save(
                self.run_dir / "checkpoints", run.step, modules, optim_state, state, self.cfg.keep_checkpoints
            )
            self.host.call("on_checkpoint", run=run, step=run.step, path=path)
        distributed.barrier()

    def _finish(self, run: Run, method: Method, student: torch.nn.Module, writer) -> Path:
        final = self._evaluate(method, student)
        replicas = distributed.gather(distributed.checksum(student))
        if len(set(replicas)) > 1:
            raise StillroomError(
                f"the {len(replicas)} processes ended with different student weights",
                "report this as a bug; the student was not saved",
            )
        student_dir = self.run_dir / "student"
        if self.rank == 0:
            with atomic_dir(student_dir) as tmp:
                method.save_student(student, tmp)
                write_json(tmp / "stillroom.json", self._student_card(method))
            if final:
                self._log(run, {**{f"eval/{k}": v for k, v in final.items()}, "final": 1.0}, writer)
            write_json(
                self.run_dir / "run.json",
                {
                    "format_version": 1,
                    "method": method.name,
                    "steps": run.step,
                    "world_size": self.world_size,
                    "replica_checksums": replicas,
                    "device": str(self.device),
                    "student": "student",
                    "final_eval": final,
                    "versions": versions(),
                },
            )
            self.host.call("on_train_end", run=run, student_dir=student_dir)
        if writer is not None:
            writer.close()
        distributed.barrier()
        return student_dir

    def _student_card(self, method: Method) -> dict[str, Any]:
        return {
            "format_version": 1,
            "method": method.name,
            "family": method.family,
            "recipe": self.recipe.to_dict(),
            "sampler": method.sampler(),
            "versions": versions(),
        }

    def _log(self, run: Run, metrics: dict[str, float], writer) -> None:
        if self.rank != 0:
            return
        record = {"step": run.step, **{k: round(float(v), 8) for k, v in metrics.items()}}
        run.history.append(record)
        path = self.run_dir / "metrics.jsonl"
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, run.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drops log lines past the resumed checkpoint so the log matches the weights."""
        path = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in kept))
        remove_stale_temps(self.run_dir)

    def _tensorboard(self):
        if self.rank != 0 or not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _progress(self, start: int):
        return _progress_bar(start, self.cfg.steps, enabled=self.rank == 0)


class _progress_bar:
    """A rich progress bar with loss and it/s (quiet on non-main ranks)."""

    def __init__(self, start: int, total: int, enabled: bool) -> None:
        self.start, self.total, self.enabled = start, total, enabled

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            disable=not self.enabled,
        )
        self.bar.start()
        self.task = self.bar.add_task("distill", total=self.total, completed=self.start, info="")
        return self._advance

    def _advance(self, metrics: dict[str, float]) -> None:
        info = f"loss {metrics.get('loss/student', float('nan')):.4f}  {1 / metrics['step_time_s']:.1f} it/s"
        self.bar.update(self.task, advance=1, info=info)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise StillroomError(
            f"run file '{path}' is unreadable or corrupt", "restore it, or start a new run with another --out"
        ) from err


def _plain(obj: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(obj, sort_keys=False))


def iter_metrics(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)
