"""Upload an export folder to the Hugging Face Hub (create_repo + upload_folder), refusing to leak a token.

The token comes from the `token` argument, else the `HF_TOKEN` variable or the saved login (`hf auth login`), as
huggingface_hub resolves them. It is only ever handed to huggingface_hub, which sends it in the Authorization header;
mcit never prints it, logs it or writes it anywhere. Before any request, every file in the folder is scanned for the
token itself and for any token-looking string (`hf_` + 20 alphanumerics): a model card or config that captured a
token from an environment dump must not become public.

The endpoint is read at call time (`endpoint` argument, else `HF_ENDPOINT`, else huggingface_hub's default): the
library itself reads `HF_ENDPOINT` once at import, which would make a later change of the variable silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from mcit.errors import McitError
from mcit.version import __version__

try:  # the HTTP client under huggingface_hub (2.x: httpx2; 1.x: httpx)
    from httpx2 import RequestError as _RequestError
except ImportError:  # pragma: no cover - depends on the installed huggingface_hub
    from httpx import RequestError as _RequestError

TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{20}")  # 20 is enough to flag; longer tokens match their prefix
_CHUNK = 1 << 20
_HINTS = {
    401: "the token is invalid or expired; log in again (`hf auth login`) or set HF_TOKEN",
    403: "the token has no write access to this namespace; use a write token or another repo id",
    404: "repository or namespace not found; check the repo id",
}


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload mcit export",
    *,
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` if needed (exist_ok) and upload `folder` in one commit; return the commit URL.

    Raises McitError, with one line naming the endpoint (never the token), for offline mode, a missing token, a
    token found in the folder, an HTTP error from the Hub, or an unreachable endpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise McitError(f"export folder {folder} does not exist or is not a directory")
    if _offline():
        raise McitError(
            "HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set, so nothing can be uploaded to the Hub; unset it "
            f"to push, or upload the folder {folder.name!r} later"
        )
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token = token or get_token()
    if not token:
        raise McitError("no Hub token: pass --token, set HF_TOKEN, or log in once with `hf auth login`")
    scan_for_tokens(folder, token)

    api = HfApi(endpoint=endpoint, token=token, library_name="mcit", library_version=__version__)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        step = "upload the folder"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise McitError("huggingface_hub is in offline mode (HF_HUB_OFFLINE); unset it to push") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        hint = _HINTS.get(status, "see the Hub's status page or retry later")
        raise McitError(f"the Hub at {endpoint} refused to {step} for {repo_id} (HTTP {status}): {hint}") from None
    except (_RequestError, ConnectionError, TimeoutError) as error:
        raise McitError(
            f"cannot reach the Hub at {endpoint} to {step} ({type(error).__name__}); check the network or HF_ENDPOINT"
        ) from None
    return str(info.commit_url)


def scan_for_tokens(folder: str | Path, token: str | None = None) -> None:
    """Raise McitError naming the first file of `folder` that contains `token` or a token-looking string."""
    needles = [token.encode()] if token else []
    overlap = max([64, *(len(n) for n in needles)])
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        tail = b""
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                window = tail + chunk
                if any(n in window for n in needles) or TOKEN_PATTERN.search(window):
                    raise McitError(
                        f"{path.relative_to(folder)} contains an access token (or a string that looks like one); "
                        "remove it before uploading — nothing was sent"
                    )
                tail = window[-overlap:]


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(str(v).upper() in {"1", "ON", "YES", "TRUE"} for v in flags if v)
