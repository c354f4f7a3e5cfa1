"""The LM method family end to end on tiny models: each lowers its loss on the embedded corpus, TAID's
schedule, GKD's rollouts, SeqKD's response cache, hidden-state matching, student construction, the
vocabulary guard, the named recipes and ``stillroom eval``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from stillroom.core import recipe as recipes
from stillroom.core.errors import StillroomError
from stillroom.core.trainer import Trainer
from stillroom.testing import build_tiny_llama, build_tokenizer
from tests.conftest import lm_recipe

EMBEDDED = {"source": "embedded:shakespeare", "seq_len": 32, "max_train_tokens": 4096, "eval_tokens": 512}

METHODS = {
    "kd-fkl": {"name": "kd", "divergence": "fkl", "temperature": 2.0, "kd_ratio": 0.5},
    "kd-jsd": {"name": "kd", "divergence": "jsd", "beta": 0.3},
    "kd-srkl": {"name": "kd", "divergence": "srkl", "alpha": 0.2, "kd_ratio": 0.7},
    "kd-tvd": {"name": "kd", "divergence": "tvd", "kd_ratio": 0.5},
    "taid": {"name": "taid", "t_start": 0.9},
    "sinkhorn": {"name": "sinkhorn", "positions": 48, "kd_ratio": 0.5, "weight": 0.5},
    "gkd": {"name": "gkd", "lmbda": 1.0, "prompt_tokens": 8, "max_new_tokens": 16},
    "seqkd": {"name": "seqkd", "max_prompts": 16, "prompt_tokens": 8, "max_new_tokens": 16, "gen_batch": 8},
    "hidden": {"name": "hidden", "hidden_loss": "cosine"},
}


def recipe(teacher, corpus, method: dict, data: dict | None = None, **train):
    d = lm_recipe(teacher, corpus, **{"checkpoint_every": 0, **train})
    d["method"] = method
    if data is not None:
        d["data"] = {**d["data"], **data}
    return d


def fit(d, run_dir, resume=False):
    return Trainer(recipes.validate(d), run_dir).fit(resume=resume)


def logged(run_dir, key="loss/student"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.mark.parametrize("label", list(METHODS))
def test_short_run_lowers_the_methods_loss_on_the_embedded_corpus(tmp_path, tiny_teacher, corpus_dir, label):
    d = recipe(tiny_teacher, corpus_dir, METHODS[label], EMBEDDED, steps=24, lr=0.01)
    student_dir = fit(d, tmp_path / "run")
    losses = logged(tmp_path / "run")
    assert len(losses) == 24 and all(map(lambda x: x == x, losses))
    assert sum(losses[-6:]) / 6 < 0.95 * sum(losses[:6]) / 6, losses
    final = json.loads((tmp_path / "run" / "run.json").read_text())["final_eval"]
    assert final["perplexity"] > 1 and 0 <= final["top1_agreement"] <= 1
    assert (student_dir / "model.safetensors").is_file() and (student_dir / "tokenizer.json").is_file()


def test_taid_schedule_is_logged_monotone_above_the_ramp_and_resumes(tmp_path, tiny_teacher, corpus_dir):
    method = {"name": "taid", "t_start": 0.2, "t_end": 0.9, "alpha": 0.05}
    d = recipe(tiny_teacher, corpus_dir, method, steps=8, checkpoint_every=4)
    full = fit(d, tmp_path / "full")
    ts = logged(tmp_path / "full", "taid_t")
    assert len(ts) == 8 and ts[0] == pytest.approx(0.2)
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] > ts[0]
    for n, t in enumerate(ts[1:], 1):  # t used at step n was set after step n: >= the linear ramp there
        assert t >= 0.2 + 0.7 * n / 8 - 1e-12
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["method"]["t"] == pytest.approx(ts[4])
    # resume from step 4: same t trajectory, bitwise-identical student
    fit(d, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000008")
    shutil.rmtree(tmp_path / "part" / "student")
    resumed = fit(d, tmp_path / "part", resume=True)
    assert logged(tmp_path / "part", "taid_t") == ts
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_taid_update_follows_algorithm_1(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.taid import TAID

    rec = recipes.validate(
        recipe(
            tiny_teacher, corpus_dir, {"name": "taid", "t_start": 0.4, "alpha": 0.1, "beta": 0.5}, steps=100
        )
    )
    m = TAID(rec, Context(torch.device("cpu"), torch.float32, tmp_path))
    assert m.update_t(2.0, 1, 100) == pytest.approx(0.406)  # first call: no loss change yet, the ramp
    # relative change 0.5 -> momentum 0.25 -> t + 0.1 * sigmoid(0.25) * (1 - t)
    expected = 0.406 + 0.1 * (1 / (1 + torch.exp(torch.tensor(-0.25)).item())) * 0.594
    assert m.update_t(1.0, 2, 100) == pytest.approx(expected)
    m.t = 0.41
    assert m.update_t(1.0, 50, 100) == pytest.approx(0.7)  # the linear ramp floor wins


def test_sample_with_kv_cache_matches_full_recomputation_and_masks_after_eos(tiny_teacher):
    from transformers import AutoModelForCausalLM

    from stillroom.plugins.lm.generate import sample

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    prompt = torch.tensor([[5, 9, 17, 3], [40, 2, 8, 11]])
    ids, gen = sample(model, prompt, 6, temperature=0.0)
    ref = prompt
    for _ in range(6):
        ref = torch.cat([ref, model(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, ref)
    assert gen[:, :4].sum() == 0 and gen[:, 4:].all()
    eos = int(ref[0, 5])  # pretend the first row's second generated token is EOS
    ids, gen = sample(model, prompt, 6, temperature=0.0, eos_id=eos, pad_id=0)
    first = (ids[0, 4:] == eos).nonzero()[0].item() + 4
    assert gen[0, : first + 1].sum() == first + 1 - 4 and gen[0, first + 1 :].sum() == 0
    assert (ids[0, first + 1 :] == 0).all()


def test_gkd_mixes_on_policy_batches_masks_prompts_and_resumes_bitwise(tmp_path, tiny_teacher, corpus_dir):
    method = {"name": "gkd", "lmbda": 0.5, "seq_kd": True, "prompt_tokens": 5, "max_new_tokens": 6}
    d = recipe(tiny_teacher, corpus_dir, method, steps=8, checkpoint_every=4)
    full = fit(d, tmp_path / "full")
    sources = logged(tmp_path / "full", "source")
    assert set(sources) == {1.0, 2.0}  # teacher samples (seq_kd) and student samples both occur
    assert all(t <= 4 * 6 for t in logged(tmp_path / "full", "tokens"))  # only generated tokens count
    fit(d, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-0000008")
    shutil.rmtree(tmp_path / "part" / "student")
    resumed = fit(d, tmp_path / "part", resume=True)
    assert logged(tmp_path / "part", "source") == sources
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gkd_rollout_labels_only_generated_tokens(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.gkd import GKD

    rec = recipes.validate(
        recipe(tiny_teacher, corpus_dir, {"name": "gkd", "prompt_tokens": 4, "max_new_tokens": 5})
    )
    m = GKD(rec, Context(torch.device("cpu"), torch.float32, tmp_path))
    m.roles = m.build()
    batch = m.collate([m.dataset()[i] for i in range(3)])
    out = m.rollout(m.student, batch)
    assert torch.equal(out["input_ids"][:, :4], batch["input_ids"][:, :4])
    assert (out["labels"][:, :4] == -100).all()
    counted = out["labels"] != -100
    assert counted[:, 4:].any() and counted.sum(1).max() <= 5
    data = m.truncate(batch)
    assert data["input_ids"].shape[1] == 9 and (data["labels"][:, 4:] == batch["input_ids"][:, 4:9]).all()


def test_seqkd_caches_responses_resumes_generation_and_selects(
    tmp_path, tiny_teacher, corpus_dir, monkeypatch
):
    method = {
        "name": "seqkd",
        "max_prompts": 12,
        "prompt_tokens": 4,
        "max_new_tokens": 8,
        "gen_batch": 5,
        "keep_fraction": 0.5,
        "stages": [{"temperature": 0.0}, {"temperature": 1.0, "samples": 2}],
    }
    d = recipe(tiny_teacher, corpus_dir, method, steps=3)
    fit(d, tmp_path / "a")
    root = tmp_path / "a" / "seqkd"
    parts = sorted(root.glob("*.safetensors"))
    assert len(parts) == 3 * 3  # 3 stage/sample passes x ceil(12 / 5) chunks
    kept = json.loads((root / "selected.json").read_text())
    assert kept["total"] == 36 and len(kept["kept"]) == 18
    # an interrupted generation: one chunk missing, no selection yet -> only that chunk is redone, same bytes
    before = parts[4].read_bytes()
    shutil.copytree(root, tmp_path / "b" / "seqkd")
    (tmp_path / "b" / "seqkd" / parts[4].name).unlink()
    (tmp_path / "b" / "seqkd" / "selected.json").unlink()
    fit(d, tmp_path / "b")
    assert (tmp_path / "b" / "seqkd" / parts[4].name).read_bytes() == before
    assert json.loads((tmp_path / "b" / "seqkd" / "selected.json").read_text()) == kept
    # greedy stage: the teacher's argmax continuation
    first = load_file(str(root / "stage0-sample0-chunk00000.safetensors"))
    assert first["00000.generated"][:4].sum() == 0
    # a finished cache is reused without generating again
    import stillroom.plugins.lm.methods.seqkd as seqkd

    monkeypatch.setattr(seqkd, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    shutil.rmtree(tmp_path / "a" / "student")
    for ckpt in (tmp_path / "a" / "checkpoints").iterdir():
        shutil.rmtree(ckpt)
    fit(d, tmp_path / "a")


def test_seqkd_selection_prefers_sentences_the_teacher_finds_likelier(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.seqkd import SeqKD

    rec = recipes.validate(recipe(tiny_teacher, corpus_dir, {"name": "seqkd"}))
    m = SeqKD(rec, Context(torch.device("cpu"), torch.float32, tmp_path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m.teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    m.student = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    m.tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    ids = torch.tensor(m.tokenizer("To be. Or not to be.")["input_ids"])
    item = {"input_ids": ids, "labels": torch.cat([torch.full((2,), -100), ids[2:]])}
    assert m.sentence_score(item) == pytest.approx(0.0, abs=1e-5)  # identical models: no gap
    with torch.no_grad():
        m.student.lm_head.weight.add_(torch.randn_like(m.student.lm_head.weight))  # a worse student
    assert m.sentence_score(item) > 0.1


def test_hidden_projects_different_widths_by_index_and_module_path(tmp_path, tiny_teacher, corpus_dir):
    method = {
        "name": "hidden",
        "pairs": [[1, 2], ["model.layers.0.mlp", "model.layers.1.mlp"]],
        "hidden_loss": "mse",
        "kd_ratio": 0.3,
        "divergence": "rkl",
    }
    student = {
        "config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24},
        "init": "random",
    }
    d = recipe(tiny_teacher, corpus_dir, method, steps=12, lr=0.01, checkpoint_every=12)
    d["student"] = student
    out = fit(d, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000012"
    aux = load_file(str(ckpt / "student.aux.safetensors"))
    assert sorted(v.shape for v in aux.values()) == [torch.Size([32, 16])] * 2
    assert not any("0.weight" in k for k in load_file(out / "model.safetensors"))
    hidden = logged(tmp_path / "run", "hidden")
    assert hidden[-1] < hidden[0]


def test_hidden_default_pairs_are_uniform():
    from stillroom.plugins.lm.methods.hidden import uniform_pairs

    assert uniform_pairs(2, 4) == [(1, 2), (2, 4)]
    assert uniform_pairs(3, 12) == [(1, 4), (2, 8), (3, 12)]


def test_student_from_teacher_layers_copies_every_kth_block(tmp_path, corpus_dir):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.kd import KD

    teacher = tmp_path / "t4"
    tok = build_tokenizer(teacher, vocab_size=320, text=(corpus_dir / "train.txt").read_text())
    build_tiny_llama(teacher, tok, layers=4)
    d = recipe(teacher, corpus_dir, {"name": "kd"})
    d["student"] = {"config": {"num_hidden_layers": 2}, "init": "teacher-layers"}
    m = KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path))
    roles = m.build()
    s, t = roles["student"].module.state_dict(), roles["teacher"].module.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    d["student"] = {"config": {"num_hidden_layers": 2}, "init": "random"}
    m = KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path))
    s = m.build()["student"].module.state_dict()
    assert not torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])


def test_pretrained_student_path_and_vocabulary_guard(tmp_path, tiny_teacher, corpus_dir):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.kd import KD

    ok = tmp_path / "small"
    from transformers import AutoTokenizer

    build_tiny_llama(ok, AutoTokenizer.from_pretrained(tiny_teacher), layers=1, hidden=16, seed=3)
    d = recipe(tiny_teacher, corpus_dir, {"name": "kd"})
    d["student"] = {"path": str(ok)}
    roles = KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path)).build()
    assert roles["student"].module.config.hidden_size == 16
    other = tmp_path / "other"
    build_tiny_llama(
        other, build_tokenizer(other, vocab_size=300, text="completely different text " * 50), layers=1
    )
    d["student"] = {"path": str(other)}
    with pytest.raises(
        StillroomError, match=r"teacher '.*' \(\d+ tokens\) and student '.*other' \(\d+ tokens\)"
    ):
        KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path)).build()
    d["student"] = {"config": {"vocab_size": 999}, "init": "random"}
    with pytest.raises(StillroomError, match="predicts .* but student"):
        KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path)).build()


def test_prompt_response_jsonl_trains_on_responses_only(tmp_path, tiny_teacher):
    from stillroom.core.method import Context
    from stillroom.plugins.lm.methods.kd import KD

    data = tmp_path / "qa.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"Q{i}: to be?", "response": " or not to be."}) for i in range(12))
    )
    d = recipe(tiny_teacher, data, {"name": "kd", "kd_ratio": 0.5}, steps=3)
    m = KD(recipes.validate(d), Context(torch.device("cpu"), torch.float32, tmp_path))
    m.roles = m.build()
    batch = m.collate([m.dataset()[i] for i in range(4)])
    mask = m.loss_mask(batch)
    n_prompt = int(batch["prompt_len"][0])
    assert mask[0, : n_prompt - 1].sum() == 0 and mask[0, n_prompt - 1] == 1
    fit(d, tmp_path / "run")


@pytest.mark.parametrize(
    "name",
    ["lm-kd", "lm-taid", "lm-sinkhorn", "lm-gkd", "lm-seqkd", "lm-hidden", "lm-kd-cache", "lm-smollm2"],
)
def test_named_lm_recipes_validate(name):
    rec = recipes.load(name)
    assert rec.method_name in {"kd", "taid", "sinkhorn", "gkd", "seqkd", "hidden"}


def test_gpu_recipe_runs_on_tiny_models_of_the_same_family(tmp_path, tiny_teacher, corpus_dir):
    from transformers import AutoTokenizer

    small = tmp_path / "small"
    build_tiny_llama(small, AutoTokenizer.from_pretrained(tiny_teacher), layers=1, hidden=16, seed=1)
    rec = recipes.load(
        "lm-smollm2",
        [
            f"teacher.path={tiny_teacher}",
            f"student.path={small}",
            f"data.source={corpus_dir}",
            "data.seq_len=16",
            "data.eval_tokens=128",
            "train.steps=2",
            "train.batch_size=2",
            "train.device=cpu",
            "train.precision=fp32",
            "train.tensorboard=false",
            "train.warmup_steps=0",
            "train.eval_every=0",
        ],
    )
    out = Trainer(rec, tmp_path / "run").fit()
    assert (out / "model.safetensors").is_file()


def test_eval_command_prints_perplexity_agreement_and_samples(tmp_path, tiny_teacher, corpus_dir):
    from click.testing import CliRunner

    from stillroom.cli import cli
    from stillroom.core.host import get_host

    fit(recipe(tiny_teacher, corpus_dir, {"name": "kd"}, steps=2), tmp_path / "run")
    get_host().add_commands(cli)
    result = CliRunner().invoke(
        cli, ["eval", str(tmp_path / "run"), "--json", "--device", "cpu", "--tokens", "256"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    assert out["perplexity"] > 1 and 0 <= out["top1_agreement"] <= 1 and len(out["samples"]) == 2
    assert out["teacher"] == str(tiny_teacher)
    plain = CliRunner().invoke(
        cli,
        [
            "eval",
            str(tmp_path / "run" / "student"),
            "--data",
            str(corpus_dir),
            "--seq-len",
            "16",
            "--device",
            "cpu",
            "--samples",
            "1",
        ],
    )
    assert plain.exit_code == 0 and "perplexity" in plain.output
