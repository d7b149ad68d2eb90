"""Loading a Target for inference: weights from safetensors only, an adapter on its base, the
precision the run trained in, the Hub only when it is online."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line
from tuneplex.inference.target import Target

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Loaded:
    """A model ready to generate and evaluate, with the tokenizer training used."""

    model: Any
    tokenizer: Any
    target: Target
    device: Any
    autocast: Any | None
    """torch dtype the forward passes compute in under autocast, or None."""

    def engine(self):
        """(a Prompter rendering as the target's training did, a Generator stopping where
        that rendering ends a turn) for this model."""
        from tuneplex.inference.engine import Generator
        from tuneplex.inference.prompts import Prompter

        prompter = Prompter(self.tokenizer, self.target.spec)
        generator = Generator(
            self.model,
            self.tokenizer,
            stop=prompter.stop,
            device=self.device,
            autocast=self.autocast,
        )
        return prompter, generator


def pick_device() -> str:
    """CUDA when present, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(target: Target, *, device: str, dtype: str | None = None, tokenizer=None) -> Loaded:
    """`target` on `device`, in eval mode. `dtype` (`--dtype`) forces the weights' dtype and
    drops the run's autocast; otherwise the run's own precision, else the model's own dtype."""
    import torch

    from tuneplex.data.pipeline import load_tokenizer

    forced = dtype not in (None, "auto")
    weights_dtype = dtype if forced else target.dtype
    autocast = None if forced or target.autocast is None else getattr(torch, target.autocast)
    if autocast is not None and device == "cpu" and autocast == torch.float16:
        autocast = None  # fp16 autocast on a CPU is not what the run computed either
    if tokenizer is None:
        tokenizer = load_tokenizer(
            target.tokenizer, trust_remote_code=target.trust_remote_code, key=target.label
        )
    model = _from_pretrained(
        target.base if target.adapter else target.path,
        target=target,
        dtype=getattr(torch, weights_dtype) if weights_dtype else "auto",
        device=device,
    )
    if target.adapter:
        model = _adapter(model, target)
    model.to(device)
    model.eval()
    model.config.use_cache = True
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        target=target,
        device=torch.device(device),
        autocast=autocast,
    )


def _from_pretrained(ref: str, *, target: Target, dtype: Any, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    from tuneplex.nn.models import resolve_model_ref

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    where, local = resolve_model_ref(ref, key=target.label)
    from tuneplex.data.sources import hub_offline

    extra: dict[str, Any] = {}
    if target.quantization and device.startswith("cuda"):
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=target.quantization == "4bit",
            load_in_8bit=target.quantization == "8bit",
        )
        extra["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(
            where,
            dtype=dtype,
            local_files_only=local or hub_offline(),
            trust_remote_code=target.trust_remote_code,
            use_safetensors=True,
            **extra,
        )
    except Exception as exc:
        raise UsageError(
            Problem(target.label, f"{ref}: cannot load the model ({first_line(exc)})")
        ) from None


def _adapter(model, target: Target):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, target.path, is_trainable=False)
    except Exception as exc:
        raise UsageError(
            Problem(target.label, f"{target.path}: cannot load the adapter ({first_line(exc)})")
        ) from None


def weights_config(target: Target):
    """The transformers config of the weights `load` starts from (the base, for an adapter),
    read without loading any weights."""
    from transformers import AutoConfig

    from tuneplex.data.sources import hub_offline
    from tuneplex.nn.models import resolve_model_ref

    ref = target.base if target.adapter else target.path
    where, local = resolve_model_ref(ref, key=target.label)
    try:
        return AutoConfig.from_pretrained(
            where,
            local_files_only=local or hub_offline(),
            trust_remote_code=target.trust_remote_code,
        )
    except Exception as exc:
        raise UsageError(
            Problem(target.label, f"{ref}: cannot read its config ({first_line(exc)})")
        ) from None
