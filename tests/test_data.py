"""Data loading, encoding, collating, splitting and batching (tiny tokenizer, no model)."""

from __future__ import annotations

import csv
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.data import (
    DEFAULT_TEMPLATE,
    Encoded,
    Task,
    batch_order,
    check_labels,
    collate_train,
    encode_rows,
    input_budget,
    input_token_ids,
    label_set,
    label_token_ids,
    load_table,
    stratified_split,
    validate_template,
)
from softprompt.errors import SoftpromptError

LABELS = ["complaint", "no complaint"]
TEXTS = ["the bill is wrong again", "lovely sunny day", "", "0123 stays a string"]
ROW_LABELS = ["complaint", "no complaint", "no complaint", "complaint"]


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def suffix_ids(tokenizer, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """Tokens of the template's part after {text} (" Label : " for the default template)."""
    return list(tokenizer(template.split("{text}", 1)[1])["input_ids"])


def make_task(max_length: int = 64, labels=LABELS) -> Task:
    return Task(
        text_column="Tweet text",
        label_names=list(labels),
        label_column="Label",
        max_length=max_length,
    )


# --------------------------------------------------------------------------- loading


def test_load_csv_with_chosen_columns(tmp_path):
    rows = [
        {"id": str(i), "body": t, "kind": lab}
        for i, (t, lab) in enumerate(zip(TEXTS, ROW_LABELS, strict=True))
    ]
    path = write_csv(tmp_path / "data.csv", rows)
    table = load_table(str(path), "body", "kind")
    assert table.texts == TEXTS  # "" stays "", "0123..." stays a string
    assert table.labels == ROW_LABELS
    assert table.columns == ["id", "body", "kind"]
    assert table.label_order is None
    assert label_set(table) == sorted(set(ROW_LABELS))


def test_load_tsv(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\nhello, world\tcomplaint\nbye\tno complaint\n", encoding="utf-8")
    table = load_table(str(path), "text", "label")
    assert table.texts == ["hello, world", "bye"]
    assert table.labels == ["complaint", "no complaint"]


def test_load_jsonl_with_chosen_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for t, lab in zip(TEXTS, ROW_LABELS, strict=True):
            f.write(json.dumps({"body": t, "kind": lab, "other": 1}) + "\n")
    table = load_table(str(path), "body", "kind")
    assert table.texts == TEXTS
    assert table.labels == ROW_LABELS
    assert set(table.columns) == {"body", "kind", "other"}


def test_load_parquet_with_chosen_columns(tmp_path):
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"body": TEXTS, "kind": ROW_LABELS, "n": [1, 2, 3, 4]}).to_parquet(
        str(path)
    )
    table = load_table(str(path), "body", "kind")
    assert table.texts == TEXTS
    assert table.labels == ROW_LABELS
    assert set(table.columns) == {"body", "kind", "n"}


def test_labels_are_stripped_and_not_needed_for_prediction(tmp_path):
    path = write_csv(
        tmp_path / "d.csv", [{"text": "a", "label": "  complaint "}, {"text": "b", "label": "x"}]
    )
    assert load_table(str(path), "text", "label").labels == ["complaint", "x"]
    table = load_table(str(path), "text", "no_such_label_column", need_labels=False)
    assert table.labels is None
    assert table.texts == ["a", "b"]


def test_classlabel_names_survive_parquet_and_lose_underscores(tmp_path):
    import datasets
    from datasets import ClassLabel, Features, Value

    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=["no_complaint", "complaint"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "b", "c"], "label": [0, 1, 0]}, features=features
    )
    path = tmp_path / "cl.parquet"
    ds.to_parquet(str(path))
    # the ClassLabel feature survives the parquet round trip (stored in the schema metadata)
    back = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert isinstance(back.features["label"], ClassLabel)

    table = load_table(str(path), "text", "label")
    assert table.labels == ["no complaint", "complaint", "no complaint"]
    assert table.label_order == ["no complaint", "complaint"]
    # the dataset's own order, not sorted
    assert label_set(table) == ["no complaint", "complaint"]


def test_classlabel_missing_value_is_an_empty_label(tmp_path):
    import datasets
    from datasets import ClassLabel, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["a_b", "c"])})
    ds = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, -1]}, features=features)
    path = tmp_path / "cl.parquet"
    ds.to_parquet(str(path))
    with pytest.raises(SoftpromptError, match=r"'label' is empty in 1 row\(s\) \(rows 1\)"):
        load_table(str(path), "text", "label")


