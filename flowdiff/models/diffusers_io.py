"""Local diffusers models and pipelines as probability flows, offline.

:func:`from_diffusers` reads a directory written by diffusers' ``save_pretrained``:

* a pipeline directory (``model_index.json``): its denoiser (``unet/`` or ``transformer/``),
  ``scheduler/``, and where present ``vae/`` (the flow then lives in latent space, with an
  :class:`~flowdiff.models.pipelines.Autoencoder`; for Flux a :class:`~flowdiff.models.pipelines.PackedAutoencoder`)
  and ``tokenizer/`` + ``text_encoder/`` (a :class:`~flowdiff.models.pipelines.PromptEncoder`, for CLIP text
  encoders as in Stable Diffusion 1/2; for SD3's two CLIP + T5 and Flux's CLIP + T5, with their
  tokenizers, a :class:`~flowdiff.models.pipelines.PipelinePromptEncoder` running the pipeline's own
  ``encode_prompt``; for SDXL's two CLIP encoders also the pooled embedding and size ids);
* a model directory (``config.json`` of a supported denoiser and its weights), whose scheduler
  config is ``scheduler_config.json`` beside it, in ``../scheduler/``, or given as ``scheduler=``.

Denoisers: ``UNet2DModel``, ``UNet2DConditionModel`` (Stable Diffusion), ``DiTTransformer2DModel``
(class-conditional), ``SD3Transformer2DModel`` and ``FluxTransformer2DModel`` (flow matching).
A learned-variance output (twice the input's channels: DiT, improved DDPM) gives its ε half.
Keyword arguments (``encoder_hidden_states``, ``class_labels``, ``pooled_projections``, …)
reach the denoiser unchanged.

From the scheduler config only the model's training definition is used (see
:func:`flowdiff.engine.scheduler_grids.schedule_from_config`); its sampling settings describe one
grid, which :func:`flowdiff.scheduler_sigmas` reproduces. Nothing is downloaded
(``local_files_only``); missing or corrupt files are errors naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..engine._checks import check_device
from ..engine.scheduler_grids import FLOW_MATCHING_SCHEDULERS, config_of, read_json, schedule_from_config
from .pipelines import Autoencoder, DiffusersFlow, PackedAutoencoder, PipelinePromptEncoder, PromptEncoder

__all__ = ["DiffusersModel", "DiffusersUNet", "SUPPORTED_MODELS", "from_diffusers", "schedule_from_config"]

#: denoiser class → the factor diffusers' pipelines apply to the scheduler's timestep before the model
SUPPORTED_MODELS = {
    "UNet2DModel": 1.0,
    "UNet2DConditionModel": 1.0,
    "DiTTransformer2DModel": 1.0,
    "SD3Transformer2DModel": 1.0,
    "FluxTransformer2DModel": 1e-3,  # FluxPipeline feeds timestep / 1000
}
_DENOISER_KEYS = ("unet", "transformer")
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")
_TEXT_ENCODERS = ("CLIPTextModel",)
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
#: pipelines whose text encoders are loaded and run through the pipeline's own encode_prompt → their suffixes
_TEXT_PIPELINES = {"StableDiffusion3Pipeline": ("", "_2", "_3"), "FluxPipeline": ("", "_2"),
                   "StableDiffusionXLPipeline": ("", "_2")}
#: the guidance scale each pipeline uses by default (FluxPipeline's true_cfg_scale: no guidance)
_DEFAULT_GUIDANCE = {"StableDiffusion3Pipeline": 7.0, "FluxPipeline": 1.0, "StableDiffusionXLPipeline": 5.0}


class DiffusersModel(nn.Module):
    """A diffusers denoiser in flowdiff's convention ``model(x_t, t, **kwargs) -> Tensor``.

    The input is cast to the network's dtype and the output returned in the input's dtype, so
    a float16 network serves a float32 solve and a float32 one a float64 solve. The time is
    passed as ``timestep=t·time_scale``; floating-point keyword tensors are cast to the network's
    dtype, and those of batch size 1 (one prompt's embedding) broadcast to the input's batch.
    An output with twice the input's channels is a learned-variance prediction ([ε, variance]);
    its first half, ε, is returned.
    ``sample_shape`` is one sample's (channels, height, width) (for Flux's packed latents
    (tokens, channels) when its pipeline's VAE fixes the image size, else None).

    Flux's position ids, when not given as ``img_ids``/``txt_ids``: the image tokens' (row, column)
    ids of diffusers' ``FluxPipeline._prepare_latent_image_ids`` for the token grid that
    ``token_grid(tokens)`` gives (from the pipeline's :class:`~flowdiff.models.pipelines.PackedAutoencoder`,
    else a square grid), and zeros for the text tokens (as FluxPipeline's ``text_ids``). Kept
    out of ``model_kwargs`` so that those carry only batched tensors (guidance pairs them).
    """

    def __init__(self, net: nn.Module, time_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.time_scale = float(time_scale)
        cfg = net.config
        size = getattr(cfg, "sample_size", None)
        self.packed = type(net).__name__ == "FluxTransformer2DModel"
        #: SDXL's UNet: pooled text embeddings and size ids as ``added_cond_kwargs``
        self.text_time = getattr(cfg, "addition_embed_type", None) == "text_time"
        self.token_grid: Any = None
        self._ids: dict[tuple, Tensor] = {}
        if size is None:  # Flux works on packed (batch, tokens, channels) latents whose length the caller picks
            self.sample_shape: tuple[int, ...] | None = None
        else:
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            self.sample_shape = (int(cfg.in_channels), int(h), int(w))
        channels = getattr(cfg, "in_channels", None)
        #: checked by the entry points before a solve (ProbabilityFlow.check_input): the channels, any height and width
        self.input_shape = None if self.packed or channels is None else (int(channels), None, None)
        #: the rows of the network's class-label table (labels 0 … rows − 1; a DiT's last row is its null class), or
        #: None where it takes no class labels (a UNet without class embedding ignored them) or reads them otherwise
        self.class_rows, self.takes_class_labels = _class_table(net)
        #: the conditioning keywords the network cannot run without (SD3 and Flux failed on None with an AttributeError)
        self.required_kwargs = _REQUIRED_KWARGS.get(type(net).__name__, ())
        #: keywords a UNet2DConditionModel's forward accepts and cannot use for its config (dropped, or a crash) → why
        self.ignored_kwargs: dict[str, str] = {}
        if type(net).__name__ == "UNet2DConditionModel":
            if getattr(cfg, "addition_embed_type", None) is None:
                self.ignored_kwargs["added_cond_kwargs"] = "it has no addition_embed_type: they are dropped"
            if getattr(cfg, "time_cond_proj_dim", None) is None:
                self.ignored_kwargs["timestep_cond"] = "it has no time_cond_proj_dim: a 'NoneType' error"
        if self.packed and channels is not None:  # Flux: (tokens, in_channels) packed latents, any number of tokens
            self.input_shape = (None, int(channels))

    def _position_ids(self, x_t: Tensor, model_kwargs: dict[str, Any]) -> None:
        """Flux's img_ids and txt_ids, where the caller gave none (see the class docstring)."""
        dtype, device = self.net.dtype, x_t.device
        if "img_ids" not in model_kwargs:
            tokens = x_t.shape[1]
            key = ("img", tokens, device, dtype)
            if key not in self._ids:
                if self.token_grid is not None:
                    rows, cols = self.token_grid(tokens)
                else:
                    rows = cols = math.isqrt(tokens)
                    if rows * cols != tokens:
                        raise ValueError(f"Flux latents of {tokens} tokens are not a square grid: pass img_ids "
                                         "(FluxPipeline._prepare_latent_image_ids) in model_kwargs")
                from diffusers import FluxPipeline

                self._ids[key] = FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype)
            model_kwargs["img_ids"] = self._ids[key]
        text = model_kwargs.get("encoder_hidden_states")
        if "txt_ids" not in model_kwargs and isinstance(text, Tensor):
            key = ("txt", text.shape[1], device, dtype)
            if key not in self._ids:
                self._ids[key] = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
            model_kwargs["txt_ids"] = self._ids[key]

    def _check_class_labels(self, labels: Any, n: int) -> None:
        """Refuse class labels the network would ignore, miss, or fail on with an index error (the range is checked
        for labels on the CPU: elsewhere that would be a host sync at every evaluation)."""
        name = type(self.net).__name__
        if labels is None:
            if self.takes_class_labels:
                null = f" (its null class: {self.class_rows - 1})" if self.net_has_null else ""
                raise ValueError(f"this {name} is class-conditional and needs model_kwargs={{'class_labels': labels}}: "
                                 f"an integer tensor of shape (batch,) or (1,)"
                                 f"{'' if self.class_rows is None else f', values 0 … {self.class_rows - 1}'}; "
                                 "a guided flow's unconditional branch needs them too: classifier_free_guidance("
                                 f"flow, w, unconditional_kwargs={{'class_labels': null_labels}}){null}")
            return
        if not self.takes_class_labels:
            unset = " (num_class_embeds / class_embed_type unset)" if name.startswith("UNet") else ""
            raise ValueError(f"model_kwargs has class_labels, but this {name} has no class embedding{unset}, so it "
                             "would ignore them or fail on them; leave them out, or condition it by what it takes "
                             "(e.g. encoder_hidden_states)")
        if self.class_rows is None:
            return  # labels read through a timestep or identity embedding: the network's own business
        integer = isinstance(labels, Tensor) and not (labels.is_floating_point() or labels.is_complex()
                                                     or labels.dtype == torch.bool)
        if not integer or labels.ndim > 1 or (labels.ndim == 1 and labels.shape[0] not in (1, n)):
            got = (f"a {labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, Tensor)
                   else f"{type(labels).__name__} {labels!r}")
            raise ValueError(f"class_labels must be an integer tensor of shape ({n},) (one label per sample), (1,) "
                             f"or () (one for all), values 0 … {self.class_rows - 1}; got {got}")
        if labels.device.type == "cpu" and labels.numel():
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or high >= self.class_rows:
                raise ValueError(f"class_labels must lie in 0 … {self.class_rows - 1} (the rows of this {name}'s "
                                 f"class embedding{'; the last is its null class' if self.net_has_null else ''}), "
                                 f"got {labels.tolist()}")

    @property
    def net_has_null(self) -> bool:
        """Whether the label table's last row is the null class of classifier-free guidance (DiT's)."""
        return type(self.net).__name__ == "DiTTransformer2DModel"

    @property
    def unet(self) -> nn.Module:
        """The wrapped network (the name of the UNet-only wrapper this one generalises)."""
        return self.net

    def forward(self, x_t: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        channels = None if self.packed or self.sample_shape is None else self.sample_shape[0]  # Flux: (tokens, C)
        if channels is not None and (x_t.ndim != 4 or x_t.shape[1] != channels):
            raise ValueError(f"x_t must have shape (batch, {channels}, height, width): the network takes {channels} "
                             f"channel{'s' if channels != 1 else ''} (its in_channels); got {tuple(x_t.shape)}")
        patch = getattr(self.net.config, "patch_size", None) if channels is not None else None
        if isinstance(patch, int) and patch > 1 and (x_t.shape[-1] % patch or x_t.shape[-2] % patch):
            raise ValueError(f"x_t has height and width {tuple(x_t.shape[-2:])}; this {type(self.net).__name__} cuts "
                             f"its input into {patch}×{patch} patches, so both must be multiples of {patch}")
        missing = [k for k in self.required_kwargs if k not in model_kwargs]
        if missing:
            raise ValueError(f"this {type(self.net).__name__} needs {' and '.join(missing)} in model_kwargs (a text "
                             "pipeline's flow.encode_prompt([...]) gives them; a guided flow's unconditional_kwargs "
                             "need them too)")
        timestep = t if self.time_scale == 1.0 else t * self.time_scale
        n, dtype = x_t.shape[0], self.net.dtype
        self._check_class_labels(model_kwargs.get("class_labels"), n)
        ignored = [k for k in model_kwargs if k in self.ignored_kwargs]
        if ignored:
            why = "; ".join(self.ignored_kwargs[k] for k in ignored)
            raise ValueError(f"model_kwargs has {', '.join(ignored)}, which this {type(self.net).__name__} takes as an "
                             f"argument but has no use for ({why}); leave {'it' if len(ignored) == 1 else 'them'} out")
        for key, value in model_kwargs.items():
            if not isinstance(value, Tensor):
                continue
            if value.is_floating_point() and value.dtype != dtype:  # embeddings in the network's precision
                value = value.to(dtype)
            if value.ndim >= 1 and value.shape[0] == 1 and n > 1:  # one prompt's conditioning for the batch
                value = value.expand(n, *value.shape[1:])
            elif value.ndim >= 1 and value.shape[0] != n and key not in _UNBATCHED:
                raise ValueError(f"the model's keyword argument {key} has a batch of {value.shape[0]} (shape "
                                 f"{tuple(value.shape)}) for {n} sample{'s' if n != 1 else ''}: give one per sample or "
                                 "one for all (batch 1), in model_kwargs or a guided flow's unconditional_kwargs")
            model_kwargs[key] = value
        if self.packed:
            self._position_ids(x_t, model_kwargs)
        if self.text_time:
            missing = [k for k in ("text_embeds", "time_ids") if k not in model_kwargs]
            if missing:
                raise ValueError(f"an SDXL-style UNet (addition_embed_type='text_time') needs {' and '.join(missing)} "
                                 "in model_kwargs besides encoder_hidden_states (flow.encode_prompt gives all three)")
            model_kwargs["added_cond_kwargs"] = {k: model_kwargs.pop(k) for k in ("text_embeds", "time_ids")}
        out = self.net(x_t.to(self.net.dtype), timestep=timestep, return_dict=False, **model_kwargs)[0]
        if out.ndim == x_t.ndim and out.shape[1] == 2 * x_t.shape[1] and out.shape[2:] == x_t.shape[2:]:
            out = out[:, : x_t.shape[1]]  # learned variance: [ε, v]
        return out.to(x_t.dtype)


DiffusersUNet = DiffusersModel

#: the keywords each denoiser class needs (its text conditioning)
_REQUIRED_KWARGS = {"UNet2DConditionModel": ("encoder_hidden_states",),
                    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
                    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections")}
#: keyword tensors that are no batch (Flux's position ids: one row per token)
_UNBATCHED = ("img_ids", "txt_ids")


def _class_table(net: nn.Module) -> tuple[int | None, bool]:
    """(rows of the class-label embedding or None, whether the network takes class_labels at all)."""
    name = type(net).__name__
    if name == "DiTTransformer2DModel":
        table = next((m for k, m in net.named_modules() if k.endswith("class_embedder.embedding_table")), None)
        return (table.num_embeddings if isinstance(table, nn.Embedding) else None), True
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        embedding = getattr(net, "class_embedding", None)
        return (embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None), embedding is not None
    return None, False  # the transformers take no class_labels: a TypeError naming the argument, from the network


def _scheduler_config(scheduler: object, model_dir: Path) -> tuple[dict[str, Any], str]:
    """The scheduler config as a dict, and where it came from (for error messages)."""
    if scheduler is None:
        beside, sibling = model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"
        for candidate in (beside, sibling):
            if candidate.is_file():
                return read_json(candidate, "scheduler config"), str(candidate)
        raise FileNotFoundError(f"no scheduler config for the model in {model_dir}: looked for scheduler_config.json "
                                "there and in ../scheduler/; pass scheduler= (a directory, a scheduler_config.json "
                                "path, a dict or a diffusers scheduler)")
    config, source = config_of(scheduler)
    return config, ("scheduler=" if isinstance(scheduler, Mapping) else source)


def _components(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """The denoiser's directory inside a pipeline or model directory, and the pipeline's index (or None)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a diffusers model or pipeline saved with "
                                "save_pretrained)")
    index_path = path / "model_index.json"
    if index_path.is_file():
        index = read_json(index_path, "pipeline index")
        _check_components(index, index_path)
        for key in _DENOISER_KEYS:
            entry = index.get(key)
            if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
                if entry[1] not in SUPPORTED_MODELS:
                    raise ValueError(f"pipeline {path}: {key} is a {entry[1]}; supported: "
                                     f"{', '.join(SUPPORTED_MODELS)}")
                return path / key, index
        raise ValueError(f"pipeline {path} has no 'unet' or 'transformer' component in model_index.json "
                         f"(components: {', '.join(k for k in index if not k.startswith('_'))})")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a diffusers model or pipeline directory: it has neither model_index.json "
                         "nor config.json")
    return path, None


#: the model_index.json keys flowdiff reads as components: each a [library, class] pair, or [null, null] for none
_COMPONENT_KEYS = (*_DENOISER_KEYS, "vae", "scheduler", *(f"{kind}{suffix}" for kind in ("tokenizer", "text_encoder")
                                                          for suffix in ("", "_2", "_3")))


def _check_components(index: Mapping[str, Any], index_path: Path) -> None:
    """Refuse a component entry that is not ``[library, class]`` (or ``[null, null]``): read as absent, a damaged
    ``"vae"`` entry made the flow run without its autoencoder, with no word."""
    for key in _COMPONENT_KEYS:
        if key not in index:
            continue
        value = index[key]
        if not (isinstance(value, list) and len(value) == 2
                and all(v is None or isinstance(v, str) for v in value) and (value[0] is None) == (value[1] is None)):
            raise ValueError(f"{index_path}: {key!r} must be a [library, class] pair such as [\"diffusers\", "
                             f"\"AutoencoderKL\"] (or [null, null] for none), got {value!r}")
    for key, value in index.items():  # an autoencoder under another name (Kandinsky's movq) would be left out
        if key != "vae" and not key.startswith("_") and isinstance(value, list) and len(value) == 2 \
                and isinstance(value[1], str) and ("VQModel" in value[1] or value[1].startswith("Autoencoder")):
            raise ValueError(f"{index_path}: its autoencoder is {key!r} ({value[1]}); flowdiff reads a pipeline's "
                             "AutoencoderKL as 'vae' only, and without it the flow would run in latent space with no "
                             "decoder: not supported")


def _weights(directory: Path) -> list[str]:
    names = sorted(p.name for p in directory.iterdir() if p.name.startswith(_WEIGHT_PREFIXES)
                   and p.suffix in (".safetensors", ".bin", ".json"))
    weights = [n for n in names if not n.endswith(".json") or n.endswith(".index.json")]
    if not weights:
        raise FileNotFoundError(f"no weights in {directory}: expected diffusion_pytorch_model.safetensors "
                                "(or model.safetensors, .bin)")
    return weights


def _load(cls: Any, directory: Path, what: str, dtype: torch.dtype | None) -> nn.Module:
    """``cls.from_pretrained(directory)`` offline, with errors that name the directory and its files."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {directory} is missing")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{what} config {directory / 'config.json'} is missing")
    read_json(directory / "config.json", f"{what} config")
    weights = _weights(directory)
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        module, info = cls.from_pretrained(str(directory), **kwargs)
    except Exception as e:  # diffusers/transformers raise OSError, ValueError, RuntimeError or SafetensorError
        raise ValueError(f"could not load the {cls.__name__} weights in {directory} ({', '.join(weights)}): "
                         f"{type(e).__name__}: {e}") from None
    _check_loading_info(cls.__name__, directory, weights, info)
    if dtype is not None and any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype)  # some classes load part of their weights in float32 whatever torch_dtype says
    return module.eval().requires_grad_(False)


def _check_loading_info(name: str, directory: Path, weights: list[str], info: Mapping[str, Any]) -> None:
    """Refuse weights that do not fill the network its ``config.json`` builds: diffusers and transformers only log
    the parameters they leave at their random initialisation (missing, or of another shape) and the weights they
    drop (unexpected), and the model then samples noise-like images with no error."""
    problems = [f"{len(keys)} {what} (e.g. {', '.join(sorted(map(str, keys))[:3])})"
                for what, keys in (("parameters missing from the weights, left random", info.get("missing_keys")),
                                   ("parameters of another shape in the weights",
                                    [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]),
                                   ("weights the config has no parameter for", info.get("unexpected_keys")))
                if keys]
    if problems:
        raise ValueError(f"the {name} weights in {directory} ({', '.join(weights)}) do not match its config "
                         f"{directory / 'config.json'}: {'; '.join(problems)}; the folder is damaged or mixes two "
                         "models (save the model again with save_pretrained)")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("loading diffusers models needs diffusers: pip install 'flowdiff[diffusers]'") from None
    return diffusers


def _load_tokenizer(transformers: Any, class_name: str, directory: Path) -> Any:
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} is missing")
    try:
        return getattr(transformers, class_name).from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        files = ", ".join(sorted(p.name for p in directory.iterdir())) or "no files"
        raise ValueError(f"could not load the tokenizer in {directory} ({files}): {type(e).__name__}: {e}") from None


def _entry(index: Mapping[str, Any], key: str) -> str | None:
    value = index.get(key)
    return value[1] if isinstance(value, list) and len(value) == 2 and value[1] else None


def _prompt_encoder(root: Path, index: Mapping[str, Any], dtype: torch.dtype | None,
                    model_dtype: torch.dtype) -> PromptEncoder | PipelinePromptEncoder | None:
    tok, enc = _entry(index, "tokenizer"), _entry(index, "text_encoder")
    if tok is None or enc is None:
        return None
    pipeline_class = index.get("_class_name")
    multi = pipeline_class in _TEXT_PIPELINES
    if not multi and (tok not in _TOKENIZERS or enc not in _TEXT_ENCODERS
                      or _entry(index, "text_encoder_2") or _entry(index, "text_encoder_3")):
        return None  # text encoders of a pipeline flowdiff does not know: pass the embeddings as model_kwargs
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"pipeline {root} has a {enc} text encoder; loading it needs transformers: "
                          "pip install transformers") from None
    if not multi:
        tokenizer = _load_tokenizer(transformers, tok, root / "tokenizer")
        text_encoder = _load(getattr(transformers, enc), root / "text_encoder", "text encoder", dtype)
        return PromptEncoder(tokenizer, text_encoder, model_dtype)
    # SD3 / Flux: the pipeline's own encode_prompt over its tokenizers and text encoders, nothing else loaded
    components: dict[str, Any] = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    suffixes = _TEXT_PIPELINES[pipeline_class]
    if any(_entry(index, "tokenizer" + x) is None or _entry(index, "text_encoder" + x) is None for x in suffixes):
        return None  # e.g. SD3 saved without T5: the caller passes the embeddings as model_kwargs
    for suffix in suffixes:
        tok, enc = _entry(index, "tokenizer" + suffix), _entry(index, "text_encoder" + suffix)
        if not hasattr(transformers, tok) or not hasattr(transformers, enc):
            raise ValueError(f"pipeline {root}: tokenizer{suffix} {tok!r} or text_encoder{suffix} {enc!r} in "
                             "model_index.json is not a transformers class")
        components["tokenizer" + suffix] = _load_tokenizer(transformers, tok, root / ("tokenizer" + suffix))
        components["text_encoder" + suffix] = _load(getattr(transformers, enc), root / ("text_encoder" + suffix),
                                                     "text encoder", dtype)
    if pipeline_class == "StableDiffusionXLPipeline":
        components["add_watermarker"] = False
    pipeline = getattr(_diffusers(), pipeline_class)(**components)
    denoiser = "unet" if pipeline_class == "StableDiffusionXLPipeline" else "transformer"
    config = read_json(root / denoiser / "config.json", "model config")
    encoder = PipelinePromptEncoder(pipeline, model_dtype, guidance_embeds=bool(config.get("guidance_embeds", False)))
    if pipeline_class == "StableDiffusionXLPipeline":  # diffusers' default where the index does not say
        encoder.zeros_for_no_negative = bool(index.get("force_zeros_for_empty_prompt", True))
    return encoder


