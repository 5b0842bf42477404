"""A base model folder from a GGUF file, for bases that are published only as GGUF.

Skill LoRAs are trained, composed and loaded on a Hugging Face model folder
(``config.json`` + ``model.safetensors`` + tokenizer). transformers' GGUF loader
(``from_pretrained(folder, gguf_file=...)``, which needs the ``gguf`` package) de-quantizes a
GGUF into plain fp32 weights; this module writes those weights as such a folder. Some
transformers releases refuse ``save_pretrained`` on a model loaded that way ("quantized with
gguf and is not serializable") although nothing in it is quantized any more: the loader's
marker is cleared before saving.

The result is the de-quantized model: for a Q4 GGUF it is *that* quantized model's weights in
fp32, not the original full-precision checkpoint. Train the skills and fit CAT on it; to run
the export in llama.cpp or Ollama, convert it with llama.cpp's ``convert_lora_to_gguf.py
--base FOLDER`` and load it next to the same GGUF (``--lora``, Ollama's ``ADAPTER``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import CatError


def base_folder_from_gguf(gguf_path: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Write the de-quantized model and tokenizer of ``gguf_path`` as a model folder.

    Args:
        gguf_path: a ``.gguf`` file of a model architecture transformers' GGUF loader knows
            (Llama, Qwen2, Mistral, ...).
        out_dir: the folder to write (created; files in it are replaced).
        dtype: the torch dtype of the saved weights (default ``torch.float32``, which keeps
            the de-quantized values exactly).

    Returns:
        ``out_dir`` as a Path, holding ``config.json``, ``model.safetensors``, the tokenizer
        files (with the GGUF's chat template) and ``generation_config.json``.

    Raises:
        CatError: the file is missing, the ``gguf`` package is not installed, or transformers
            cannot read the file (the message names it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise CatError(f"GGUF file not found: {gguf_path}")
    try:
        import gguf  # noqa: F401  (transformers' loader needs it)
    except ImportError as err:
        raise CatError("reading a GGUF needs the `gguf` package: pip install gguf") from err
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype or torch.float32
        )
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise CatError(f"transformers could not read {gguf_path}: {err}") from err
    _clear_gguf_marker(model)
    _align_special_tokens(tokenizer, model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _align_special_tokens(tokenizer, config) -> None:
    """Take end-of-sequence (and padding, when unset) from the model's config.

    transformers' GGUF tokenizer reader can name another token as EOS than the model's
    config does (SmolLM2's GGUF: ``<|im_start|>`` for the tokenizer, ``<|im_end|>`` in the
    config, which is where generation stops); trainers stop and mask on the tokenizer's.
    """
    eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token_id is None:
        pad = config.pad_token_id if config.pad_token_id is not None else eos
        if pad is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)


def _clear_gguf_marker(model) -> None:
    """Forget that the weights came from a GGUF: they are plain tensors once loaded.

    The config loses its ``quantization_config`` altogether: set to None, transformers 5.20
    writes ``"quantization_config": null`` into config.json, and Axolotl (0.19 and 0.21)
    then fails to train a plain LoRA on the folder ("'NoneType' object is not subscriptable",
    ``loaders/model.py``: it indexes the attribute whenever the config has one).
    """
    for attribute in ("gguf_file", "hf_quantizer"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)
    for attribute in ("gguf_file", "quantization_config"):
        if attribute in vars(model.config):
            delattr(model.config, attribute)
    if getattr(model, "quantization_config", None) is not None:
        model.quantization_config = None
    for attribute in ("is_quantized", "_is_quantized_training_enabled"):
        if getattr(model, attribute, False) is True:
            # a read-only property derived from hf_quantizer is already cleared
            with contextlib.suppress(AttributeError):
                setattr(model, attribute, False)