# --------------------------------------------------------------------------- encoding


def test_long_row_keeps_label_tokens(tokenizer):
    task = make_task(max_length=32)
    text = ("my parcel never arrived and support keeps closing the ticket! " * 10)[:500]
    assert len(text) == 500
    for label in LABELS:
        (row,) = encode_rows(tokenizer, task, [text], [label])
        lab = label_token_ids(tokenizer, label)
        assert lab[-1] == tokenizer.eos_token_id
        assert lab[:-1] == tokenizer(label, add_special_tokens=False)["input_ids"]
        full = row.input_ids + row.label_ids
        assert row.label_ids == lab
        assert full[-len(lab) :] == lab
        assert len(row) == len(full) <= 32
        # the input still ends with the template's suffix (" Label : "), the text was cut instead
        suf = suffix_ids(tokenizer)
        assert row.input_ids[-len(suf) :] == suf
        decoded = tokenizer.decode(row.input_ids)
        assert decoded.startswith("Tweet text : my parcel")
        assert decoded.endswith(" Label : ")
        assert len(decoded) < len(task.render(text))


def test_short_row_is_not_cut(tokenizer):
    task = make_task()
    (row,) = encode_rows(tokenizer, task, ["lovely day"], ["complaint"])
    assert row.input_ids == tokenizer(task.render("lovely day"))["input_ids"]


def test_input_budget_leaves_room_for_longest_label(tokenizer):
    task = make_task(max_length=32)
    longest = max(len(label_token_ids(tokenizer, n)) for n in LABELS)
    assert input_budget(tokenizer, task) == 32 - longest
    ids = input_token_ids(tokenizer, task, "x" * 500, input_budget(tokenizer, task))
    assert len(ids) <= input_budget(tokenizer, task)


def test_collate_train_masks_and_labels(tokenizer):
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.pad_token_id == 0
    task = make_task()
    texts = ["short", "a somewhat longer text about the broken heating", "mid length text"]
    labels = ["complaint", "no complaint", "complaint"]
    rows = encode_rows(tokenizer, task, texts, labels)
    batch = collate_train(rows, tokenizer.pad_token_id)
    T = max(len(r) for r in rows)
    assert (
        batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, T)
    )
    for i, r in enumerate(rows):
        n_in, n = len(r.input_ids), len(r)
        # the attention mask comes from the length: the row's eos (== pad) is attended, padding is not
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert batch["input_ids"][i, :n].tolist() == r.input_ids + r.label_ids
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert batch["input_ids"][i, n - 1].item() == eos
        # loss only on the label positions, eos included
        expected = [-100] * n_in + r.label_ids + [-100] * (T - n)
        assert batch["labels"][i].tolist() == expected
    assert batch["input_ids"].dtype == torch.long


def test_collate_train_pad_equal_to_eos_inside_input():
    # an input that itself contains the pad id still gets a full mask
    rows = [Encoded([5, 0, 6], [7, 0]), Encoded([5], [7, 0])]
    batch = collate_train(rows, pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 0], [-100, 7, 0, -100, -100]]


# --------------------------------------------------------------------------- split and batches


def forty_labels() -> list[str]:
    return ["a"] * 20 + ["b"] * 12 + ["c"] * 6 + ["d"] * 2


def test_stratified_split_is_seeded():
    labels = forty_labels()
    s1 = stratified_split(labels, 0.2, seed=1)
    assert stratified_split(labels, 0.2, seed=1) == s1
    assert stratified_split(labels, 0.2, seed=2) != s1


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.5])
def test_stratified_split_partitions_keeps_classes_and_holds_out_fraction(fraction):
    labels = forty_labels()
    train, held = stratified_split(labels, fraction, seed=0)
    assert sorted(train + held) == list(range(len(labels)))
    assert {labels[i] for i in train} == set(labels)
    assert (
        abs(len(held) - fraction * len(labels)) <= 4
    )  # per-class rounding, and 1 row for small classes
    for lab in set(labels):
        n = labels.count(lab)
        n_held = sum(1 for i in held if labels[i] == lab)
        assert abs(n_held - fraction * n) <= 1


