"""rlhf_data: real files in every supported format -> validated rows, one-line errors naming file,
row and field, skipping with a report, and mixing by probability."""

import json
import pickle
from collections import Counter
from functools import partial

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_data import (
    DataError,
    PreferenceKeys,
    SkipReport,
    load_rows,
    mix_datasets,
    read_records,
    split_eval,
    split_paths,
    validate_conversation,
    validate_preference,
    validate_prompt,
)

datasets.disable_progress_bars()

GOOD = [
    {"message": "What is 2+2?", "chose": "4", "reject": "5", "margin": 0.75},
    {"message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chose": "Paris", "reject": "Lyon", "margin": None},
    {"message": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Tell a joke."}], "chose": "Why did...", "reject": "No.", "margin": 2.0},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def error_of(path: str) -> DataError:
    """The DataError that load_rows raises for the preference file ``path``."""
    with pytest.raises(DataError) as info:
        load_rows(path, validate_preference)
    return info.value


def pref_row(**changes) -> str:
    return json.dumps({**GOOD[0], **changes})


# ---------------------------------------------------------------- one bad row, one clear line


def test_broken_json_line(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), '{"message": "hi", "chose": ', pref_row()])
    err = error_of(path)
    assert (err.path, err.row, err.field) == (path, 2, None)
    assert str(err) == f"{path}:2: invalid JSON: Expecting value (column 28)"


def test_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), pref_row(), '["a", "b"]'])
    assert str(error_of(path)) == f"{path}:3: expected a JSON object, got list"


def test_missing_key_lists_the_keys_present(tmp_path):
    row = {"message": "hi", "chosen": "a", "reject": "b"}
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), json.dumps(row)])
    err = error_of(path)
    assert (err.row, err.field) == (2, "chose")
    assert str(err) == f"{path}:2: field 'chose': missing (the row has keys: chosen, message, reject)"


def test_wrong_type_for_chosen(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), pref_row(), pref_row(chose=17)])
    err = error_of(path)
    assert isinstance(err, ValueError)
    assert str(err) == f"{path}:3: field 'chose': expected a non-empty string, got int"


def test_empty_and_blank_responses(tmp_path):
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(reject="")])
    assert str(error_of(path)) == f"{path}:1: field 'reject': expected a non-empty string, got an empty string"
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(chose=" \n ")])
    assert str(error_of(path)) == f"{path}:1: field 'chose': expected a non-empty string, got only whitespace"
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(reject=None)])
    assert str(error_of(path)) == f"{path}:1: field 'reject': expected a non-empty string, got null"


def test_unknown_role_names_the_turn(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
             {"role": "human", "content": "and?"}]
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(message=turns)])
    err = error_of(path)
    assert err.field == "message[2].role"
    assert str(err) == (f"{path}:1: field 'message[2].role': expected one of system, user, assistant, "
                        "got 'human'")


def test_system_turn_only_first(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(message=turns)])
    assert str(error_of(path)) == f"{path}:1: field 'message[1].role': a system turn may only be the first turn"


def test_prompt_ending_with_assistant_turn(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), pref_row(message=turns)])
    assert str(error_of(path)) == f"{path}:2: field 'message': a prompt must end with a user turn, ends with assistant"


def test_bad_turn_shapes(tmp_path):
    cases = {
        "": "field 'message': expected a non-empty string, got an empty string",
        "[]": "field 'message': expected at least one turn, got an empty list",
        "3": "field 'message': expected a list of turns or a string, got int",
        '["hi"]': "field 'message[0]': expected a turn {role, content}, got string",
        '[{"content": "hi"}]': "field 'message[0].role': missing (expected one of system, user, assistant)",
        '[{"role": "user"}]': "field 'message[0].content': missing",
        '[{"role": "user", "content": 5}]': "field 'message[0].content': expected a non-empty string, got int",
    }
    for message, expected in cases.items():
        value = "" if message == "" else json.loads(message)
        path = write_lines(tmp_path / "prefs.jsonl", [pref_row(message=value)])
        assert str(error_of(path)) == f"{path}:1: {expected}"


