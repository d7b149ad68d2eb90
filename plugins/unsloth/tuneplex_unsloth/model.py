"""Loading the model: the one seam between the training wiring and the library that loads.

`UnslothLoader` is the real path (unsloth's FastLanguageModel). `PeftLoader` does the same job
with plain transformers + peft (+ bitsandbytes for 4/8-bit): the CPU tests run the whole
trainer through it, and it is the reference the GPU benchmark compares against. Importing this
module imports neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from tuneplex.data.sources import hub_offline
from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.nn.models import resolve_model_ref

from tuneplex_unsloth.schema import UnslothJobInput


class Loader(Protocol):
    name: str

    def load(self, job: UnslothJobInput) -> tuple[Any, Any]:
        """(model, tokenizer), quantized as the job asks; trainable in full for all_weights."""
        ...

    def add_lora(self, model, job: UnslothJobInput):
        """The model wrapped with the job's LoRA adapter."""
        ...

    def save_merged(self, model, tokenizer, out: Path, *, method: str, job: UnslothJobInput):
        """Merge the adapter into the base and save to `out` in 16 bits or 4 bits."""
        ...


def torch_dtype(job: UnslothJobInput):
    """The job's model.dtype; auto: the precision's 16-bit type on a GPU, float32 on CPU."""
    import torch

    if job.model.dtype != "auto":
        return getattr(torch, job.model.dtype)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if job.hardware.precision == "bf16" else torch.float16


def _where(ref: str) -> tuple[str, bool]:
    return resolve_model_ref(ref, key="model.name")


def _load_failed(ref: str, exc: Exception) -> UsageError:
    return UsageError(Problem("model.name", f"{ref}: cannot load the model ({first_line(exc)})"))


class UnslothLoader:
    name = "unsloth"

    def __init__(self) -> None:
        import unsloth  # noqa: F401  (first: it patches transformers, peft and trl)

    def load(self, job):
        from unsloth import FastLanguageModel

        m = job.model
        where, _ = _where(m.name)  # offline: HF_HUB_OFFLINE keeps unsloth off the Hub
        full = job.training.finetuning_type == "all_weights"
        try:
            return FastLanguageModel.from_pretrained(
                model_name=where,
                max_seq_length=m.max_seq_length,
                dtype=None if m.dtype == "auto" else torch_dtype(job),
                load_in_4bit=m.load_in_4bit,
                load_in_8bit=m.load_in_8bit,
                load_in_16bit=not (m.load_in_4bit or m.load_in_8bit or full),
                full_finetuning=full,
                trust_remote_code=m.trust_remote_code,
                use_gradient_checkpointing=job.training.use_gradient_checkpointing,
            )
        except UsageError:
            raise
        except Exception as exc:
            raise _load_failed(m.name, exc) from None

    def add_lora(self, model, job):
        from unsloth import FastLanguageModel

        lora = job.training.lora
        return FastLanguageModel.get_peft_model(
            model,
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias=lora.bias,
            use_gradient_checkpointing=job.training.use_gradient_checkpointing,
            random_state=lora.random_state,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,  # passed on to peft's LoraConfig
            max_seq_length=job.model.max_seq_length,
        )

    def save_merged(self, model, tokenizer, out, *, method, job):
        # plain merged_4bit is refused by unsloth; the forced variant is what was asked for,
        # and export.verify() checks that 4-bit weights really were written
        unsloth_method = "merged_4bit_forced" if method == "merged_4bit" else method
        model.save_pretrained_merged(str(out), tokenizer, save_method=unsloth_method)


class PeftLoader:
    name = "transformers+peft"

    def load(self, job):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        m = job.model
        where, local = _where(m.name)
        dtype = torch_dtype(job)
        quant = None
        if m.load_in_4bit:
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        elif m.load_in_8bit:
            quant = BitsAndBytesConfig(load_in_8bit=True)
        kw = dict(local_files_only=local or hub_offline(), trust_remote_code=m.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **kw)
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=dtype, quantization_config=quant, use_safetensors=True, **kw
            )
        except Exception as exc:
            raise _load_failed(m.name, exc) from None
        model.config.use_cache = False
        if job.training.use_gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=bool(job.training.use_gradient_checkpointing),
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        return model, tokenizer

    def add_lora(self, model, job):
        import torch
        from peft import LoraConfig, get_peft_model

        lora = job.training.lora
        torch.manual_seed(lora.random_state)
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias=lora.bias,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def save_merged(self, model, tokenizer, out, *, method, job):
        """Merge into a fresh 16-bit copy of the base (never into quantized weights), then
        save it in 16 bits or quantize it to 4 bits."""
        import tempfile

        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        where, local = _where(job.model.name)
        half = torch.bfloat16 if job.hardware.precision == "bf16" else torch.float16
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(where, dtype=half, local_files_only=local)
            merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
            if method == "merged_4bit":
                merged.save_pretrained(tmp + "/merged")
                merged = AutoModelForCausalLM.from_pretrained(
                    tmp + "/merged",
                    quantization_config=BitsAndBytesConfig(load_in_4bit=True),
                    dtype=half,
                )
            merged.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