def test_stratified_split_zero_fraction_holds_out_nothing():
    train, held = stratified_split(forty_labels(), 0.0, seed=0)
    assert held == [] and train == list(range(40))


def test_stratified_split_single_row_class_stays_in_train():
    labels = ["a"] * 10 + ["rare"]
    train, held = stratified_split(labels, 0.3, seed=0)
    assert 10 in train


def test_stratified_split_never_empties_a_class_from_train():
    labels = ["a"] * 10 + ["b"] * 2
    train, held = stratified_split(labels, 0.8, seed=0)
    assert {labels[i] for i in train} == {"a", "b"}


def test_stratified_split_holds_out_every_class_even_when_the_fraction_is_small():
    # 20 classes of 3 rows: 5% is 3 rows, fewer than the classes; each class still gives one
    labels = [f"c{i}" for i in range(20) for _ in range(3)]
    train, held = stratified_split(labels, 0.05, seed=0)
    assert sorted(labels[i] for i in held) == sorted(set(labels))
    assert {labels[i] for i in train} == set(labels)


@settings(max_examples=60, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_split_properties(sizes, fraction, seed):
    labels = [f"c{k}" for k, n in enumerate(sizes) for _ in range(n)]
    random.Random(seed).shuffle(labels)
    train, held = stratified_split(labels, fraction, seed)
    assert train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == list(range(len(labels)))
    assert all(type(i) is int for i in train + held)
    assert {labels[i] for i in train} == set(labels)  # no class leaves train
    several = {lab for lab in labels if labels.count(lab) > 1}
    assert {labels[i] for i in held} == several  # every class of 2+ rows is held out
    assert stratified_split(labels, fraction, seed) == (train, held)


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("n,batch_size", [(0, 4), (1, 4), (17, 4), (40, 8), (1000, 3)])
def test_batch_order_covers_every_index_once(n, batch_size, group_by_length):
    lengths = [random.Random(n).randint(1, 60) for _ in range(n)]
    batches = batch_order(lengths, batch_size, random.Random(0), group_by_length=group_by_length)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == -(-n // batch_size)


def test_batch_order_is_seeded():
    lengths = list(range(50))
    assert batch_order(lengths, 4, random.Random(3)) == batch_order(lengths, 4, random.Random(3))


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "train.csv"
    with pytest.raises(SoftpromptError) as e:
        load_table(str(path), "text", "label")
    assert str(path) in str(e.value)
    assert "not found" in str(e.value)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,b\n")
    with pytest.raises(SoftpromptError, match=r"unknown file type '\.txt'"):
        load_table(str(path), "text", "label")


def test_missing_text_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"Tweet text": "a", "Label": "complaint"}])
    with pytest.raises(SoftpromptError) as e:
        load_table(str(path), "text", "Label")
    msg = str(e.value)
    assert "'text'" in msg and "--text-column" in msg
    assert "columns found: 'Tweet text', 'Label'" in msg


def test_missing_label_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"Tweet text": "a", "Label": "complaint"}])
    with pytest.raises(
        SoftpromptError,
        match=r"no column 'label' \(--label-column\); columns found: 'Tweet text', 'Label'",
    ):
        load_table(str(path), "Tweet text", "label")


