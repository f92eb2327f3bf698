"""benchmarks/compare_heads.py: the trainers' held-out split as prompts, acceptance by depth, the result file."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from eagle_runtime.demo import DEMO_DIR
from eagle_runtime.train import TrainConfig, pack, prepare_training, split_heldout

from conftest import CORPUS, ROOT, SHARED_TWIN, require


def _bench():
    spec = importlib.util.spec_from_file_location("compare_heads", ROOT / "benchmarks" / "compare_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _id_corpus(path, n_docs: int, seed: int = 0):
    """Rows of token ids: a prompt of 5-12 tokens (not trained) and an answer of 20-40 (trained)."""
    rng = random.Random(seed)
    docs = []
    with open(path, "w") as f:
        for _ in range(n_docs):
            p, a = rng.randint(5, 12), rng.randint(20, 40)
            ids = [1] + [rng.randrange(3, 500) for _ in range(p + a - 1)]
            mask = [0] * p + [1] * a
            docs.append((ids, mask))
            f.write(json.dumps({"input_ids": ids, "loss_mask": mask}) + "\n")
    return docs


def test_split_heldout_is_the_trainers_split(tmp_path):
    docs = _id_corpus(tmp_path / "c.jsonl", 60)
    held, train = split_heldout(docs, seed=3, fraction=0.1)
    assert len(held) == 6 and len(train) == 54
    assert sorted(map(str, held + train)) == sorted(map(str, docs))  # a partition, nothing lost
    assert split_heldout(docs, 3, 0.1) == (held, train) and split_heldout(docs, 4, 0.1)[0] != held
    cfg = TrainConfig(seq_len=32, seed=3, holdout_fraction=0.1)
    _, train_rows, hold_rows = prepare_training(DEMO_DIR / "target", tmp_path / "c.jsonl", tmp_path / "out", cfg,
                                                resume=False, overwrite=False, tokenizer=None, max_len=64)
    for got, want in ((hold_rows, pack(held, 32)), (train_rows, pack(train, 32))):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_heldout_prompts_are_the_held_out_documents_first_turns(tmp_path):
    from eagle_runtime.text import load_tokenizer

    bench, tok = _bench(), load_tokenizer(DEMO_DIR / "target")
    docs = _id_corpus(tmp_path / "c.jsonl", 40, seed=1)
    held, _ = split_heldout(docs, 0, 0.25)
    got = bench.heldout_prompts([str(tmp_path / "c.jsonl")], tok, 0, 0.25, prompt_tokens=4)
    assert got == [ids[: mask.index(1)] for ids, mask in held]
    # a plain-text document (trained from its first token) gives its first --prompt-tokens tokens
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids, _ in docs))
    assert bench.heldout_prompts([str(tmp_path / "t.jsonl")], tok, 0, 0.25, 4) == [ids[:4] for ids, _ in held]


def test_accept_by_depth():
    bench = _bench()
    # 4 cycles: 0, 1, 2, 2 drafts accepted
    assert bench.accept_by_depth([1, 2, 3, 3], 3) == [0.75, round(2 / 3, 4), 0.0]
    assert bench.accept_by_depth([1, 1], 2) == [0.0, None]


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=SHARED_TWIN)],
                         ids=["heldout", "heldout+stories+mtbench"])
def test_compare_heads_writes_every_head_and_tree(tmp_path, shared):
    """Two held-out sets from token-id corpora (every clone), and with the shared data its story openings and
    MT-bench questions beside one of them."""
    bench = _bench()
    _id_corpus(tmp_path / "c.jsonl", 40, seed=2)
    if shared:
        require(CORPUS / "tinystories_extra.txt")
        require(bench.DEFAULT_QUESTIONS)
        sets = [f"heldout:{tmp_path / 'c.jsonl'}", "stories", "mtbench"]
    else:
        _id_corpus(tmp_path / "d.jsonl", 40, seed=3)
        sets = [f"heldout:{tmp_path / 'c.jsonl'}", f"heldout:{tmp_path / 'd.jsonl'}"]
    res = bench.main(["--base", str(DEMO_DIR / "target"), "--heads", f"a={DEMO_DIR / 'head'}",
                      f"b={DEMO_DIR / 'head3'}", "--prompts", *sets, "--num-prompts", "2", "--trees", "6,5,1", "4,2,2", "--max-new-tokens", "12", "--threads", "1",
                      "--out", str(tmp_path / "res")])
    (path,) = (tmp_path / "res").glob("compare_heads_*.json")
    assert json.loads(path.read_text()) == res
    assert res["head_types"] == {"a": "eagle1", "b": "eagle3"}
    assert set(res["sets"]) == set(sets)
    for s in sets:
        out = res["sets"][s]
        assert out["prompts"] == 2 and set(out["trees"]) == {"6,5,1", "4,2,2"}
        for spec, depth in (("6,5,1", 6), ("4,2,2", 3)):  # the deepest node: depth + 1 (DynamicTree.max_depth)
            for name in "ab":
                r = out["trees"][spec][name]
                assert r["identical_to_plain"] == "2/2"
                assert len(r["accept_by_depth"]) == depth and 1 <= r["tau"] <= depth + 1
                # tau = 1 + the expected drafts accepted = 1 + sum over depths of P(reach depth)
                reach, exp = 1.0, 1.0
                for a in r["accept_by_depth"]:
                    reach *= a or 0.0
                    exp += reach
                assert exp == pytest.approx(r["tau"], abs=2e-3)


@pytest.mark.parametrize("argv, msg", [
    (["--heads", "x"], "give NAME=DIR"),
    (["--heads", "a=d", "--trees", "8,7"], "three integers"),
    (["--heads", "a=d", "--trees", "8,x,1"], "total_tokens,depth,top_k"),
    (["--heads", "a=d", "--prompts", "heldout:"], "heldout:FILE"),
    (["--heads", "a=d", "--prompts", "mt-bench"], "stories or mtbench"),
    (["--heads", "a=d", "--holdout-fraction", "1"], "(0, 1)"),
])
def test_compare_heads_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _bench().parse_args(["--base", "t", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
