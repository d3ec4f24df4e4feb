"""Pushing an export to the Hugging Face Hub, private unless asked, with its visibility checked."""

from __future__ import annotations

import os
from pathlib import Path

from lora_cai.errors import UserError
from lora_cai.export.weights import _last_line


def _hub_api(repo_id: str, repo_type: str = "model", public: bool = False):
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UserError(f"--push-to-hub {repo_id}: set HF_TOKEN to a Hugging Face write token (nothing was exported)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as e:
        raise UserError(f"--push-to-hub {repo_id}: cannot reach the Hugging Face Hub or the token is refused "
                        f"({type(e).__name__}: {_last_line(str(e))}); nothing was exported") from None
    check_visibility(api, repo_id, repo_type, public)
    return api


def check_visibility(api, repo_id: str, repo_type: str, public: bool) -> bool | None:
    """Whether `repo_id` exists and is public (None: it does not exist yet); refuses an existing public repository
    unless `public` says to publish there. Called before any work, and again right before the upload."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        existing_public = not getattr(api.repo_info(repo_id, repo_type=repo_type), "private", False)
    except RepositoryNotFoundError:
        return None
    except Exception as e:
        raise UserError(f"--push-to-hub {repo_id}: cannot read the repository ({type(e).__name__}: "
                        f"{_last_line(str(e))}); check the name and the token's access") from None
    if existing_public and not public:
        raise UserError(f"--push-to-hub {repo_id}: that repository exists and is public, so the upload would publish "
                        f"this export; add --public to publish it, or name a private or new repository")
    return existing_public


def push_to_hub(api, out: Path, repo_id: str, repo_type: str = "model", *, public: bool = False) -> str:
    """Upload `out` to `repo_id`: a new repository is created private unless `public`; an existing public one is
    refused unless `public` says so (uploading there publishes the export)."""
    what = "CAI dataset" if repo_type == "dataset" else "merged stacked LoRA policy"
    existing_public = check_visibility(api, repo_id, repo_type, public)
    try:
        if existing_public is None:
            api.create_repo(repo_id, repo_type=repo_type, private=not public, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type=repo_type,
                                 commit_message=f"lora_cai export ({what})")
    except Exception as e:
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {_last_line(str(e))}); the "
                        f"export in {out} is complete: rerun the push with huggingface-cli upload") from None
    return str(getattr(info, "commit_url", repo_id))
