"""Finding extractor weights on disk: local files by their upstream names; a hub id only when the user gives one."""

from __future__ import annotations

from pathlib import Path


class WeightsNotFoundError(FileNotFoundError):
    """A weights file or model folder an extractor needs is not where the config says; the message names both."""


def weights_file(weights_dir: str | Path | None, filename: str, source: str, hub_id: str | None = None) -> Path:
    """Path of ``filename`` in ``weights_dir``, or downloaded from ``hub_id`` when (and only when) one is given.

    Args:
        weights_dir: local folder holding the upstream file.
        filename: the upstream file name, e.g. ``ControlNetHED.pth``.
        source: where a user gets the file, quoted in the error, e.g. ``lllyasviel/Annotators``.
        hub_id: a Hugging Face repo to download from instead of ``weights_dir``.
    """
    if hub_id is not None:
        if weights_dir is not None:
            raise ValueError(f"give weights_dir or hub_id, not both (got {weights_dir} and {hub_id})")
        from huggingface_hub import hf_hub_download  # only reached when the user asked for the hub

        return Path(hf_hub_download(hub_id, filename))
    if weights_dir is None:
        raise WeightsNotFoundError(
            f"no weights_dir given: set condition.extractor.weights_dir to a folder holding {filename} "
            f"(from {source}), or hub_id to download it"
        )
    path = Path(weights_dir) / filename
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}; put {filename} from {source} there")
    return path


def model_folder(path: str | Path, source: str, marker: str = "config.json") -> str:
    """A local transformers/diffusers model folder (must contain ``marker``), or a hub id the user passed as such.

    A string that is not an existing folder is taken as a hub id only when it has the ``owner/name`` form *and*
    does not look like a path (no leading ``/``, ``.`` or ``~``); anything else is a missing folder.
    """
    text = str(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / marker).is_file():
            raise WeightsNotFoundError(f"model folder {folder} has no {marker}; put {source} there")
        return str(folder)
    if text.count("/") == 1 and not text.startswith(("/", ".", "~")) and not folder.exists():
        return text  # a hub id, passed explicitly by the user
    raise WeightsNotFoundError(f"model folder not found: {folder}; put {source} there")


def load_transformers_model(
    path: str | Path,
    auto_class: str,
    source: str,
    device: str = "cpu",
    processor_class: str = "AutoImageProcessor",
    required_files: tuple[str | tuple[str, ...], ...] = ("preprocessor_config.json",),
):
    """(processor, model in eval mode) from a transformers model folder, or from a hub id given as such.

    Args:
        auto_class: the ``transformers`` auto class, e.g. ``AutoModelForDepthEstimation``.
        source: what belongs in the folder, quoted in errors, e.g. ``a DPT depth model (Intel/dpt-hybrid-midas)``.
        processor_class: ``AutoImageProcessor``, or ``AutoProcessor`` for models that also take text.
        required_files: files a local folder must hold besides ``config.json`` (checked before loading, so a
            missing one is a one-line error naming the folder); a tuple entry means any one of those names.
    """
    import transformers

    where = model_folder(path, source)
    local = Path(where).is_dir()
    for names in required_files if local else ():
        names = (names,) if isinstance(names, str) else names
        if not any((Path(where) / name).is_file() for name in names):
            raise WeightsNotFoundError(f"model folder {where} has no {' or '.join(names)}; put {source} there")
    processor = getattr(transformers, processor_class).from_pretrained(where, local_files_only=local)
    model = getattr(transformers, auto_class).from_pretrained(where, local_files_only=local)
    return processor, model.eval().requires_grad_(False).to(device)


class UnsafeWeightsError(ValueError):
    """A weights file is a pickle that would run code when loaded; ctrlkit refuses it and says why."""


def load_state_dict_file(path: str | Path) -> dict:
    """Tensors of a weights file, loaded without running any code from it.

    ``.safetensors`` files load with safetensors (the default format everywhere in ctrlkit); anything else goes
    through ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain containers.

    Raises:
        UnsafeWeightsError: the file is a pickle that needs arbitrary code (a class or function from a module);
            the message names the offending global and says why it is refused.
    """
    import pickle

    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeWeightsError(unsafe_pickle_message(path, error)) from error


def unsafe_pickle_message(path: str | Path, error: Exception) -> str:
    """One line: which global the pickle at ``path`` wanted and why ctrlkit will not load it."""
    detail = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
    what = f" ({detail.rstrip('.')})" if detail else ""
    return (
        f"refusing to load {path}: it is a pickle that needs to run code to load{what}; loading it could execute "
        f"anything, so ctrlkit only reads safetensors or plain-tensor pickles (torch.load weights_only=True). "
        f"Convert it to .safetensors from a trusted copy"
    )
