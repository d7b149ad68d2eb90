"""What the export tests share: tiny runs trained through the CLI, a LoRA adapter with a
non-zero update, `tuneplex export` in-process, and the reference (transformers + peft, base and
adapter unmerged) every exported logit is compared with."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import chat_rows, run_job, write_rows
from tuneplex.cli import main

PROMPT = [{"role": "user", "content": "Reverse: river blue a"}]


@pytest.fixture(scope="module")
def export_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train, val = root / "train.jsonl", root / "val.jsonl"
    write_rows(train, chat_rows(24))
    write_rows(val, chat_rows(6, seed=1))
    return train, val


@pytest.fixture(scope="module")
def export_runs(tmp_path_factory, tiny_model, export_data):
    """{kind: run directory} for lora / full (all_weights), trained in fp32 once, lazily."""
    root = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            run = root / kind
            ft = {"lora": "lora", "full": "all_weights"}[kind]
            said = io.StringIO()
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                code = main(
                    ["train", str(run_job(root, tiny_model, export_data, ft)), "-o", str(run)]
                )
            assert code == 0, said.getvalue()
            made[kind] = run
        return made[kind]

    return get


def lora_adapter(base: str, out: Path, **config) -> Path:
    """A peft LoRA adapter on `base` whose B is random (not the zeros peft starts from), so
    the merge has something to add."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **config,
    )
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def export_adapter(tiny_model, tmp_path_factory):
    return lora_adapter(tiny_model, tmp_path_factory.mktemp("adapters") / "lora")


def export(*args) -> tuple[int, str, str]:
    """`tuneplex export ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["export", *[str(a) for a in args]])
    return code, out.getvalue(), err.getvalue()


def exported(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def base_plus_adapter(base: str, adapter: str | Path):
    """The reference: base in float32 with the adapter loaded by peft, not merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def prompt_ids(tokenizer_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text + " river blue a model learns the data", add_special_tokens=False)
    return torch.tensor([ids["input_ids"]])


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def weight_dtypes(path: Path) -> set[str]:
    """The safetensors dtypes of a directory's weight files, read from their headers."""
    found = set()
    for f in path.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def refused(*args, where: str, contains: str = "") -> str:
    code, said, err = export(*args)
    assert code == 2, err
    assert said == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(where), err
    assert contains in err, err
    return err
