"""Load a model on the engine thread: real weights through mlx-lm, or dummy weights.

Dummy weights (LOAD_FORMAT=dummy) build the architecture from config.json and keep
MLX's random initialisation, like vLLM's dummy load format: benchmarks of a
model's shape need no download.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from engine.model import LoadedModel, context_length_of
from engine.model_source import ModelSource


def load(source: ModelSource, load_format: str = "weights", with_weights: bool = True, group=None,
         tokenizer=None) -> LoadedModel:
    """The model; without weights, only its text side (tokenizer, config, limits): a model
    loaded on demand is validated against while its weights stay on disk. In a distributed
    group (engine.distributed.StepGroup) the weights are split across its ranks before they load.

    `tokenizer`: the one the text side already built, for a load on demand. Building a fast
    tokenizer holds the GIL for its whole length (about 0.1 s for SmolLM2's, more for Qwen2.5's
    151k vocabulary), and a load on demand runs on the engine thread while the event loop
    serves: building it again would stall every open stream for nothing."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load as mlx_load

    split = group is not None and group.size > 1
    if not with_weights:
        path = Path(source.location) if source.is_local else _local_copy(source.location)
        model, tokenizer, config = _load_dummy(path, build=False)
        split = False
    elif load_format == "dummy":
        model, tokenizer, config = _load_dummy(Path(source.location), tokenizer=tokenizer)
    elif load_format == "synthetic":  # HTTP-path benchmark: tokenizer and config, no weights
        model, tokenizer, config = _load_dummy(Path(source.location), build=False, tokenizer=tokenizer)
        split = False
    elif tokenizer is not None:  # the weights alone
        from mlx_lm.utils import _download, load_model

        path = Path(source.location) if source.is_local else Path(_download(source.location))
        model, config = load_model(path, lazy=split)
    else:  # lazily: in a group each rank reads only its part of the weights
        model, tokenizer, config = mlx_load(source.location, return_config=True, lazy=split)
    if split:
        from engine.distributed import shard

        how = shard(model, group.group)
        logging.getLogger("orchard.engine").info("%s split across %d ranks: %s", source.model_id, group.size, how)
    params = tree_flatten(model.parameters())
    mx.eval([p for _, p in params])
    dtypes = {str(p.dtype).replace("mlx.core.", "") for _, p in params}
    return LoadedModel(
        model_id=source.model_id,
        path=Path(source.location),
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length_of(config),
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        weight_bytes=sum(p.nbytes for _, p in params),
        dtype=",".join(sorted(dtypes)),
        created=int(time.time()),
    )


def weight_file_bytes(location: str) -> int:
    """The weights' size on disk: the memory a load will need, known before loading."""
    path = Path(location)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def _local_copy(repo: str) -> Path:
    from mlx_lm.utils import _download

    return Path(_download(repo))


def _load_dummy(path: Path, build: bool = True, tokenizer=None):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes, load_tokenizer

    config = json.loads((path / "config.json").read_text())
    if build:
        mx.random.seed(0)  # the same random weights in every process: ranks and runs compare
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
        model.set_dtype(getattr(mx, config.get("torch_dtype", "float32"), mx.float32))
    else:
        model = nn.Module()
    if tokenizer is None:
        eos = config.get("eos_token_id")
        tokenizer = load_tokenizer(path, eos_token_ids=[eos] if isinstance(eos, int) else eos)
    return model, tokenizer, config