def test_header_only_file_has_no_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n")
    with pytest.raises(SoftpromptError, match="no rows") as e:
        load_table(str(path), "text", "label")
    assert str(path) in str(e.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("")
    with pytest.raises(SoftpromptError, match="could not read as csv") as e:
        load_table(str(path), "text", "label")
    assert str(path) in str(e.value)


def test_empty_jsonl_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(SoftpromptError) as e:
        load_table(str(path), "text", "label")
    assert str(path) in str(e.value)


def test_empty_label_cell(tmp_path):
    rows = [
        {"text": "a", "label": "complaint"},
        {"text": "b", "label": "  "},
        {"text": "c", "label": ""},
    ]
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(SoftpromptError) as e:
        load_table(str(path), "text", "label")
    msg = str(e.value)
    assert "'label' is empty in 2 row(s) (rows 1, 2)" in msg
    assert str(path) in msg


def test_check_labels_refuses_unknown_label(tmp_path):
    path = write_csv(
        tmp_path / "d.csv", [{"text": "a", "label": "complaint"}, {"text": "b", "label": "maybe"}]
    )
    table = load_table(str(path), "text", "label")
    check_labels(table, ["complaint", "maybe"], "--eval-data")
    with pytest.raises(SoftpromptError) as e:
        check_labels(table, LABELS, "--eval-data")
    msg = str(e.value)
    assert "--eval-data" in msg and "row 1" in msg and "'maybe'" in msg
    assert str(LABELS) in msg


@pytest.mark.parametrize(
    "template",
    ["no text placeholder", "{text_column} only", "{txt} Label : ", "{text} {0}", "{text"],
)
def test_bad_template(template):
    with pytest.raises(SoftpromptError) as e:
        validate_template(template)
    assert "--template" in str(e.value)
    assert repr(template) in str(e.value)


def test_good_templates():
    validate_template(DEFAULT_TEMPLATE)
    validate_template("{text} => ")
    validate_template("literal {{braces}} {text}")


def test_max_length_too_short_for_template(tokenizer):
    task = make_task(max_length=8)
    with pytest.raises(SoftpromptError) as e:
        encode_rows(
            tokenizer, task, ["a long text that will never fit in eight tokens"], ["complaint"]
        )
    msg = str(e.value)
    assert "--max-length 8" in msg and "template" in msg and "raise --max-length" in msg


def test_max_length_too_short_for_label(tokenizer):
    task = make_task(max_length=3, labels=["no complaint"])
    with pytest.raises(
        SoftpromptError, match=r"--max-length 3 is too short for the label 'no complaint'"
    ):
        encode_rows(tokenizer, task, ["x"], ["no complaint"])


def test_task_from_dict_round_trip_and_damage():
    task = make_task()
    task.extra = {"base_model": "m"}
    d = task.to_dict()
    d["future_key"] = 1
    back = Task.from_dict(d)
    assert back.label_names == LABELS and back.extra == {"base_model": "m", "future_key": 1}
    with pytest.raises(SoftpromptError, match="text_column"):
        Task.from_dict({"label_names": LABELS})


# --------------------------------------------------------------------------- property


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=300, max_size=1500
)
_label = st.text(
    st.characters(blacklist_categories=("Cs",), whitelist_categories=("L", "N", "P", "S", "Zs")),
    min_size=1,
    max_size=12,
)


PROPERTY = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(
    rows=st.lists(st.tuples(_text, _label), min_size=1, max_size=6),
    max_length=st.integers(min_value=8, max_value=64),
)
def test_property_any_csv_loads_and_encodes(tokenizer, rows, max_length):
    texts = [t for t, _ in rows]
    labels = [lab for _, lab in rows]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["my text", "my label"])
            w.writerows(rows)
        try:
            table = load_table(str(path), "my text", "my label")
        except SoftpromptError:
            assert any(lab.strip() == "" for lab in labels)
            return
    assert table.texts == texts
    assert table.labels == [lab.strip() for lab in labels]
    task = Task(
        text_column="my text",
        label_names=label_set(table),
        label_column="my label",
        max_length=max_length,
    )
    try:
        encoded = encode_rows(tokenizer, task, table.texts, table.labels)
    except SoftpromptError as e:
        assert "--max-length" in str(e)
        return
    suf = suffix_ids(tokenizer)
    for row, lab in zip(encoded, table.labels, strict=True):
        want = label_token_ids(tokenizer, lab)
        assert row.label_ids == want
        assert (row.input_ids + row.label_ids)[-len(want) :] == want
        assert len(row) <= max_length
        assert row.input_ids[-len(suf) :] == suf


