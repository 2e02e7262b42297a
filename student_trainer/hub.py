"""Upload a run's output directory to the Hugging Face Hub (``train.push_to_hub``, ``sft --push-to-hub``).

    url = push_output(Path("runs/opd"), "me/qwen3-1.7b-opd", private=True, commit_message="OPD, 100 steps")

What goes up: the ``save_pretrained`` model and tokenizer plus the small run records (config, metrics,
plot); never ``checkpoints/`` (optimizer and RNG state, several times the model) or tracker logs
(:data:`IGNORE_PATTERNS`). The token is ``token``, else ``$HF_TOKEN`` / the saved ``hf auth login`` token;
``$HF_ENDPOINT`` points it at another Hub (the tests use a local stand-in).
"""

from __future__ import annotations

from pathlib import Path

from student_trainer.errors import TrainerError

# fnmatch patterns (``*`` crosses ``/``) of files that are not part of the model repo
IGNORE_PATTERNS = (
    "checkpoints/*",  # resumable training state: optimizer, scheduler, RNG (opd/checkpoint.py)
    "*.tfevents.*",  # TensorBoard event files
    "wandb/*",
    "*.tmp",  # a half-written file
)


class HubPushError(TrainerError):
    """The upload could not be done; the message names the repo and what to do."""


def files_to_push(output_dir: Path) -> list[Path]:
    """The files of ``output_dir`` that :func:`push_output` uploads (relative paths, sorted)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    relative = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    kept = filter_repo_objects(relative, ignore_patterns=[*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS])
    return [Path(p) for p in kept]


def push_output(
    output_dir: Path, repo_id: str, private: bool, *, commit_message: str, token: str | None = None
) -> str:
    """Create ``repo_id`` (a model repo; kept if it exists) and upload ``output_dir`` into it in one call of
    ``HfApi.upload_folder``, without :data:`IGNORE_PATTERNS`. Prints the files; returns the repo URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    output_dir = Path(output_dir)
    later = f"hf upload {repo_id} {output_dir} {' '.join(f'--exclude {p!r}' for p in IGNORE_PATTERNS)}"
    if constants.is_offline_mode():
        raise HubPushError(
            f"push to {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or upload "
            f"later with: {later}"
        )
    files = files_to_push(output_dir) if output_dir.is_dir() else []
    if not {"config.json", "adapter_config.json"} & {f.as_posix() for f in files}:
        raise HubPushError(
            f"push to {repo_id}: {output_dir} holds no saved model (no config.json or adapter_config.json at "
            "its top level) to upload"
        )
    total = sum((output_dir / f).stat().st_size for f in files)
    print(f"hub: uploading {len(files)} files ({total / 2**20:.1f} MiB) from {output_dir} to {repo_id}:")
    for f in files:
        print(f"  {f.as_posix()}  {(output_dir / f).stat().st_size / 2**20:.2f} MiB")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            ignore_patterns=list(IGNORE_PATTERNS),
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubPushError(
            f"push to {repo_id} failed: HTTP {status}: {first}{hint}; the run is saved in {output_dir}, "
            f"upload it later with: {later}"
        ) from None
    except Exception as exc:  # the Hub cannot be reached (DNS, connection refused, timeout)
        raise HubPushError(
            f"push to {repo_id} failed: cannot reach {api.endpoint} ({type(exc).__name__}: {exc}); the run is "
            f"saved in {output_dir}, upload it later with: {later}"
        ) from None
    print(f"hub: pushed to {url}")
    return str(url)