def test_non_finite_and_non_numeric_margin(tmp_path):
    # Python's json reads the NaN / Infinity literals that json.dumps writes for such floats.
    for margin, shown in [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")]:
        path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), pref_row(margin=margin)])
        assert str(error_of(path)) == f"{path}:2: field 'margin': expected a finite number, got {shown}"
    for margin, shown in [("0.5", "string"), (True, "bool")]:
        path = write_lines(tmp_path / "prefs.jsonl", [pref_row(margin=margin)])
        assert str(error_of(path)) == f"{path}:1: field 'margin': expected a finite number, got {shown}"


def test_margin_absent_or_null_is_zero(tmp_path):
    no_margin = {k: v for k, v in GOOD[0].items() if k != "margin"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [no_margin, {**no_margin, "margin": None}, {**no_margin, "margin": 3}])
    rows, _ = load_rows(path, validate_preference)
    assert [r["margin"] for r in rows] == [0.0, 0.0, 3.0]
    assert all(type(r["margin"]) is float for r in rows)


def test_invalid_utf8_spoils_only_its_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = [json.dumps(r, ensure_ascii=False).encode() for r in GOOD]
    path.write_bytes(good[0] + b"\n" + b'{"message": "caf\xe9", "chose": "a", "reject": "b"}\n'
                     + good[1] + b"\n" + good[2] + b"\n")
    with pytest.raises(DataError) as info:
        load_rows(str(path), validate_preference)
    assert str(info.value) == f"{path}:2: invalid UTF-8 (byte 17 of the line)"

    rows, report = load_rows(str(path), validate_preference, skip_bad_rows=True)
    assert [r["_row"] for r in rows] == [1, 3, 4]
    assert [r["chosen"] for r in rows] == ["4", "Paris", "Why did..."]
    assert (report.total, report.kept, [e.row for e in report.skipped]) == (4, 3, [2])


def test_file_level_errors(tmp_path):
    def raised(path) -> str:
        with pytest.raises(DataError) as info:
            read_records(path)
        return str(info.value)

    def raised_while_reading(path) -> str:
        with pytest.raises(DataError) as info:
            list(read_records(path))
        return str(info.value)

    missing = tmp_path / "nope.jsonl"
    assert raised(missing) == f"{missing}: no such file or folder"
    csv = tmp_path / "prefs.csv"
    csv.write_text("a,b\n")
    assert raised(csv) == (f"{csv}: unknown file type '.csv'; expected .jsonl, .json, .parquet, "
                           "or a folder written by datasets' save_to_disk")
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    assert raised(folder).startswith(f"{folder}: a folder without dataset_info.json or state.json")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert raised_while_reading(empty) == f"{empty}: no rows (empty file)"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert raised_while_reading(blank) == f"{blank}: no rows (empty file)"
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(empty), validate_preference, skip_bad_rows=True)  # skipping never hides a file

    empty_json = tmp_path / "empty.json"
    empty_json.write_text("[]")
    assert raised_while_reading(empty_json) == f"{empty_json}: no rows (empty list)"
    not_list = tmp_path / "dict.json"
    not_list.write_text('{"message": ["a"], "chose": ["b"]}')
    assert raised_while_reading(not_list) == f"{not_list}: expected a list of objects at the top level, got object"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"message": "hi",\n   "chose": "a"\n   "reject": "b"}\n]\n')
    assert raised_while_reading(broken) == f"{broken}:4: invalid JSON: Expecting ',' delimiter (column 4)"
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text(pref_row() + "\n" + pref_row() + "\n")
    assert raised_while_reading(jsonl_named_json) == (
        f"{jsonl_named_json}:2: invalid JSON: Extra data (column 1); one object per line is JSON Lines: "
        "name the file .jsonl")

    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    assert raised_while_reading(not_parquet).startswith(f"{not_parquet}: cannot read as parquet: ")
    splits = tmp_path / "dict_folder"
    datasets.DatasetDict(train=datasets.Dataset.from_list(GOOD[:1])).save_to_disk(str(splits))
    assert raised(splits) == (f"{splits}: a DatasetDict folder (splits: train); pass one split's folder, "
                              f"e.g. {splits / 'train'}")


