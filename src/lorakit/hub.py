"""Hub model ids, looked up once before transformers is asked to load one.

transformers retries an unreachable hub for tens of seconds (about 50 in ``lorakit train``),
then fails with a traceback. Instead, a hub id is looked up here first: with ``HF_HUB_OFFLINE``
set, in the local hub cache only; otherwise with one request to the hub, the one transformers
makes first (the model's ``config.json``; ``HF_HUB_ETAG_TIMEOUT`` seconds at most, no retries). A model the hub has loads as usual; one
it cannot give (no such model, gated, or the hub unreachable and nothing cached) is a one-line
error naming what was tried and how to load a model offline.
"""

from __future__ import annotations

import functools
from pathlib import Path


def _cached_folder(repo_id: str) -> str | None:
    """The local snapshot folder of ``repo_id`` in the hub cache, if its config is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def _offline_hint(repo_id: str) -> str:
    return (
        f"to work offline, download it where the hub is reachable (hf download {repo_id} "
        f"--local-dir DIR) and pass that folder, or use a built-in model"
    )


@functools.cache
def locate(repo_id: str, builtins: tuple[str, ...] = ()) -> str:
    """What transformers should load for hub id ``repo_id``: the id itself when the hub has the
    model (or ``HF_HUB_OFFLINE`` is set and the hub cache holds it), or the cached snapshot
    folder when the hub cannot be reached but the cache holds it.

    Args:
        repo_id: a hub model id (``org/name``).
        builtins: the built-in model names, for the error message.

    Raises:
        FileNotFoundError: the model is neither cached nor obtainable from the hub; one line
            naming what was tried and how to load a model offline.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    tried = f"model {repo_id!r}: not a local folder, not a built-in model ({', '.join(builtins)})"
    cached, hub = _cached_folder(repo_id), constants.ENDPOINT
    if is_offline_mode():
        if cached:
            return repo_id  # transformers reads the cache itself in offline mode
        raise FileNotFoundError(
            f"{tried}, and not in the hub cache ({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is "
            f"set, so the hub was not asked. Unset HF_HUB_OFFLINE to download it, or "
            f"{_offline_hint(repo_id)}"
        )
    try:
        url = hf_hub_url(repo_id, "config.json")
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return repo_id
    except HFValidationError as e:
        problem = f"not a valid hub id either ({e})"
    except GatedRepoError:
        problem = f"it is gated: accept its terms at {hub}/{repo_id} and log in (hf auth login)"
    except RepositoryNotFoundError:
        problem = f"the hub ({hub}) has no such model (if it is private: hf auth login)"
    except EntryNotFoundError:
        problem = f"the hub's {repo_id} has no config.json: not a transformers model"
    except Exception as e:  # unreachable, refused, timed out, a 5xx: the client's own errors
        if cached:
            return cached  # the cached copy, read without asking the hub again
        reason = " ".join(str(e).split())[:200]
        problem = (
            f"not in the hub cache ({constants.HF_HUB_CACHE}), and the hub ({hub}) could not "
            f"be reached ({type(e).__name__}: {reason}); {_offline_hint(repo_id)}"
        )
    raise FileNotFoundError(f"{tried}, and {problem}")
