"""Job files and --set overrides: every kind of bad input is one precise line."""

import json

import pytest
from tuneplex.errors import UsageError
from tuneplex.schema.loading import apply_overrides, load_job, load_job_file, parse_yaml
from tuneplex_automodel.schema import AutomodelJobInput


def lines(fn, *args):
    with pytest.raises(UsageError) as info:
        fn(*args)
    return info.value.lines()


def test_yaml_and_json_give_the_same_job(write):
    y = write(
        "job.yaml", "model: m\ndataset:\n  training: d.jsonl\noptimizer:\n  learning_rate: 1e-4\n"
    )
    j = write(
        "job.json",
        json.dumps(
            {"model": "m", "dataset": {"training": "d.jsonl"}, "optimizer": {"learning_rate": 1e-4}}
        ),
    )
    assert load_job(AutomodelJobInput, y) == load_job(AutomodelJobInput, j)


@pytest.mark.parametrize(
    "text,value",
    [
        ("5e-6", 5e-6),
        ("1E-4", 1e-4),
        ("3.0e-5", 3e-5),
        ("2e+3", 2000.0),
        (".5", 0.5),
        ("-1.5", -1.5),
    ],
)
def test_scientific_notation_is_a_number(text, value):
    # YAML 1.1 (PyYAML's default) would read `5e-6` as a string
    assert parse_yaml(f"x: {text}", source="t")["x"] == value


def test_plain_scalars_unchanged():
    data = parse_yaml("a: 1\nb: true\nc: null\nd: abc\ne: '5e-6'\ng: 1_000", source="t")
    assert data == {"a": 1, "b": True, "c": None, "d": "abc", "e": "5e-6", "g": 1000}


def test_missing_file(tmp_path):
    assert lines(load_job_file, tmp_path / "nope.yaml") == [
        f"{tmp_path / 'nope.yaml'}: no such file"
    ]


def test_directory_instead_of_file(tmp_path):
    assert lines(load_job_file, tmp_path) == [f"{tmp_path}: is a directory, not a job file"]


def test_yaml_syntax_error_names_line_and_column(write):
    path = write("bad.yaml", "model: m\ndataset:\n  training: [a, b\n")
    (line,) = lines(load_job_file, path)
    assert line.startswith(f"{path}:4:1: ")


def test_yaml_duplicate_key(write):
    path = write("dup.yaml", "model: a\ndataset:\n  training: d\nmodel: b\n")
    assert lines(load_job_file, path) == [f"{path}:4:1: duplicate key 'model' (first at line 1)"]


def test_json_duplicate_key(write):
    path = write("dup.json", '{"model": "a", "dataset": {"training": "d"}, "model": "b"}')
    assert lines(load_job_file, path) == [f"{path}: duplicate key 'model'"]


def test_json_syntax_error(write):
    path = write("bad.json", '{"model": "m",\n "dataset": }')
    (line,) = lines(load_job_file, path)
    assert line.startswith(f"{path}:2:13: Expecting value")


@pytest.mark.parametrize(
    "text,kind",
    [("", "empty job file"), ("- a\n- b\n", "got a list"), ("just a string", "got a str")],
)
def test_not_a_mapping(write, text, kind):
    path = write("x.yaml", text)
    (line,) = lines(load_job_file, path)
    assert line.startswith(f"{path}: ") and kind in line


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"model: m\ndataset: caf\xe9\n")
    assert lines(load_job_file, path) == [
        f"{path}:2:13: not UTF-8 text (byte 0xe9: invalid continuation byte)"
    ]


def test_overrides_set_nested_values_parsed_as_yaml():
    data = {"model": "m", "training": {"lora": {"rank": 8}}}
    out = apply_overrides(
        data,
        [
            "training.lora.rank=32",
            "optimizer.learning_rate=1e-5",
            "batch.sequence_packing=true",
            "training.lora.target_modules=[q_proj, v_proj]",
            "model=org/other",
            "dataset.validation=",
            "output.dir=runs/a=b",
        ],
    )
    assert out == {
        "model": "org/other",
        "training": {"lora": {"rank": 32, "target_modules": ["q_proj", "v_proj"]}},
        "optimizer": {"learning_rate": 1e-5},
        "batch": {"sequence_packing": True},
        "dataset": {"validation": None},
        "output": {"dir": "runs/a=b"},
    }
    assert data == {"model": "m", "training": {"lora": {"rank": 8}}}  # input untouched


def test_overrides_address_list_items_by_number():
    data = {"env": {"rewards": [{"function": "a.py:f"}, {"function": "b.py:g"}], "weights": [1, 2]}}
    out = apply_overrides(data, ["env.rewards.1.function=c.py:h", "env.weights.0=0.5"])
    assert out["env"] == {
        "rewards": [{"function": "a.py:f"}, {"function": "c.py:h"}],
        "weights": [0.5, 2],
    }
    assert lines(apply_overrides, data, ["env.weights.2=1"]) == [
        "--set env.weights.2: 'env.weights' has 2 items; there is no item 2"
    ]
    assert lines(apply_overrides, data, ["env.rewards.first.function=x"]) == [
        "--set env.rewards.first.function: 'env.rewards' is a list: address its items by "
        "number (0-1)"
    ]
    assert lines(apply_overrides, {"tags": []}, ["tags.0=x"]) == [
        "--set tags.0: 'tags' is an empty list: set it whole (tags=[...])"
    ]
    assert lines(apply_overrides, data, ["env.weights.0.x=1"]) == [
        "--set env.weights.0.x: 'env.weights.0' is a value, not a section"
    ]


def test_override_of_null_section_creates_it():
    assert apply_overrides({"integrations": {"wandb": None}}, ["integrations.wandb.project=p"]) == {
        "integrations": {"wandb": {"project": "p"}}
    }


@pytest.mark.parametrize(
    "item,line",
    [
        ("rank", "--set rank: expected key.path=value"),
        ("=3", "--set =3: expected key.path=value"),
        ("a..b=3", "--set a..b=3: expected key.path=value"),
        ("model.name=x", "--set model.name: 'model' is a value, not a section"),
    ],
)
def test_bad_overrides(item, line):
    assert lines(apply_overrides, {"model": "m"}, [item]) == [line]


def test_override_of_unknown_key_reported_by_schema(write):
    path = write("job.yaml", "model: m\ndataset: {training: d}\n")
    assert lines(load_job, AutomodelJobInput, path, ["training.lora.rnak=4"]) == [
        "training.lora.rnak: unknown key; did you mean 'rank'? (allowed: rank, alpha, merge, "
        "target_modules, dropout, use_dora)"
    ]


def test_merge_keys_and_explicit_keys_override_them():
    text = "base: &b {rank: 8, alpha: 16}\nlora:\n  <<: *b\n  rank: 4\n"
    assert parse_yaml(text, source="t")["lora"] == {"rank": 4, "alpha": 16}
