"""llama.cpp (llama-cpp-python), the reference engine of the benchmarks. Imports no torch, so a child
process that runs only llama.cpp measures llama.cpp's own memory."""


import contextlib


@contextlib.contextmanager
def no_extra_bufts():
    """See load_llama: llama.cpp's default model params with extra buffer types turned off."""
    import llama_cpp.llama_cpp as lc

    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lc.llama_model_default_params = params
    try:
        yield
    finally:
        lc.llama_model_default_params = default


def serve():
    """llama-cpp-python's OpenAI server (`python -m llama_cpp.server` arguments) with the patch of
    load_llama, for `llmkit bench serve --compare llama.cpp`."""
    import sys

    from llama_cpp.server.__main__ import main

    sys.argv[0] = "llama_cpp.server"
    with no_extra_bufts():
        main()


def load_llama(path, threads: int, n_ctx: int, **kwargs):
    """llama.cpp with its standard CPU kernels. Its AMX "extra buffer" path (chosen automatically on
    CPUs with AMX when built with GGML_NATIVE) segfaults in ggml_backend_amx_mul_mat on multi-token
    batches of this Q4_1 model (llama-cpp-python 0.3.36), so extra buffer types are turned off; the
    high-level `Llama` has no argument for it, hence the scoped patch of its default model params.
    `kwargs` go to `Llama` (e.g. logits_all=True to read every position's logits)."""
    from llama_cpp import Llama

    with no_extra_bufts():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                     **kwargs)
