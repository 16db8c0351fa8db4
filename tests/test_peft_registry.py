"""The PEFT registry: every registered method applies, saves, loads back to the same outputs and
unloads; and the registry is the only dispatch (a method registered here, in the test, trains,
saves, loads and unloads through the fine-tuning recipe and llmkit.peft without touching them)."""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from _shared import byte_chat_tokenizer

from llmkit.config import load_config
from llmkit.errors import LLMKitError
from llmkit.models import ModelConfig, Transformer
from llmkit.peft import (METHODS, AdapterSection, LlamaAdapterSection, PeftMethod, PromptSection, SelectiveSection,
                         adapter_method, apply_method, default_lr, default_sections, get_method, load_adapter,
                         quantize_model_nf4, save_adapter, unload)
from llmkit.peft import registry
from llmkit.peft.common import freeze, load_trainable
from llmkit.recipes.finetune import FinetuneConfig, finetune, sft_logits

# sizes that fit the 2-layer tiny model (the defaults are for real models)
SMALL = {"adapter": AdapterSection(bottleneck=8), "llama_adapter": LlamaAdapterSection(adapter_len=3, n_layers=1),
         "prompt": PromptSection(n_tokens=3), "selective": SelectiveSection(top_n_layers=1)}


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny-llama", vocab_size=260, max_seq_len=512)).eval()


def base_for(name):
    """The base model a method's adapter is trained on: QLoRA's linears are stored in NF4."""
    model = tiny()
    return quantize_model_nf4(model) if name == "qlora" else model


def logits(model, idx):
    with torch.no_grad():
        return sft_logits(model, {"idx": idx})


def sections_for(name):
    return default_sections(name, **{k: v for k, v in SMALL.items() if k in get_method(name).sections})


def test_registry_lists_the_builtin_methods():
    assert METHODS == ("full", "selective", "lora", "qlora", "adapter", "prompt", "llama-adapter")
    assert all(default_lr(m) > 0 for m in METHODS)
    with pytest.raises(LLMKitError, match="unknown method 'lorra'.*did you mean 'lora'"):
        get_method("lorra")
    with pytest.raises(LLMKitError, match="unsupported adapter type 'IA3'.*LORA"):
        registry.for_peft_type("IA3")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_applies_saves_loads_and_unloads(tmp_path, name):
    rec = get_method(name)
    x = torch.randint(0, 260, (2, 10), generator=torch.Generator().manual_seed(1))
    model = base_for(name)
    y0 = logits(model, x)
    apply_method(model, name, sections_for(name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    with torch.no_grad():  # move every trained tensor away from its (identity) init
        g = torch.Generator().manual_seed(2)
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    y1 = logits(model, x)
    assert (y1 - y0).abs().max() > 1e-3
    if not rec.saves_adapter:  # full / selective: a checkpoint, never an adapter
        assert adapter_method(model) is None
        with pytest.raises(LLMKitError, match="no adapter"):
            save_adapter(model, tmp_path / "ad")
        return
    assert get_method(adapter_method(model)).peft_type == rec.peft_type  # QLoRA is found as LoRA
    save_adapter(model, tmp_path / "ad", method=name)
    assert json.loads((tmp_path / "ad" / "llmkit_adapter.json").read_text())["method"] == name
    again = load_adapter(base_for(name), tmp_path / "ad")
    assert (logits(again, x) - y1).abs().max() < 1e-5
    # on a full-precision base: merge folds it into the weights where it can, else refuses
    full = load_adapter(tiny(), tmp_path / "ad")
    yf = logits(full, x)
    if get_method(adapter_method(full)).mergeable:
        unload(full, merge=True)
        assert adapter_method(full) is None and (logits(full, x) - yf).abs().max() < 1e-5
    else:
        with pytest.raises(LLMKitError, match="cannot be folded"):
            unload(full, merge=True)
    unload(model, merge=False)
    assert adapter_method(model) is None
    assert (logits(model, x) - y0).abs().max() < 1e-6


# ------------------------------------------------------------------ a method defined only here
class Scaled(nn.Module):
    """norm(x) · s: a learned per-channel scale (C,) on the final norm's output ((IA)³-like, Liu et al. 2022)."""

    def __init__(self, norm: nn.Module, dim: int):
        super().__init__()
        self.module = norm
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.module(x) * self.scale


def toy_apply(model, cfg=None, tokenizer=None):
    freeze(model)
    model.norm = Scaled(model.norm, model.cfg.d_model)
    return model


def toy_unload(model, merge=False):
    model.norm = model.norm.module
    return model


TOY = PeftMethod(
    name="toy-scale", default_lr=5e-2, apply=toy_apply, peft_type="LLMKIT_TOY_SCALE",
    is_applied=lambda m: isinstance(m.norm, Scaled), state=lambda m: {"scale": m.norm.scale.detach()},
    load_state=lambda m, t: load_trainable(m, {"norm.scale": t["scale"]}),
    peft_config=lambda m, base: {"peft_type": "LLMKIT_TOY_SCALE", "base_model_name_or_path": base},
    from_peft_config=lambda m, cfg: toy_apply(m), unload=toy_unload,
    summary=lambda m, tok: {"toy_scale_mean": float(m.norm.scale.detach().mean())})


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, TOY.name, TOY)
    return TOY


@pytest.fixture(scope="module")
def tok():
    return byte_chat_tokenizer()


def test_a_method_registered_elsewhere_runs_through_finetune(tmp_path, tok, toy_registered):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                            for w in ("red", "green", "blue", "cyan")))
    cfg = load_config(FinetuneConfig, None, ["model=tiny", f"data.files=[{data}]", f"method={TOY.name}",
                                             f"train.out_dir={tmp_path / 'out'}", "data.seq_len=64",
                                             "train.batch_size=2", "train.steps=3", "data.val_fraction=0.0",
                                             "train.threads=1"])
    model = tiny()
    s = finetune(cfg, model=model, tokenizer=tok, quiet=True)
    assert s["trainable_params"] == model.cfg.d_model  # only the scale trained...
    assert s["toy_scale_mean"] == pytest.approx(float(model.norm.scale.detach().mean()))  # ...the record's summary entry
    assert (model.norm.scale.detach() - 1).abs().max() > 1e-3  # at the record's default learning rate
    cfg_file = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg_file["peft_type"] == "LLMKIT_TOY_SCALE"
    again = load_adapter(tiny(), tmp_path / "out")
    x = torch.randint(0, 260, (1, 12))
    assert adapter_method(again) == TOY.name
    assert (logits(again, x) - logits(model, x)).abs().max() < 1e-6
    with pytest.raises(LLMKitError, match="cannot be folded"):
        unload(again, merge=True)
    assert (logits(unload(again, merge=False), x) - logits(tiny(), x)).abs().max() < 1e-6


def test_registering_twice_or_incomplete_is_refused(toy_registered):
    with pytest.raises(ValueError, match="twice"):
        registry.register(TOY)
    with pytest.raises(ValueError, match="lacks"):
        registry.register(dataclasses.replace(TOY, name="toy-2", state=None))