def test_json_element_that_is_not_an_object(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([GOOD[0], "oops", GOOD[1]]))
    with pytest.raises(DataError) as info:
        load_rows(str(path), validate_preference)
    assert str(info.value) == f"{path}:2: expected a JSON object, got string"


# ---------------------------------------------------------------- skipping


def test_skip_bad_rows_counts_and_names_them(tmp_path):
    lines = [pref_row(), pref_row(reject=""), "{not json", pref_row(), pref_row(chose=3), pref_row()]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    rows, report = load_rows(path, validate_preference, skip_bad_rows=True)
    assert [r["_row"] for r in rows] == [1, 4, 6]
    assert (report.total, report.kept) == (6, 3)
    assert [(e.row, e.field) for e in report.skipped] == [(2, "reject"), (3, None), (5, "chose")]
    assert report.summary() == (
        f"skipped 3 of 6 rows ({path}:2: field 'reject': expected a non-empty string, got an empty string; "
        f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2); "
        f"{path}:5: field 'chose': expected a non-empty string, got int)")


def test_skip_summary_names_ten_then_counts(tmp_path):
    lines = [pref_row()] + [pref_row(chose="") for _ in range(14)]
    path = write_lines(tmp_path / "prefs.jsonl", lines)
    rows, report = load_rows(path, validate_preference, skip_bad_rows=True)
    assert len(rows) == 1 and len(report.skipped) == 14
    summary = report.summary()
    assert summary.startswith(f"skipped 14 of 15 rows ({path}:2: field 'chose'")
    assert summary.endswith(f"{path}:11: field 'chose': expected a non-empty string, got an empty string; and 4 more)")
    assert f"{path}:12:" not in summary
    assert SkipReport(total=5, kept=5).summary() == "kept all 5 rows"


def test_a_file_with_no_valid_row_stops_even_when_skipping(tmp_path):
    """Every row failing is a wrong --chosen_key or the wrong file, not noise to skip."""
    path = write_lines(tmp_path / "prefs.jsonl", [pref_row(), pref_row()])
    with pytest.raises(DataError) as info:
        load_rows(path, partial(validate_preference, keys=PreferenceKeys(chosen_key="chosen")), skip_bad_rows=True)
    assert str(info.value) == (f"{path}: all 2 rows are invalid, the first: {path}:1: field 'chosen': "
                               "missing (the row has keys: chose, margin, message, reject)")


def test_data_error_survives_pickling():
    err = DataError("a.jsonl", 3, "chose", "expected a non-empty string, got int")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.path, copy.row, copy.field, str(copy)) == (err.path, err.row, err.field, str(err))
    assert str(DataError(None, None, "chose", "missing")) == "field 'chose': missing"


# ---------------------------------------------------------------- formats and paths

EXPECTED_ROWS = [
    {"message": [{"role": "user", "content": "What is 2+2?"}], "chosen": "4", "rejected": "5", "margin": 0.75},
    {"message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris", "rejected": "Lyon", "margin": 0.0},
    {"message": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": "Tell a joke."}], "chosen": "Why did...", "rejected": "No.", "margin": 2.0},
]


def test_every_format_gives_the_same_rows(tmp_path):
    # Arrow needs one type per column: the messages as lists of turns (a string prompt is tested above).
    records = [{**r, "message": [{"role": "user", "content": r["message"]}]} if isinstance(r["message"], str) else r
               for r in GOOD]
    paths = {
        "jsonl": write_jsonl(tmp_path / "p.jsonl", records),
        "json": str(tmp_path / "p.json"),
        "parquet": str(tmp_path / "p.parquet"),
        "disk": str(tmp_path / "p_saved"),
    }
    (tmp_path / "p.json").write_text(json.dumps(records, indent=2))
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    datasets.Dataset.from_list(records).save_to_disk(paths["disk"])

    for kind, path in paths.items():
        rows, report = load_rows(path, validate_preference)
        assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows] == EXPECTED_ROWS, kind
        assert [(r["_source"], r["_row"]) for r in rows] == [(path, 1), (path, 2), (path, 3)], kind
        assert (report.total, report.kept, report.skipped) == (3, 3, [])


