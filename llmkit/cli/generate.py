"""`llmkit generate`: complete a prompt (or answer it as a chat turn) with any decoding strategy.

Prints only the completion on stdout; --json prints one object with text, token ids, log-probs,
finish_reason and timings. `add_sampling_args` / `sampling_params` are shared with `llmkit chat`.
"""

from __future__ import annotations

import json
import sys

from ..devices import add_device_arg
from ..errors import LLMKitError


def add_sampling_args(p) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen tokens (1 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="minus this times a token's output count")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="minus this for tokens already output")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-id", action="append", type=int, default=[], metavar="ID",
                   help="extra stop token id (repeatable; the tokenizer's end tokens always stop)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end tokens")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--truncate", action="store_true",
                   help="drop the oldest prompt tokens when the prompt does not fit the context window")
    g.add_argument("--quant", choices=["int8", "int4", "nf4"], help="quantize the weights on the fly (int8/int4: "
                   "weight-only kernels for faster CPU decoding); `llmkit quantize` writes such a checkpoint once")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="load the weights dequantised in this dtype "
                   "(default: a GGUF's quantized weights stay quantized on the CPU, other models load in float32)")


def sampling_params(args, tok, **over):
    from ..inference import SamplingParams

    stop_ids = set(args.stop_id)
    if not args.ignore_eos and tok is not None:
        stop_ids |= set(tok.stop_ids)
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, max_new_tokens=args.max_new_tokens,
              stop_ids=tuple(sorted(stop_ids)), stop=tuple(args.stop), seed=args.seed)
    kw.update(over)
    return SamplingParams(**kw)


def load(spec: str, args, need_tokenizer: bool = True):
    """The model (on --device, with --adapter and --quant applied) and its tokenizer."""
    from ..devices import resolve_device
    from ..loading import load_model

    quant = getattr(args, "quant", None)
    # the int8/int4 kernels are CPU kernels: auto means the CPU with --quant
    name = getattr(args, "device", "auto")
    device = resolve_device("cpu" if quant and name == "auto" else name)
    if quant and device.type != "cpu":
        raise LLMKitError(f"--quant {quant} runs on the CPU only (CPU int8/int4 kernels): drop --device {name}")
    from ..quant import fuse_projections

    import torch

    from . import returning_freed_buffers

    dtype = getattr(args, "dtype", None)
    with returning_freed_buffers():  # load-time temporaries go back to the OS; later steps reuse freed buffers
        model, tok = load_model(spec, adapter=getattr(args, "adapter", None), device=device, quant=quant,
                                dtype=getattr(torch, dtype) if dtype else None)
        if tok is None and need_tokenizer:
            raise LLMKitError(f"{spec} has no tokenizer to encode the prompt with")
        model = fuse_projections(model)  # q/k/v and gate/up in one matmul each (any kind of projection)
    return model, tok


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """Render the chat template with the assistant turn opened (Tokenizer.encode_chat)."""
    return tok.encode_chat(messages)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion of a prompt")
    p.add_argument("--model", required=True, help="registry name, GGUF file, HF directory or llmkit checkpoint")
    p.add_argument("--adapter", help="adapter directory applied on top of the model")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--system", help="system message (with --chat)")
    add_sampling_args(p)
    add_device_arg(p)
    p.add_argument("--n", type=int, default=1, help="number of samples")
    p.add_argument("--best-of", type=int, default=0, metavar="N",
                   help="sample N candidates and print the one with the best mean log-prob")
    p.add_argument("--logprobs", type=int, default=0, metavar="K", help="report the top K alternatives per token")
    p.add_argument("--draft-model", help="speculative decoding with this draft model (same vocabulary)")
    p.add_argument("--draft-layers", type=int, metavar="L",
                   help="speculative decoding with the target's first L layers as the draft")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="tokens the draft proposes per step")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--compile", action="store_true", help="decode through a torch.compile'd step (1.7-1.9x eager's "
                   "decode tok/s on SmolLM2 int4, 2 cores, BENCHMARKS.md; the first run of a process compiles "
                   "for ~10-65 s, so it pays for long outputs, not for a 16-token answer)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, log-probs, "
                   "finish_reason, timings)")
    p.set_defaults(func=run)


def _completion_json(c) -> dict:
    d = {"text": c.text, "tokens": c.tokens, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
    if c.top_logprobs:
        d["top_logprobs"] = [[[i, lp] for i, lp in top] for top in c.top_logprobs]
    if c.score is not None:
        d["score"] = c.score
    return d


def run(args) -> int:
    from ..inference import best_of_n, generate, speculative_generate, stream, truncated_draft

    if args.stream and args.json:
        raise LLMKitError("--stream and --json cannot be combined")
    if args.n < 1:
        raise LLMKitError(f"--n must be >= 1, got {args.n}")
    if args.best_of < 0:
        raise LLMKitError(f"--best-of must be >= 1, got {args.best_of}")
    speculative = args.draft_model or args.draft_layers is not None
    if args.draft_model and args.draft_layers is not None:
        raise LLMKitError("give either --draft-model or --draft-layers, not both")
    if (args.stream or speculative or args.best_of) and args.n != 1:
        raise LLMKitError("--n > 1 cannot be combined with --stream, --best-of or a draft model")
    if args.stream and (speculative or args.best_of):
        raise LLMKitError("--stream cannot be combined with --best-of or a draft model")
    if not args.prompt:
        raise LLMKitError("empty prompt: give --prompt TEXT")
    if args.system and not args.chat:
        raise LLMKitError("--system needs --chat")
    sampling_params(args, None)  # bad values fail before the model loads
    model, tok = load(args.model, args)
    params = sampling_params(args, tok, n=args.n, logprobs=args.logprobs)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = chat_ids(tok, messages + [{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    if args.stream:
        for delta in stream(model, tok, ids, params, truncate=args.truncate):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if speculative:
        if args.draft_model:
            draft, dtok = load(args.draft_model, args)
            if dtok.fingerprint() != tok.fingerprint():
                raise LLMKitError(f"the draft model {args.draft_model} has a different tokenizer from "
                                  f"{args.model}: speculative decoding needs a shared vocabulary")
        else:
            draft = truncated_draft(model, args.draft_layers)
        g = speculative_generate(model, draft, ids, params, k=args.num_draft_tokens, tokenizer=tok,
                                 truncate=args.truncate)
    elif args.best_of:
        g = best_of_n(model, ids, params, args.best_of, tokenizer=tok, truncate=args.truncate)
    else:
        g = generate(model, ids, params, tokenizer=tok, truncate=args.truncate, compiled=args.compile)
    if args.json:
        out = {"prompt_tokens": len(g.prompt_tokens), **_completion_json(g.completions[0]),
               "timings": {k: round(v, 6) if isinstance(v, float) else v for k, v in g.timings.items()}}
        if len(g.completions) > 1:
            out["completions"] = [_completion_json(c) for c in g.completions]
        if g.stats:
            out["stats"] = g.stats
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print("\n---\n".join(c.text for c in (g.completions[:1] if args.best_of else g.completions)))
    if speculative:
        s = g.stats
        print(f"speculative: {s['accepted']}/{s['proposed']} draft tokens accepted "
              f"({s['acceptance_rate']:.1%}), {s['target_forwards']} target forwards", file=sys.stderr)
    return 0
