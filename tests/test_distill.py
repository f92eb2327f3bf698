"""Self-distillation corpora (the target's own answers) and fine-tuning a head from another (``--init``)."""

from __future__ import annotations

import json

import pytest
import torch

from eagle_runtime import EagleModel, load_head, load_target, save_head
from eagle_runtime.chat import encode_prompt, make_prompt
from eagle_runtime.train.distill import distill, main as distill_main, read_prompts
from eagle_runtime.draft import EagleHead
from eagle_runtime.drafter import head_config, init_head_
from eagle_runtime.draft3 import new_eagle3_head, random_head3
from eagle_runtime.train import Eagle3TrainConfig, TrainConfig, load_corpus, load_init, train_head, train_head3



@pytest.fixture(scope="module")
def target(lm_dir):
    return load_target(lm_dir, max_len=256)


def _prompt_files(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Where did the little cat go?", "answer": "home"},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Tell me a story."}]},
        {"turns": ["What is the best toy?", "and why?"]},
    ]))
    t = tmp_path / "s.txt"
    t.write_text("Once upon a time there was a dog.\nIt liked   to run.\n\nLily had a red ball. " + "She played. " * 60)
    return q, t


def test_prompts_are_first_user_turns_and_block_openings(tmp_path):
    q, t = _prompt_files(tmp_path)
    assert read_prompts(q) == ["Where did the little cat go?", "Tell me a story.", "What is the best toy?"]
    blocks = read_prompts(t, prompt_chars=50)
    assert blocks[0] == "Once upon a time there was a dog. It liked to run."
    assert len(blocks[1]) <= 50 and blocks[1].startswith("Lily had a red ball.") and not blocks[1].endswith(" ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: no user turn"):
        read_prompts(bad)


def test_rows_are_the_targets_own_greedy_answers(tmp_path, target, lm_tokenizer):
    tokenizer = lm_tokenizer
    q, t = _prompt_files(tmp_path)
    model = EagleModel(target, None, tokenizer, tree="dynamic", backend="torch")
    rows, summary = distill(model, [q, t], max_new_tokens=12, temperatures=(0.0,), batch_size=3, prompt_tokens=120,
                            prompt_chars=60, second_turns=1.0, progress=False)
    first = [r for r in rows if r["turns"] == 1]
    second = [r for r in rows if r["turns"] == 2]
    assert len(first) == 5 and len(second) == 5 and summary["rows"] == 10 and summary["turns"] == {"1": 5, "2": 5}
    assert summary["sources"] == {"q.jsonl": 3, "s.txt": 2}
    for r in rows:
        ids, mask = r["input_ids"], r["loss_mask"]
        n_prompt = mask.index(1)
        assert len(ids) == len(mask) and set(mask[:n_prompt]) == {0} and set(mask[n_prompt:]) == {1}
        assert n_prompt <= 120
        # the answer is plain greedy decoding of the prompt, token for token
        plain = model.generate([ids[:n_prompt]], max_new_tokens=12, speculative=False).tokens[0]
        assert ids[n_prompt:] == plain
    # a first turn's prompt is the chat form of its user turn; a second turn's holds the first answer as text
    texts = {tokenizer.decode(r["input_ids"][: r["loss_mask"].index(1)]) for r in second}
    assert all(s.count("User:") == 2 and s.count("Assistant:") == 2 for s in texts)
    want, _ = encode_prompt(tokenizer, make_prompt(tokenizer, [("Where did the little cat go?", None)]), 120)
    assert any(r["input_ids"][: len(want)] == want and r["loss_mask"].index(1) == len(want) for r in first)


def test_corpus_reads_token_id_rows_exactly(tmp_path, lm_tokenizer):
    tokenizer = lm_tokenizer
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"input_ids": [1, 5, 9, 7], "loss_mask": [0, 0, 1, 1]}) + "\n"
                 + json.dumps({"input_ids": [1, 8]}) + "\n")
    assert load_corpus(p, tokenizer) == [([1, 5, 9, 7], [0, 0, 1, 1]), ([1, 8], [1, 1])]
    for row, msg in [({"input_ids": [1, 99999]}, "token ids in"), ({"input_ids": []}, "non-empty"),
                     ({"input_ids": [1, 2], "loss_mask": [1]}, "same length"),
                     ({"input_ids": [1, 2], "loss_mask": [1, 2]}, "0/1")]:
        p.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=msg):
            load_corpus(p, tokenizer)