def test_hub_dataset_path_passes_subset_and_split_and_maps_classlabels(monkeypatch):
    """`--data ought/raft --subset twitter_complaints --split train` goes to datasets.load_dataset
    (intercepted here: no network), and ClassLabel ids come back as names."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        features = datasets.Features(
            {
                "Tweet text": datasets.Value("string"),
                "ID": datasets.Value("int64"),
                "Label": datasets.ClassLabel(names=["Unlabeled", "complaint", "no_complaint"]),
            }
        )
        return datasets.Dataset.from_dict(
            {"Tweet text": ["@x my bill is wrong", "nice day"], "ID": [0, 1], "Label": [1, 2]},
            features=features,
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    table = load_table(
        "ought/raft", "Tweet text", "Label", subset="twitter_complaints", split="train"
    )
    assert calls == [("ought/raft", "twitter_complaints", "train")]
    assert table.labels == ["complaint", "no complaint"]
    assert label_set(table) == ["complaint", "no complaint"]  # Unlabeled is not a trained class


_csv_soup = st.lists(
    st.sampled_from(list("ab ,\"'\n\r\t;|\\é☕\x00") + ["text", "label", '""', ',"', '",']),
    max_size=40,
).map("".join)


@settings(max_examples=40, deadline=None, database=None)
@given(
    body=_csv_soup, header=st.sampled_from(["text,label\n", "label,text\n", "", '"text","label"\n'])
)
def test_property_raw_csv_loads_or_says_why(body, header):
    """Hand-made CSVs with odd quoting (unbalanced quotes, embedded newlines and commas, ragged
    rows, NUL bytes): load_table either reads them or raises a SoftpromptError naming the file."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "odd.csv"
        path.write_bytes((header + body).encode("utf-8"))
        try:
            table = load_table(str(path), "text", "label")
        except SoftpromptError as e:
            assert str(path) in str(e) and "\n" not in str(e).strip()
            return
    assert len(table.texts) == len(table.labels) > 0
    assert all(isinstance(t, str) for t in table.texts)
    assert all(isinstance(lab, str) and lab and lab == lab.strip() for lab in table.labels)


_json_value = st.one_of(
    st.text(max_size=20),
    st.integers(-5, 5),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
)


@settings(max_examples=25, deadline=None, database=None)
@given(rows=st.lists(st.tuples(_json_value, _json_value), min_size=1, max_size=5))
def test_property_jsonl_any_values_load_or_say_why(rows):
    """JSONL cells of any JSON type (mixed across rows, nulls): strings out, or a clear error."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        lines = [json.dumps({"text": t, "label": lab}, ensure_ascii=False) for t, lab in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            table = load_table(str(path), "text", "label")
        except SoftpromptError as e:
            assert str(path) in str(e)
            return
    assert len(table.texts) == len(rows)
    assert all(isinstance(t, str) for t in table.texts)
    assert all(isinstance(lab, str) and lab.strip() == lab != "" for lab in table.labels)


@PROPERTY
@given(
    rows=st.lists(st.tuples(_text, _label), min_size=1, max_size=5),
    max_length=st.integers(min_value=12, max_value=64),
    template=st.sampled_from([DEFAULT_TEMPLATE, "{text}", "Q: {text}\nA:", "{text} → "]),
)
def test_property_collated_labels_are_each_rows_tail(tokenizer, rows, max_length, template):
    """Through encode_rows and collate_train, the positions scored are exactly each row's label
    tokens, at the end of the row, never cut; the count the trainer divides by matches them."""
    from softprompt.training.step import label_token_count

    labels = [lab.strip() or "x" for _, lab in rows]
    task = Task(
        text_column="c",
        label_names=sorted(set(labels)),
        template=template,
        max_length=max_length,
    )
    try:
        encoded = encode_rows(tokenizer, task, [t for t, _ in rows], labels)
    except SoftpromptError as e:
        assert "--max-length" in str(e)
        return
    batch = collate_train(encoded, tokenizer.pad_token_id)
    for i, (row, lab) in enumerate(zip(encoded, labels, strict=True)):
        want = label_token_ids(tokenizer, lab)
        n = len(row)
        assert n <= max_length
        assert batch["attention_mask"][i].sum() == n
        assert batch["input_ids"][i, n - len(want) : n].tolist() == want
        assert batch["labels"][i, n - len(want) : n].tolist() == want
        assert (batch["labels"][i] != -100).sum() == len(want)
    assert (batch["labels"][:, 1:] != -100).sum() == label_token_count(encoded)


def test_task_head_is_the_template_before_the_text():
    t = Task(text_column="Tweet text", label_names=["a", "b"])
    assert t.head() == "Tweet text : "
    assert t.render("hi").startswith(t.head())
    assert Task(text_column="x", label_names=["a"], template="{text}").head() == ""
    literal = Task(text_column="x", label_names=["a"], template="{{text}} {text_column}: {text}!")
    assert literal.head() == "{text} x: "
