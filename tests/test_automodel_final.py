"""final/ streamed one tensor at a time (final_stream, safetensors_stream) in one process: the
files transformers / peft write, split into several files with an index where asked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from tuneplex_automodel.final_stream import stream_final  # noqa: E402
from tuneplex_automodel.safetensors_stream import Entry, SafetensorsWriter  # noqa: E402

ONE = SimpleNamespace(is_main=True, dims=SimpleNamespace(pp=1), pp_rank=0)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_writer_puts_tensors_in_any_order_across_files(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(4).to(torch.bfloat16),
        "d": torch.tensor([True, False]),
    }
    entries = [Entry(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]
    writer = SafetensorsWriter(tmp_path, entries, max_bytes=60)
    for k in ("d", "b", "c", "a"):
        writer.put(k, tensors[k])
    files = writer.close()
    assert len(files) > 1 and all(
        f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files
    )
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    read = {k: v for f in files for k, v in load_file(f).items()}
    for k, t in tensors.items():
        assert torch.equal(read[k], t), k
    with pytest.raises(ValueError, match="declared"):
        writer.put("a", torch.zeros(2))


def test_full_model_streamed_in_several_files_loads_as_saved(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tiny_model)
    out = tmp_path / "final"
    out.mkdir()
    stream_final(
        out, model=model, dist=ONE, lora=False, merge=False, dtype=torch.bfloat16, max_bytes=50_000
    )
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.dtype == torch.bfloat16
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k].to(torch.bfloat16)), k


def test_lora_merged_equals_peft_merge_and_adapter_loads(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tuneplex_automodel.model import apply_lora

    torch.manual_seed(0)
    model = apply_lora(_model(tiny_model), rank=4, alpha=8, target_modules=None)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    out = tmp_path / "final"
    out.mkdir()
    stream_final(out, model=model, dist=ONE, lora=True, merge=True, dtype=None)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    adapted = PeftModel.from_pretrained(_model(tiny_model), str(out / "adapter"))
    reference = model.merge_and_unload().state_dict()
    for k, v in merged.state_dict().items():
        assert torch.equal(v, reference[k]), k
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_merged_lora_streamed_from_two_processes_equals_one_process(tiny_model, tmp_path, tp):
    """Sharded LoRA layers (FSDP or TP) merge, tensor by tensor, to what one process merges."""
    from helpers import cli, layout, parallel_job
    from transformers import AutoModelForCausalLM

    job = parallel_job(tmp_path, "lora", model=tiny_model, ft="lora")
    merge = ["--set", "training.lora.merge=true"]
    cli(job, "-o", tmp_path / "one", *merge)
    cli(job, "-o", tmp_path / "two", *merge, *layout(2, tensor_parallel_size=tp))
    one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "final")).state_dict()
    two = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two" / "final")).state_dict()
    assert one.keys() == two.keys()
    for k, v in one.items():
        torch.testing.assert_close(two[k], v, atol=1e-4, rtol=1e-4, msg=k)
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").is_file()