def from_diffusers(path: str | Path, *, scheduler: object = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> DiffusersFlow:
    """A :class:`~flowdiff.models.pipelines.DiffusersFlow` from a local diffusers model or pipeline directory.

    ``scheduler``: where the training schedule comes from if not beside the model (a directory,
    a ``scheduler_config.json`` path, a config dict or a diffusers scheduler object).
    ``device``/``dtype`` move every network (``dtype=torch.float16`` loads them in half precision,
    as diffusers' ``torch_dtype``; states stay in the caller's dtype). ``flow.model`` is a
    :class:`DiffusersModel` (``flow.model.sample_shape`` gives one sample's shape);
    ``flow.autoencoder`` and ``flow.encode_prompt`` exist for latent pipelines with a VAE and
    a CLIP text encoder.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a directory path (str or Path), got {type(path).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (float16, bfloat16, float32, float64), "
                        f"got {dtype!r}")
    if device is not None:
        device = check_device(device)  # before any weights are read
    root = Path(path)
    model_dir, index = _components(root)
    config_path = model_dir / "config.json"
    config = read_json(config_path, "model config")
    class_name = config.get("_class_name")
    architectures = config.get("architectures")
    if class_name is None and isinstance(architectures, list) and architectures:  # a transformers model's config
        raise ValueError(f"{config_path}: a transformers {', '.join(map(str, architectures))} (a text encoder?), not "
                         f"a diffusers denoiser; give the pipeline folder (with model_index.json) or its unet/ or "
                         f"transformer/ folder; supported denoisers: {', '.join(SUPPORTED_MODELS)}")
    if class_name not in SUPPORTED_MODELS:
        raise ValueError(f"{config_path}: model class {class_name!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODELS)}")
    sched_config, source = _scheduler_config(scheduler, model_dir)
    schedule, prediction_type = schedule_from_config(sched_config, source)
    flow_matching = prediction_type == "velocity"
    if class_name in ("SD3Transformer2DModel", "FluxTransformer2DModel") and not flow_matching:
        raise ValueError(f"{source}: a {class_name} is a flow-matching model; its scheduler config must be one of "
                         f"{', '.join(FLOW_MATCHING_SCHEDULERS)}, got {sched_config.get('_class_name')!r}")

    diffusers = _diffusers()
    net = _load(getattr(diffusers, class_name), model_dir, class_name, dtype)
    if device is not None:
        net.to(device)
    model = DiffusersModel(net, SUPPORTED_MODELS[class_name])
    flow = DiffusersFlow(model, schedule, prediction_type=prediction_type)
    flow.scheduler_config = dict(sched_config)
    flow.sample_shape = model.sample_shape
    flow.packed = model.packed
    if index is not None:
        vae_entry = index.get("vae")
        if isinstance(vae_entry, list) and vae_entry[1]:
            if vae_entry[1] not in ("AutoencoderKL",):
                raise ValueError(f"pipeline {root}: vae is a {vae_entry[1]}; supported: AutoencoderKL")
            vae = _load(diffusers.AutoencoderKL, root / "vae", "vae", dtype)
            if device is not None:
                vae.to(device)
            if model.packed:  # Flux: the flow runs on 2×2-packed latents, through diffusers' own (un)packing
                packed = PackedAutoencoder(vae, diffusers.FluxPipeline._pack_latents,
                                           diffusers.FluxPipeline._unpack_latents)
                flow.autoencoder = packed
                model.token_grid = packed.token_grid
                if packed.image_size is not None:
                    rows, cols = (s // packed.patch for s in packed.image_size)
                    flow.sample_shape = model.sample_shape = (rows * cols, int(net.config.in_channels))
            else:  # SDXL's pipeline reads the VAE's latents_mean/latents_std, SD's does not
                sdxl = index.get("_class_name") == "StableDiffusionXLPipeline"
                flow.autoencoder = Autoencoder(vae, latents_stats=sdxl)
        prompt_encoder = _prompt_encoder(root, index, dtype, net.dtype)
        if prompt_encoder is not None and device is not None:
            for encoder in getattr(prompt_encoder, "text_encoders", None) or [prompt_encoder.text_encoder]:
                encoder.to(device)
        if isinstance(prompt_encoder, PipelinePromptEncoder) and model.text_time and flow.autoencoder is not None:
            factor = 2 ** (len(flow.autoencoder.vae.config.block_out_channels) - 1)  # SDXL's default image size
            prompt_encoder.image_size = (model.sample_shape[1] * factor, model.sample_shape[2] * factor)
        flow.prompt_encoder = prompt_encoder
        flow.default_guidance = _DEFAULT_GUIDANCE.get(index.get("_class_name"), 7.5)
    return flow
