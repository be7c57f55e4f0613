"""push_to_hub for adapters: the files save_pretrained writes (card included), uploaded with huggingface_hub."""

from __future__ import annotations

import tempfile


def push_adapter(peft_model, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                 token=None, create_pr: bool = False, revision: str | None = None,
                 commit_description: str | None = None, safe_serialization: bool = True, **save_kwargs):
    """Save the adapter into a temporary folder and upload that folder only: the base model is never sent.
    Returns huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="unipeft-push-") as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=safe_serialization, **save_kwargs)
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = getattr(url, "repo_id", None) or repo_id  # create_repo may add the user's namespace
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                 commit_message=commit_message or "Upload adapter (unipeft)",
                                 commit_description=commit_description, revision=revision, create_pr=create_pr)
