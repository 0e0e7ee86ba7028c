import json

import pytest
from _util import write_jsonl
from datasets import Dataset

from ftlab.data import IGNORE, DataError, encode, load_records, sft_dataset
from ftlab.models import tiny_tokenizer


def test_formats_detected(tmp_path):
    rows = {
        "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        "completion": {"prompt": "a", "completion": "b"},
        "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
        "verifiable": {"prompt": "1+1?", "answer": ["2", "two"], "reward": "numeric"},
    }
    for fmt, row in rows.items():
        records, got = load_records(write_jsonl(tmp_path / f"{fmt}.jsonl", [row]))
        assert got == fmt
        assert records[0]["_where"].endswith(":1")
    records, got = load_records(Dataset.from_list([rows["completion"]] * 3))
    assert got == "completion" and len(records) == 3


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", r"train.jsonl:7: not valid JSON"),
        (json.dumps({"prompt": "x"}), r"train.jsonl:7: missing field 'completion'"),
        (json.dumps({"prompt": "x", "completion": 3}), r"train.jsonl:7: field 'completion' must be a string"),
    ],
)
def test_bad_line_named(tmp_path, bad, match):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)] + [bad]
    with pytest.raises(DataError, match=match):
        load_records(write_jsonl(tmp_path / "train.jsonl", rows))


def test_wrong_role_and_empty(tmp_path):
    bad = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages\[0\].role'"):
        load_records(write_jsonl(tmp_path / "chat.jsonl", [bad]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_records(tmp_path / "empty.jsonl")


def test_loss_only_on_completion():
    tok = tiny_tokenizer()
    row = encode({"prompt": "Question?", "completion": "Answer"}, "completion", tok)
    learned = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=False) if lab != IGNORE])
    assert learned == "Answer<|im_end|>\n"
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>user\nQuestion?<|im_end|>")


def test_loss_on_every_assistant_turn_only():
    tok = tiny_tokenizer()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    row = encode({"messages": msgs}, "chat", tok)
    learned = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=False) if lab != IGNORE])
    assert learned == "A1<|im_end|>\nA2<|im_end|>\n"
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(row["input_ids"]) == full


def test_overlong_record_named(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c" * 300}]
    records, fmt = load_records(write_jsonl(tmp_path / "long.jsonl", rows))
    with pytest.raises(DataError, match=r"long.jsonl:2: record is \d+ tokens, over data.max_length=64"):
        sft_dataset(records, fmt, tiny_tokenizer(), max_length=64)
    assert len(sft_dataset(records, fmt, tiny_tokenizer(), max_length=64, truncate=True)[1]["input_ids"]) == 64
