"""Reading weights files without running code: `weights_only=True`, hash-checked hub files, key fitting."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import CnnCodesError
from ..runtime import file_sha256

HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")  # torch.hub's convention: NAME-<sha256 prefix>.pth


def load_state_file(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True (safetensors read as such): pickled objects are refused."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one clear line
            raise CnnCodesError(f"{path}: not a readable safetensors file ({_first_line(e)})") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CnnCodesError(
            f"{path}: refused: the file holds pickled Python objects, not only tensors "
            f"(loading it could run code); re-save it as a plain state_dict"
        ) from e
    except Exception as e:  # noqa: BLE001 - empty, text, truncated, foreign: one clear line, never a traceback
        raise CnnCodesError(f"{path}: not a readable PyTorch weights file ({_first_line(e)}); "
                            f"pass a state_dict saved with torch.save or a .safetensors file") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def hub_file(url: str, what: str, hint: str) -> Path:
    """The hub cache file for `url`, downloaded if missing, its sha256 checked against the prefix in its name.

    torch.hub checks the hash of fresh downloads only; a file already in the cache is checked
    here too, so a file planted in TORCH_HOME is refused before it is opened.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    m = HASH_IN_NAME.search(path.name)
    prefix = m.group(1) if m else None
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
        except Exception as e:  # noqa: BLE001 - offline, proxy, bad download: one clear line
            raise CnnCodesError(f"cannot download {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                f"offline? put the file at {path} (TORCH_HOME), {hint}") from e
        return path
    if prefix is not None:
        digest = file_sha256(path)
        if not digest.startswith(prefix):
            raise CnnCodesError(f"{path}: refused: its sha256 {digest[:12]}... does not start with {prefix} as its name says "
                                f"(a corrupt or replaced file); delete it to download {what} again, {hint}")
    return path


def unwrap_state_dict(state, name: str = "weights file") -> dict:
    """The tensors of a state_dict, unwrapped from common checkpoint containers and DDP/compile prefixes."""
    if not isinstance(state, dict):
        raise CnnCodesError(f"{name}: does not hold a state_dict (a dict of tensors) but a {type(state).__name__}")
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CnnCodesError(f"{name}: holds a dict without tensors, not a state_dict; pass the model's weights file")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in tensors.items()}


def fit_state(model: nn.Module, state: dict, classifier_prefixes: tuple[str, ...], arch: str, name: str,
              ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load every body tensor strictly; the classifier is loaded when present with matching shapes.

    A features-only file (no classifier keys) therefore loads: the classifier is new anyway
    (codes, fine-tuning, a fitted head). Anything else names the missing and unexpected keys.
    """
    state = {k: v for k, v in unwrap_state_dict(state, name).items() if not k.startswith(ignore_prefixes)}
    own = model.state_dict()

    def is_head(k: str) -> bool:
        return k.startswith(classifier_prefixes)

    body = {k: v for k, v in state.items() if not is_head(k)}
    own_body = {k for k in own if not is_head(k)}
    missing = sorted(own_body - body.keys())
    unexpected = sorted(body.keys() - own_body)
    wrong = sorted(k for k in own_body & body.keys() if tuple(own[k].shape) != tuple(body[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: file {tuple(body[k].shape)} vs {arch} {tuple(own[k].shape)})")
        raise CnnCodesError(f"{name}: weights do not fit --arch {arch}: keys {'; '.join(parts)}; "
                            f"pass the --arch these weights were trained for")
    head = {k: v for k, v in state.items() if is_head(k) and k in own and v.shape == own[k].shape}
    model.load_state_dict({**body, **head}, strict=False)
