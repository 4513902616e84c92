"""Prompt files: JSON lines, JSON arrays and Parquet read into PromptRecords; every malformed row gives an
error naming the file, the location and the fix, or is skipped and counted with on_error="skip"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npo_engine.data import DatasetError, LoadReport, PromptRecord, load_prompt_file, load_prompt_files


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------------- good files


def test_jsonl_basic(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "a", "prompt": "1+1?", "answer": "2", "difficulty": 3},
        {"id": 7, "prompt": "2+2?", "answer": 4},
    ])
    records, report = load_prompt_file(path)
    assert records == [
        PromptRecord(id="a", prompt="1+1?", answer="2", meta={"difficulty": 3, "source": "train.jsonl:1"}),
        PromptRecord(id="7", prompt="2+2?", answer="4", meta={"source": "train.jsonl:2"}),
    ]
    assert report == LoadReport(loaded=2, skipped=0, errors=[])


def test_missing_ids_default_to_stem_and_line_counting_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    # Line 2 is blank and ignored, but counted: the second record is on line 3, as an editor shows it.
    path.write_text('{"prompt": "p1", "answer": "a"}\n\n{"prompt": "p2", "answer": "b", "id": null}\n   \n')
    records, report = load_prompt_file(path)
    assert [r.id for r in records] == ["qa:1", "qa:3"]
    assert [r.meta["source"] for r in records] == ["qa.jsonl:1", "qa.jsonl:3"]
    assert report.loaded == 2


def test_id_field_none_ignores_id_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "p", "answer": "a"}])
    records, _ = load_prompt_file(path, id_field=None)
    assert records[0].id == "d:1"
    assert records[0].meta["id"] == "x"  # not used as the id, so kept as an ordinary field


def test_configurable_and_dotted_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "verl.jsonl", [{
        "question": "What is 3*4?",
        "reward_model": {"style": "rule", "ground_truth": "12"},
        "extra_info": {"index": 41},
        "data_source": "gsm8k",
    }])
    records, _ = load_prompt_file(
        path, prompt_field="question", answer_field="reward_model.ground_truth", id_field="extra_info.index"
    )
    (r,) = records
    assert (r.id, r.prompt, r.answer) == ("41", "What is 3*4?", "12")
    assert r.meta["data_source"] == "gsm8k"


def test_key_with_a_dot_is_matched_whole(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"q.text": "p", "answer": "a"}])
    records, _ = load_prompt_file(path, prompt_field="q.text")
    assert records[0].prompt == "p"


def test_chat_prompt_keeps_messages_and_uses_last_user_turn(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": "4"}])
    (r,), _ = load_prompt_file(path)
    assert r.prompt == "2+2?"
    assert r.meta["messages"] == messages


@pytest.mark.parametrize(
    ("answer", "expected", "answers"),
    [
        ("x^2", "x^2", None),
        (3, "3", None),
        (3.0, "3", None),  # integral floats drop ".0" so "3" exact-matches
        (0.25, "0.25", None),
        (["1/2", 0.5], "1/2", ["1/2", "0.5"]),  # first is the answer, all kept
    ],
    ids=["str", "int", "integral-float", "float", "list"],
)
def test_answer_normalization(
    tmp_path: Path, answer: object, expected: str, answers: list[str] | None
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": answer}])
    (r,), _ = load_prompt_file(path)
    assert r.answer == expected
    assert r.meta.get("answers") == answers


def test_reserved_meta_names_are_prefixed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "a", "source": "MATH"}])
    (r,), _ = load_prompt_file(path)
    assert r.meta["source"] == "a.jsonl:1"
    assert r.meta["row.source"] == "MATH"


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "p1", "answer": "1"}, {"prompt": "p2", "answer": "2"}]))
    records, _ = load_prompt_file(path)
    assert [r.id for r in records] == ["arr:1", "arr:2"]


def test_json_lines_in_dot_json_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"prompt": "p", "answer": "1"}])
    assert load_prompt_file(path)[0][0].answer == "1"


def test_parquet_verl_layout(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "train.parquet", [
        {
            "data_source": "gsm8k",
            "prompt": [{"role": "user", "content": f"q{i}"}],
            "reward_model": {"style": "rule", "ground_truth": str(i)},
            "extra_info": {"index": i},
        }
        for i in range(3)
    ])
    records, report = load_prompt_file(
        path, answer_field="reward_model.ground_truth", id_field="extra_info.index"
    )
    assert [(r.id, r.prompt, r.answer) for r in records] == [
        ("0", "q0", "0"), ("1", "q1", "1"), ("2", "q2", "2")
    ]
    assert records[1].meta["source"] == "train.parquet:row 1"
    assert records[1].meta["messages"] == [{"role": "user", "content": "q1"}]
    assert report.loaded == 3


def test_parquet_default_ids_use_zero_based_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}])
    records, _ = load_prompt_file(path)
    assert [r.id for r in records] == ["p:0", "p:1"]


def test_load_prompt_files_concatenates(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": "2"}, {"prompt": "r", "answer": "3"}])
    records, report = load_prompt_files([a, b])
    assert [r.id for r in records] == ["a:1", "b:1", "b:2"]
    assert report.loaded == 3
    assert load_prompt_files(str(a))[0][0].id == "a:1"  # one path as a string, not a sequence of chars


# ------------------------------------------------------------------------------------------- bad rows

# (row as written on line 2, a fragment of what is wrong, a fragment of the fix); line 1 is always valid.
BAD_ROWS = {
    "invalid-json": ('{"prompt": "p", "answer": ', "invalid JSON", "one JSON object"),
    "not-an-object": ("[1, 2]", "not an object", '{"prompt": ..., "answer": ...}'),
    "missing-prompt": ({"question": "p", "answer": "a"}, "missing field 'prompt'", "set data.prompt_field"),
    "missing-answer": ({"prompt": "p"}, "missing field 'answer'", "set data.answer_field"),
    "null-answer": ({"prompt": "p", "answer": None}, "missing field 'answer'", "set data.answer_field"),
    "prompt-wrong-type": ({"prompt": 5, "answer": "a"}, "is an int (5)", "set data.prompt_field"),
    "empty-prompt": ({"prompt": "  ", "answer": "a"}, "is empty", "fill it in or remove the row"),
    "bad-chat-message": ({"prompt": [{"role": "user"}], "answer": "a"}, "message 1", '"content": str'),
    "chat-without-user": (
        {"prompt": [{"role": "system", "content": "s"}], "answer": "a"}, "without a 'user'", "add one"
    ),
    "answer-wrong-type": ({"prompt": "p", "answer": {"x": 1}}, "is a dict", "set data.answer_field"),
    "answer-bool": ({"prompt": "p", "answer": True}, "is a bool", "set data.answer_field"),
    "empty-answer": ({"prompt": "p", "answer": ""}, "is empty", "fill it in"),
    "empty-answer-list": ({"prompt": "p", "answer": []}, "empty list", "at least one answer"),
    "bad-id": ({"prompt": "p", "answer": "a", "id": 1.5}, "ids must be", "set data.id_field"),
    "duplicate-id": ({"prompt": "p", "answer": "a", "id": "one"}, "duplicate id 'one'", "set data.id_field"),
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_malformed_row_raises_with_file_line_and_fix(tmp_path: Path, case: str) -> None:
    bad, what, fix = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "1", "id": "one"}, bad])
    with pytest.raises(DatasetError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert f"{path}: line 2: " in message
    assert what in message and fix in message
    assert "data.on_error='skip'" in message
    assert info.value.path == path and info.value.location == "line 2"


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_malformed_row_is_skipped_and_counted(tmp_path: Path, case: str) -> None:
    bad, what, _ = BAD_ROWS[case]
    good = [{"prompt": "ok", "answer": "1", "id": "one"}, {"prompt": "ok2", "answer": "2", "id": "two"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [good[0], bad, good[1]])
    records, report = load_prompt_file(path, on_error="skip")
    assert [r.id for r in records] == ["one", "two"]
    assert (report.loaded, report.skipped) == (2, 1)
    assert len(report.errors) == 1 and "line 2" in report.errors[0] and what in report.errors[0]


def test_invalid_utf8_row(tmp_path: Path) -> None:
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"prompt": "p", "answer": "a"}\n{"prompt": "\xff", "answer": "a"}\n')
    with pytest.raises(DatasetError, match=r"line 2: not valid UTF-8"):
        load_prompt_file(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "answer": "a"}\n')
    assert load_prompt_file(path)[0][0].prompt == "p"


def test_records_are_hashable(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "p", "answer": "a", "difficulty": 2}])
    (r,), _ = load_prompt_file(path)
    assert r in {r}


def test_skip_report_keeps_only_the_first_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "p", "answer": "a"}] + ["{oops"] * 20)
    records, report = load_prompt_file(path, on_error="skip")
    assert (report.loaded, report.skipped) == (1, 20)
    assert len(report.errors) == 5 and "line 2" in report.errors[0]


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1", "id": "q1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "answer": "1", "id": "q1"}])
    expected = r"b.jsonl: line 1: duplicate id 'q1' \(first seen at .*a.jsonl: line 1\)"
    with pytest.raises(DatasetError, match=expected):
        load_prompt_files([a, b])


def test_parquet_row_error_names_the_row(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}]
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(DatasetError, match=r"p.parquet: row 1: field 'prompt' \(the prompt\) is empty"):
        load_prompt_file(path)


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"question": "a", "answer": "1"}])
    for on_error in ("raise", "skip"):  # a missing column fails every row: always a file error
        expected = r"no column for data.prompt_field='prompt' \(columns: question, answer\)"
        with pytest.raises(DatasetError, match=expected):
            load_prompt_file(path, on_error=on_error)


# ---------------------------------------------------------------------------------------------- files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_prompt_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"empty.jsonl' contains no rows"):
        load_prompt_file(path)


def test_all_rows_skipped_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "{oops"])
    with pytest.raises(DatasetError, match=r"all 2 rows are malformed.*line 1: invalid JSON"):
        load_prompt_file(path, on_error="skip")


def test_unknown_suffix_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(DatasetError, match=r"suffix '.csv'; supported: .jsonl, .json, .parquet"):
        load_prompt_file(path)
    good = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        load_prompt_file(good, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data.prompt_field must be a non-empty"):
        load_prompt_file(good, prompt_field="")
    with pytest.raises(ValueError, match="got no paths"):
        load_prompt_files([])


def test_corrupt_json_array(tmp_path: Path) -> None:
    path = tmp_path / "arr.json"
    path.write_text('[{"prompt": "p", "answer": "1"},')
    with pytest.raises(DatasetError, match=r"arr.json' starts with '\[' but is not a valid JSON array"):
        load_prompt_file(path)
