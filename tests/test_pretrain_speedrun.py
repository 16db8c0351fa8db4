"""`llmkit speedrun` end to end on a small slice and a small model: outputs, the held-out score equals
`llmkit score` on the final checkpoint, refusing to overwrite, timestamped default directory."""

import json
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.recipes.speedrun import SpeedrunConfig, split_bytes

REPO = Path(__file__).resolve().parents[1]


def test_split_bytes_is_the_last_tenth():
    raw = "abcdefghij".encode() * 10
    train, held = split_bytes(raw, 0.1)
    assert train.encode() == raw[:90] and held.encode() == raw[90:]
    train, held = split_bytes("aaaaaaaaé".encode(), 0.1)  # cut inside 'é' moves to the boundary
    assert train == "aaaaaaaaé" and held == ""
    assert SpeedrunConfig().minutes == 10.0  # the README's no-argument run


def test_override_of_one_model_key_keeps_the_other_defaults():
    """`model.dropout=0` must not replace the whole default model dict (it once shrank the model)."""
    from llmkit.config import load_config

    cfg = load_config(SpeedrunConfig, None, ["model.dropout=0.0", "weight_decay=0.3"])
    assert cfg.model == {**SpeedrunConfig().model, "dropout": 0.0} and cfg.weight_decay == 0.3


def test_vocabulary_follows_the_training_dtype_unless_set():
    """Unset, the vocabulary is 1024 for an fp32 transformer run and 512 under bf16 (and for the classic
    LMs); `vocab_size=N` pins it and is range-checked."""
    from llmkit.config import load_config
    from llmkit.errors import LLMKitError
    from llmkit.recipes.speedrun import default_vocab

    assert SpeedrunConfig().vocab_size is None
    assert (default_vocab("transformer", "float32"), default_vocab("transformer", "bfloat16"),
            default_vocab("lstm", "float32")) == (1024, 512, 512)
    assert load_config(SpeedrunConfig, None, ["vocab_size=2048"]).vocab_size == 2048
    with pytest.raises(LLMKitError, match="vocab_size"):
        load_config(SpeedrunConfig, None, ["vocab_size=100"])


def test_schedule_follows_the_training_dtype_unless_set():
    """Unset, the LR decays linearly to 0 in fp32 and by cosine to 1e-4 under bf16; `schedule=`/`min_lr=` pin it."""
    from llmkit.config import load_config
    from llmkit.recipes.speedrun import default_schedule

    assert (SpeedrunConfig().schedule, SpeedrunConfig().min_lr) == (None, None)
    assert default_schedule("float32") == ("linear", 0.0) and default_schedule("bfloat16") == ("cosine", 1e-4)
    cfg = load_config(SpeedrunConfig, None, ["schedule=cosine", "min_lr=0.001"])
    assert (cfg.schedule, cfg.min_lr) == ("cosine", 0.001)


def test_speedrun_end_to_end(tmp_path, monkeypatch, capsys):
    n = torch.get_num_threads()
    corpus = tmp_path / "c.txt"
    corpus.write_text((REPO / "llmkit" / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    monkeypatch.chdir(tmp_path)
    args = ["speedrun", "--minutes", "0.5", "--quiet", f"corpus={corpus}", "vocab_size=300", "seq_len=64",
            "batch_size=8", "model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.n_kv_head=2",
            "model.d_ff=128", "reserve_s=4", "threads=1", "eval_every=25", "sample_tokens=16"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "held-out bits per byte" in out
    runs = list(tmp_path.glob("speedrun-*"))
    assert len(runs) == 1  # default: a fresh timestamped directory
    run = runs[0]
    r = json.loads((run / "speedrun.json").read_text())
    assert (run / "loss.png").stat().st_size > 1000 and "held-out bits per byte" in (run / "report.md").read_text()
    assert r["steps"] > 5 and 0 < r["heldout_bits_per_byte"] < 8 and r["wall_s"] < 30 + 20
    assert 0 < r["averaged_steps"] < r["steps"]  # the final weights are the mean over the last 20%
    assert f"mean of the last {r['averaged_steps']:,} steps" in (run / "report.md").read_text()
    held = run / "data" / "heldout.txt"
    assert held.read_bytes() == corpus.read_bytes()[len(corpus.read_bytes()) * 9 // 10:]
    # the reported number is what `llmkit score` says about the final checkpoint
    assert main(["score", "--model", r["final_checkpoint"], "--file", str(held), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert abs(scored["bits_per_byte"] - r["heldout_bits_per_byte"]) < 1e-6
    # refuses to overwrite an existing output directory
    assert main(["speedrun", "--minutes", "0.5", "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_depth_is_sized_to_the_machine():
    """Without model.n_layer the speedrun takes the deepest of `depths` whose measured step leaves
    `min_steps` steps in the budget, else the shallowest; model.n_layer pins it."""
    from llmkit.config import load_config
    from llmkit.recipes.speedrun import pick_depth, step_seconds

    small = ["vocab_size=300", "seq_len=32", "batch_size=2", "model.d_model=32", "model.n_head=2",
             "model.n_kv_head=2", "model.d_ff=64", "depths=[3, 1]"]
    cfg = load_config(SpeedrunConfig, None, small + ["min_steps=0"])
    assert "n_layer" not in cfg.model and cfg.depths == [3, 1]
    assert step_seconds(cfg, "float32", 1) > 0
    assert pick_depth(cfg, "float32", 60.0)[0] == 3  # any step time leaves >= 0 steps
    d, why = pick_depth(load_config(SpeedrunConfig, None, small + ["min_steps=1000000000"]), "float32", 60.0)
    assert d == 1 and "3 layers:" in why and "1 layers:" in why  # neither fits: the shallowest
    assert pick_depth(load_config(SpeedrunConfig, None, small + ["model.n_layer=2"]), "float32", 60.0) == (
        2, "set by model.n_layer")