def test_distill_cli_writes_a_corpus_the_trainer_reads(tmp_path, lm_dir, lm_tokenizer):
    tokenizer = lm_tokenizer
    q, t = _prompt_files(tmp_path)
    out = tmp_path / "d.jsonl"
    args = ["--base", str(lm_dir), "--prompts", str(q), str(t), "--out", str(out), "--max-new-tokens", "8",
            "--temperatures", "0", "1", "--batch-size", "2", "--prompt-tokens", "32"]
    assert distill_main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["temperature"] for r in rows] == [0.0, 0.0, 1.0, 1.0, 0.0]  # temperatures taken in turn per batch
    assert [d for d in load_corpus(out, tokenizer)] == [(r["input_ids"], r["loss_mask"]) for r in rows]
    assert distill_main(args) == 2  # never replaced without --overwrite
    assert distill_main(args[:6] + [str(tmp_path / "d.txt")] + args[7:]) == 2  # not .jsonl
    assert distill_main(args + ["--overwrite", "--max-new-tokens", "999"]) == 2  # past the target's context


def test_init_starts_from_the_given_head(tmp_path, target, lm_tokenizer, lm_corpus):
    tokenizer, corpus = lm_tokenizer, lm_corpus
    start = EagleHead(head_config(target.cfg), target.max_len)
    init_head_(start, seed=7, std=0.2)
    save_head(start, tmp_path / "start")
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, lr=1e-9, warmup=0, eval_every=0, eval_batches=1,
                      save_every=0, init=str(tmp_path / "start"))
    train_head(target, corpus, tmp_path / "tuned", cfg, tokenizer=tokenizer, progress=False)
    a, b = load_head(tmp_path / "start", target).state_dict(), load_head(tmp_path / "tuned", target).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr 1e-9 moves nothing visible
    cfg.init = ""
    train_head(target, corpus, tmp_path / "fresh", cfg, tokenizer=tokenizer, progress=False)
    c = load_head(tmp_path / "fresh", target).state_dict()
    assert not torch.allclose(a["fc.weight"], c["fc.weight"], atol=1e-3)  # without --init: a different start
    # the other kind is refused in one line
    h3 = random_head3(target, 64, (0, 2, 4))
    save_head(h3, tmp_path / "h3")
    with pytest.raises(ValueError, match="holds a Eagle3Head"):
        load_init(str(tmp_path / "h3"), target, EagleHead)


def test_init_eagle3_keeps_its_vocabulary_and_taps(tmp_path, target, lm_tokenizer, lm_corpus):
    tokenizer, corpus = lm_tokenizer, lm_corpus
    vocab = torch.arange(3, 512, 5)[:90]
    start = new_eagle3_head(target, 90, (0, 2, 4), seed=3, std=0.1, vocab_ids=vocab)
    save_head(start, tmp_path / "start")
    cfg = Eagle3TrainConfig(steps=1, batch_size=2, seq_len=32, lr=1e-9, warmup=0, eval_every=0, eval_batches=1,
                            save_every=0, draft_vocab=40, ttt_steps=2, init=str(tmp_path / "start"))
    train_head3(target, corpus, tmp_path / "tuned", cfg, tokenizer=tokenizer, progress=False)
    tuned = load_head(tmp_path / "tuned", target)
    assert torch.equal(tuned.token_map, vocab) and tuned.target_taps == (0, 2, 4)
    a, b = load_head(tmp_path / "start", target).state_dict(), tuned.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # --taps names other layers (as many): the weights are kept, the head now reads those layers
    cfg.taps = "1,3,5"
    train_head3(target, corpus, tmp_path / "retapped", cfg, tokenizer=tokenizer, progress=False)
    retapped = load_head(tmp_path / "retapped", target)
    assert retapped.target_taps == (1, 3, 5) and torch.equal(retapped.token_map, vocab)
    assert all(torch.allclose(a[k].float(), v.float(), atol=1e-6) for k, v in retapped.state_dict().items())
    cfg.taps = "1,3"
    with pytest.raises(ValueError, match="reads 3 taps"):
        train_head3(target, corpus, tmp_path / "two_taps", cfg, tokenizer=tokenizer, progress=False)