def test_several_paths_keep_their_own_row_numbers(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [pref_row(), "", pref_row(chose="A3")])
    b = str(tmp_path / "b.json")
    (tmp_path / "b.json").write_text(json.dumps([GOOD[1], GOOD[2]]))
    assert split_paths([f" {a} ", b, ""]) == [a, b]
    assert split_paths(tmp_path / "b.json") == [b]  # one path (a flag's comma list arrives as a list)
    for paths in ([a, b], (a, tmp_path / "b.json")):
        rows, report = load_rows(paths, validate_preference)
        assert [(r["_source"], r["_row"]) for r in rows] == [(a, 1), (a, 3), (b, 1), (b, 2)]
        assert [r["chosen"] for r in rows] == ["4", "A3", "Paris", "Why did..."]
        assert report.total == 4

    bad_b = write_jsonl(tmp_path / "c.jsonl", [GOOD[0], {**GOOD[0], "reject": 1}])
    with pytest.raises(DataError) as info:
        load_rows([a, bad_b], validate_preference)
    assert str(info.value) == f"{bad_b}:2: field 'reject': expected a non-empty string, got int"
    with pytest.raises(ValueError, match="no data paths given"):
        load_rows([" ", ""], validate_preference)
    with pytest.raises(DataError, match="no such file"):  # a string is one path: no comma splitting here
        load_rows(f"{a},{b}", validate_preference)


# ---------------------------------------------------------------- SFT conversations and RL prompts


def test_conversation_and_prompt_validators(tmp_path):
    conversations = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A", "name": "bot"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": "just text"},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", conversations)
    rows, report = load_rows(path, validate_conversation, skip_bad_rows=True)
    assert rows[1] == {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}], "_source": path, "_row": 2}
    assert [str(e) for e in report.skipped] == [
        f"{path}:3: field 'messages': a conversation must end with an assistant turn, ends with user",
        f"{path}:4: field 'messages': expected a list of turns or a string, got string",
    ]

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"message": "Write a poem."}, {"prompt": "x"}])
    rows, report = load_rows(prompts, validate_prompt, skip_bad_rows=True)
    assert rows == [{"message": [{"role": "user", "content": "Write a poem."}], "_source": prompts, "_row": 1}]
    assert str(report.skipped[0]) == f"{prompts}:2: field 'message': missing (the row has keys: prompt)"
    assert validate_prompt({"q": "x"}, key="q") == {"message": [{"role": "user", "content": "x"}]}


