"""Benchmark datasets: the packaged (truncated) ShareGPT file and random prompts."""

from __future__ import annotations

import io
import json

import pytest

from conveyor.bench import datasets
from conveyor.bench.datasets import (iter_json_array, length_range, load_bench_tokenizer,
                                     sample_random, sample_sharegpt, sharegpt_path)


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_bench_tokenizer("smollm2")
    assert tok is not None, "the default model's tokenizer should load in this environment"
    return tok


def test_sharegpt_from_the_installed_package(tokenizer):
    samples = sample_sharegpt(25, tokenizer, seed=0, max_len=1024)
    assert len(samples) == 25
    for s in samples:
        assert s.prompt and s.prompt_token_ids is None
        assert s.prompt_len >= 4 and s.output_len >= 4 and s.prompt_len + s.output_len <= 1024
        # The length is the tokenizer's count of the raw prompt, as the ingress will see it.
        assert s.prompt_len == len(tokenizer(s.prompt, add_special_tokens=True)["input_ids"])
    assert len({s.prompt for s in samples}) == 25


def test_sharegpt_is_deterministic_for_a_seed(tokenizer):
    a = sample_sharegpt(10, tokenizer, seed=3)
    assert a == sample_sharegpt(10, tokenizer, seed=3)
    assert a != sample_sharegpt(10, tokenizer, seed=4)


def test_the_packaged_file_is_read_to_its_cut(tokenizer):
    """The packaged JSON ends mid-record: parsing stops there, with every whole record read."""
    with open(sharegpt_path(), "rb") as f:
        f.seek(-200, io.SEEK_END)
        tail = f.read().decode("utf-8", "replace")
        assert not tail.rstrip().endswith("]"), "the file is expected to be truncated"
        f.seek(0)
        count, last = 0, None
        for last in iter_json_array(f):
            count += 1
    with open(sharegpt_path(), "rb") as f:
        data = f.read()
    assert count > 10000
    # The last record yielded is whole (its final reply is all there) and is the one right
    # before the cut: after it the file starts exactly one more record, never finished.
    after = data[data.rfind(json.dumps(last["id"]).encode()):]
    assert json.dumps(last["conversations"][-1]["value"]).encode()[-60:] in after
    assert after.count(b'"id":') == 1


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"Question number {i}: tell me about rivers and lakes."},
        {"from": "gpt", "value": f"Answer {i}: rivers flow into lakes, seas and oceans. " * 3}]}
        for i in range(n)]


@pytest.mark.parametrize("chunk", [16, 1 << 20])
@pytest.mark.parametrize("cut", ["mid-string", "after-comma", "mid-number", "complete"])
def test_truncated_json_yields_the_whole_records(tmp_path, monkeypatch, chunk, cut):
    monkeypatch.setattr(datasets, "_READ_CHUNK", chunk)  # small chunks: many buffer refills
    records = _records(5)
    text = json.dumps(records, indent=2)
    if cut == "mid-string":
        text = text[:text.index('"r4"') + 2]
    elif cut == "after-comma":
        text = text[:text.index('{\n    "id": "r4"')]
    elif cut == "mid-number":
        text = json.dumps([1, 2, 345])[:-2]  # "[1, 2, 34": the 34 must not be taken as whole
    path = tmp_path / "cut.json"
    path.write_text(text)
    with open(path, "rb") as f:
        got = list(iter_json_array(f))
    expected = {"mid-string": records[:4], "after-comma": records[:4], "mid-number": [1, 2],
                "complete": records}[cut]
    assert got == expected
    if cut != "mid-number":
        samples = sample_sharegpt(10, None, seed=0, path=path)
        assert len(samples) == len(expected)
        assert {s.prompt for s in samples} == {r["conversations"][0]["value"] for r in expected}


def test_sharegpt_skips_conversations_without_a_reply(tmp_path):
    records = _records(2) + [{"id": "x", "conversations": [{"from": "human", "value": "Hi?"}]},
                             {"id": "y", "conversations": [{"from": "gpt", "value": "Hello"},
                                                           {"from": "human", "value": "Hm"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    assert len(sample_sharegpt(10, None, path=path)) == 2


def test_random_lengths_stay_in_range(tokenizer):
    samples = sample_random(300, input_len=100, output_len=20, range_ratio=0.25,
                            tokenizer=tokenizer, seed=1)
    assert length_range(100, 0.25) == (75, 125) and length_range(20, 0.25) == (15, 25)
    assert all(75 <= s.prompt_len <= 125 and 15 <= s.output_len <= 25 for s in samples)
    assert all(len(s.prompt_token_ids) == s.prompt_len for s in samples)
    lens = {s.prompt_len for s in samples}
    assert min(lens) <= 80 and max(lens) >= 120  # spread over the range, not stuck
    special = set(tokenizer.all_special_ids)
    ids = [t for s in samples for t in s.prompt_token_ids]
    assert all(0 <= t < len(tokenizer) and t not in special for t in ids)
    assert samples == sample_random(300, 100, 20, 0.25, tokenizer, seed=1)
    assert samples != sample_random(300, 100, 20, 0.25, tokenizer, seed=2)


def test_random_fixed_lengths_and_words():
    fixed = sample_random(5, 16, 8, 0.0, None, seed=0)
    assert all(s.prompt_len == 16 and s.output_len == 8 for s in fixed)
    assert all(datasets.FALLBACK_VOCAB[0] <= t < datasets.FALLBACK_VOCAB[1]
               for s in fixed for t in s.prompt_token_ids)
    words = sample_random(5, 12, 4, 0.0, None, seed=0, kind="words")
    assert all(s.prompt_token_ids is None and len(s.prompt.split()) == 12 for s in words)


def test_several_input_lengths_make_a_mix_of_them():
    mixed = sample_random(300, [64, 64, 1024], 8, 0.1, None, seed=3)
    short = [s for s in mixed if 58 <= s.prompt_len <= 70]
    long = [s for s in mixed if 922 <= s.prompt_len <= 1126]
    assert len(short) + len(long) == 300 and 60 <= len(long) <= 140  # about a third
    assert all(len(s.prompt_token_ids) == s.prompt_len for s in mixed)
    # one length is what a single number gives
    assert sample_random(20, [100], 8, 0.2, None, seed=4) == sample_random(20, 100, 8, 0.2,
                                                                            None, seed=4)


def test_random_rejects_bad_arguments():
    with pytest.raises(ValueError, match="range ratio"):
        sample_random(1, 10, 10, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        sample_random(1, 0, 10)
    with pytest.raises(ValueError, match=">= 1"):
        sample_random(1, [10, 0], 10)
    with pytest.raises(ValueError, match="kind"):
        sample_random(1, 10, 10, kind="emoji")