def test_custom_preference_keys():
    keys = PreferenceKeys(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", margin_key="strength")
    row = validate_preference({"prompt": "p", "chosen": "c", "rejected": "r", "strength": 1}, keys)
    assert row == {"message": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r", "margin": 1.0}


# ---------------------------------------------------------------- mixing


def tagged(name: str, n: int) -> list[dict]:
    return [{"name": name, "i": i} for i in range(n)]


def test_mix_follows_the_probabilities():
    mixed = mix_datasets([tagged("a", 2000), tagged("b", 2000)], [0.8, 0.2], seed=0)
    names = list(mixed["name"])
    first = Counter(names[:2000])
    assert abs(first["a"] / 2000 - 0.8) < 0.03
    # Weights are normalised: 4:1 is 0.8:0.2, the same draw.
    assert list(mix_datasets([tagged("a", 2000), tagged("b", 2000)], [4, 1], seed=0)["name"]) == names
    # all_exhausted: every row of both datasets appears.
    assert {(r["name"], r["i"]) for r in mixed} == {(n, i) for n in "ab" for i in range(2000)}
    even = mix_datasets([tagged("a", 300), tagged("b", 300)], (0.5, 0.5), seed=1)
    assert 120 <= list(even["name"][:300]).count("a") <= 180


def test_mix_single_list_and_no_probs():
    single = mix_datasets([tagged("a", 5)], None, seed=0)
    assert isinstance(single, datasets.Dataset) and list(single["i"]) == [0, 1, 2, 3, 4]
    assert list(mix_datasets([tagged("a", 5)], [1.0], seed=0)["i"]) == [0, 1, 2, 3, 4]
    both = mix_datasets([tagged("a", 2), tagged("b", 3)], None, seed=0)
    assert list(both["name"]) == ["a", "a", "b", "b", "b"]
    assert list(mix_datasets([tagged("a", 2), tagged("b", 3)], [], seed=0)["name"]) == list(both["name"])  # no weights


def test_mix_rejects_bad_probs():
    lists = [tagged("a", 10), tagged("b", 10)]
    with pytest.raises(ValueError, match=r"--dataset_probs has 3 value\(s\) \[0.5, 0.3, 0.2\] for 2 dataset\(s\)"):
        mix_datasets(lists, [0.5, 0.3, 0.2], seed=0)
    with pytest.raises(ValueError, match=r"--dataset_probs has 1 value\(s\)"):
        mix_datasets(lists, [1.0], seed=0)
    with pytest.raises(ValueError, match="weight 2 is 0; every weight must be a positive number"):
        mix_datasets(lists, [1.0, 0], seed=0)
    with pytest.raises(ValueError, match="weight 1 is -0.5"):
        mix_datasets(lists, [-0.5, 1.5], seed=0)
    with pytest.raises(ValueError, match="weight 1 is nan"):
        mix_datasets(lists, [float("nan"), 1.0], seed=0)
    with pytest.raises(ValueError, match="expected a list of numbers, not a string"):  # the config parses flags
        mix_datasets(lists, "0.5,0.5", seed=0)
    with pytest.raises(ValueError, match="dataset 2 of 2 has no rows"):
        mix_datasets([tagged("a", 3), []], [0.5, 0.5], seed=0)


def test_split_eval():
    dataset = datasets.Dataset.from_list(tagged("a", 100))
    train, held_out = split_eval(dataset, 0.29, seed=0)
    assert (len(train), len(held_out)) == (71, 29)
    assert sorted(list(train["i"]) + list(held_out["i"])) == list(range(100))
    again_train, _ = split_eval(dataset, 0.29, seed=0)
    assert list(again_train["i"]) == list(train["i"])
    with pytest.raises(ValueError, match="eval_split 0.01 of 50 rows leaves the eval set empty"):
        split_eval(datasets.Dataset.from_list(tagged("a", 50)), 0.01, seed=0)
    with pytest.raises(ValueError, match="eval_split 0.9999999999 of 10 rows leaves the train set empty"):
        split_eval(datasets.Dataset.from_list(tagged("a", 10)), 0.9999999999, seed=0)
    with pytest.raises(ValueError, match="eval_split 0.5 of 1 rows leaves the eval set empty"):
        split_eval(datasets.Dataset.from_list(tagged("a", 1)), 0.5, seed=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_eval(dataset, 1.0, seed=0)


def test_mix_validated_rows_from_two_files(tmp_path):
    """The real flow: one load_rows per --dataset entry, then mixing; rows keep where they came from."""
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    b = str(tmp_path / "b.json")
    (tmp_path / "b.json").write_text(json.dumps([GOOD[1]]))
    row_lists = [load_rows(p, validate_preference)[0] for p in split_paths([a, b])]
    mixed = mix_datasets(row_lists, [0.7, 0.3], seed=0)
    sources = {(r["_source"], r["_row"]) for r in mixed}
    assert sources == {(a, 1), (a, 2), (a, 3), (b, 1)}
    by_place = {(r["_source"], r["_row"]): {k: v for k, v in r.items() if not k.startswith("_")} for r in mixed}
    assert by_place[(a, 1)] == EXPECTED_ROWS[0] and by_place[(b, 1)] == EXPECTED_ROWS[1]
